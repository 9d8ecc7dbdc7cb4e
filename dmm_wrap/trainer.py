"""Streamed training: each batch goes backbone -> hook -> heads once and is dropped; only the statistics pre-pass's
first `stats_batches` batches of features are kept, until training takes them as the start of epoch 0."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import signal
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .alignment import AlignmentTarget, PiecewiseAlignment, fit_alignment
from .checkpoint import (Checkpoint, Checkpointer, Position, TrainingInterrupted, capture_rng, check_fingerprint,
                         load_optimizer_state, restore_rng)
from .config import Attribute, ConfigError, FitConfig
from .distributed import (all_gather_object, all_gather_tensor, all_reduce_sum, barrier, broadcast_object,
                          check_sharded, collective_device, fail_together, is_distributed, is_main_process, rank,
                          world_size)
from .objective import DeepMinMax


@dataclass
class FitHistory:
    """Loss terms recorded during `fit`, one entry per logged step."""

    step: list[int] = field(default_factory=list)
    """Index of the h_theta step (0-based, counting warm-up steps)."""
    loss: list[float] = field(default_factory=list)
    """lam * L_d + (1 - lam) * L_r + match_weight * match + align_weight * align."""
    debias: list[float] = field(default_factory=list)
    """L_d, the CLUB estimate of I(B; Z~) summed over attributes (nats)."""
    retain: list[float] = field(default_factory=list)
    """L_r, -log m_phi(Z | Z~, B)."""
    q_nll: list[float] = field(default_factory=list)
    """Fit loss of CLUB's q networks."""
    match: list[float] = field(default_factory=list)
    """Group-matching term: sliced Wasserstein distance of each attribute group's Z~ to the batch's (0 when off)."""
    align: list[float] = field(default_factory=list)
    """Piecewise-alignment term: mean squared distance of Z~ to its aligned target (0 when off)."""
    club: dict[str, list[float]] = field(default_factory=dict)
    """CLUB estimate per attribute."""
    steps_done: int = 0
    """Total optimisation steps taken."""

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "debias": self.debias, "retain": self.retain,
                "q_nll": self.q_nll, "match": self.match, "align": self.align, "club": self.club, "steps_done": self.steps_done}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitHistory:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def split_batch(batch: Any, batch_idx: int) -> tuple[Any, Any]:
    """(inputs, attrs) from a batch: a tuple/list whose first two items they are (later items, such as task labels
    kept for evaluation, are ignored), or a mapping with 'inputs' and 'attrs'."""
    if isinstance(batch, dict) and "inputs" in batch and "attrs" in batch:
        return batch["inputs"], batch["attrs"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"Batch {batch_idx}: expected (inputs, attrs), got {type(batch).__name__}"
        f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}. "
        "Make the dataset return (image, attrs) pairs, attrs being a float tensor [num_attributes]."
    )


def attrs_tensor(attrs: Any, attributes: tuple[Attribute, ...], n: int, batch_idx: int) -> Tensor:
    """Validate a batch's attributes and return them as a float tensor [N, num_attributes] in declared order."""
    names = [a.name for a in attributes]
    if isinstance(attrs, dict):
        if set(attrs) != set(names):
            raise ValueError(
                f"Batch {batch_idx}: attribute keys {sorted(attrs)} do not match the declared attributes {names}."
            )
        attrs = torch.stack([torch.as_tensor(attrs[k]).reshape(-1) for k in names], dim=1)
    attrs = torch.as_tensor(attrs)
    if attrs.dim() == 1 and len(names) == 1:
        attrs = attrs[:, None]
    if attrs.dim() != 2 or attrs.shape[1] != len(names) or attrs.shape[0] != n:
        raise ValueError(
            f"Batch {batch_idx}: attrs must have shape [{n}, {len(names)}] (one column per attribute, in order "
            f"{names}), got {tuple(attrs.shape)}."
        )
    attrs = attrs.float()
    if not torch.isfinite(attrs).all():
        raise ValueError(f"Batch {batch_idx}: attrs contain NaN or infinite values.")
    for k, a in enumerate(attributes):
        if a.kind != "categorical":
            continue
        col = attrs[:, k]
        bad = (col != col.round()) | (col < 0) | (col >= a.num_classes)
        if bad.any():
            raise ValueError(
                f"Batch {batch_idx}: categorical attribute {a.name!r} must hold class ids in 0..{a.num_classes - 1}, "
                f"got {col[bad][0].item()!r}. Map the labels to ids or raise num_classes."
            )
    return attrs


def check_features(z: Tensor, batch_idx: int) -> None:
    if not torch.isfinite(z).all():
        raise ValueError(
            f"Batch {batch_idx}: the backbone produced NaN or infinite features. Check the inputs of this batch "
            "(NaN pixels?) and, with amp_dtype='float16', try 'bfloat16'."
        )


class RunningMoments:
    """Streamed mean and variance (Chan et al.'s parallel update) in float64."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: Tensor) -> RunningMoments:
        x = x.detach().to("cpu", torch.float64)
        mb = x.mean(0)
        return self.merge(x.shape[0], mb, ((x - mb) ** 2).sum(0))

    def merge(self, nb: int, mb: Tensor, m2b: Tensor) -> RunningMoments:
        """Fold in the moments (count, mean, sum of squared deviations) of another part of the data."""
        if nb == 0:
            return self
        delta = mb - self.mean
        total = self.n + nb
        self.mean = self.mean + delta * nb / total
        self.m2 = self.m2 + m2b + delta**2 * self.n * nb / total
        self.n = total
        return self

    def merge_ranks(self) -> RunningMoments:
        """The moments over the data of every rank (self unchanged outside a process group)."""
        if not is_distributed():
            return self
        packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.mean, self.m2])
        dim = self.mean.numel()
        merged = RunningMoments(dim)
        for part in all_gather_tensor(packed.to(collective_device())):
            part = part.cpu()
            merged.merge(int(part[0].item()), part[1:1 + dim], part[1 + dim:])
        return merged

    @property
    def std(self) -> Tensor:
        var = self.m2 / max(self.n - 1, 1)
        return var.sqrt().clamp_min(1e-6)


def autocast(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def iterate_batches(loader: Iterable, attributes: tuple[Attribute, ...], extract: Callable[[Tensor], Tensor],
                    device: torch.device, amp_dtype: str | None,
                    skip: int = 0) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Yield (features, attrs) for each batch of one pass over `loader` (or of the pass `loader` already is, when it
    is an iterator), validated, on `device`; the first `skip` batches are drawn from the loader but not run through
    the backbone (to resume mid-epoch)."""
    for batch_idx, batch in enumerate(loader):
        if batch_idx < skip:
            continue
        inputs, attrs = split_batch(batch, batch_idx)
        n = len(inputs)
        b = attrs_tensor(attrs, attributes, n, batch_idx).to(device, non_blocking=True)
        inputs = inputs.to(device, non_blocking=True)
        with torch.no_grad(), autocast(device, amp_dtype):
            z = extract(inputs)
        z = z.float()
        check_features(z, batch_idx)
        yield z, b


EMPTY_LOADER = "The loader is empty: it produced no batch. Check the dataset and drop_last."


def _compact(t: Tensor) -> Tensor:
    """`t` in a storage of its own: a kept view (the class token of a sequence, say) would keep its whole base alive."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _check_one_pass(loader: Iterator, cfg: FitConfig, standardize: bool) -> None:
    """Refuse a one-pass iterator (a generator, say) when fit would read it more than once; with one epoch, the
    pre-pass's kept batches and the rest of the same pass are each trained on once."""
    if cfg.epochs > 1:
        reason, fix = f"epochs={cfg.epochs} reads the loader once per epoch", "or pass epochs=1"
    elif standardize and cfg.stats_batches is None:
        reason, fix = ("stats_batches=None reads a whole pass for the statistics before training reads it again",
                       "or pass stats_batches=N")
    elif cfg.resume:
        reason, fix = "resume=True reads the loader from its start to skip what was trained", "or start a new run"
    else:
        return
    raise TypeError(
        f"fit got a one-pass iterator ({type(loader).__name__}), which yields its batches only once, but {reason}. "
        f"Pass a re-iterable loader (e.g. a DataLoader or a list of batches, or an IterableDataset whose __iter__ "
        f"starts a new pass), {fix}."
    )


class PrePass:
    """The first batches of epoch 0, read ahead of training: the first one sizes the heads, the first
    `cfg.stats_batches` give the standardisation statistics, and training then takes their features as the first
    batches of epoch 0 before the loader continues. Every batch thus goes through the backbone once.

    Memory: at most `stats_batches` batches are kept, i.e. stats_batches x batch size x feature_dim floats of
    features (plus the attributes) on the training device, released as training takes them. With
    `stats_batches=None` the statistics need a whole epoch before the first step; keeping that would tie memory to
    the data set's size, so that pre-pass is a pass of its own, dropped batch by batch, and epoch 0 then reads the
    loader again (each batch goes through the backbone twice in epoch 0).

    `rng` holds the RNG states from just before epoch 0's first batch was drawn (with checkpoints), so a run resumed
    in epoch 0 replays the same data, pre-pass batches included. A one-pass iterator (a generator) is trained on for
    one epoch; it is refused when fit would read it twice (several epochs, whole-pass statistics, a resume).
    """

    def __init__(self, loader: Iterable, attributes: tuple[Attribute, ...], extract: Callable[[Tensor], Tensor],
                 cfg: FitConfig, device: torch.device, standardize: bool) -> None:
        if isinstance(loader, Iterator):
            _check_one_pass(loader, cfg, standardize)
        self.loader, self.attributes, self.extract, self.device = loader, attributes, extract, device
        self.amp_dtype = cfg.amp_dtype
        self.stats_batches = cfg.stats_batches
        self.record_rng = cfg.checkpoint_dir is not None
        self.rng: dict[str, Any] = {}
        """The RNG states at the start of epoch 0 (with checkpoints; empty otherwise)."""
        self._separate = standardize and cfg.stats_batches is None  # the next pass opened is a statistics-only one
        self._kept: deque[tuple[Tensor, Tensor]] = deque()
        self._batches: Generator[tuple[Tensor, Tensor], None, None] | None = None

    def __enter__(self) -> PrePass:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open(self) -> None:
        _set_epoch(self.loader, 0)
        if not self._separate and self.record_rng:
            self.rng = capture_rng(self.loader)
        with _workers_ignore_stop_signals(self.loader, True):
            batches = iter(self.loader)  # the loader's workers start here: they must ignore what training handles
        self._batches = iterate_batches(batches, self.attributes, self.extract, self.device, self.amp_dtype)

    def _read(self) -> bool:
        """Run the next batch of the open pass through the backbone and keep it; False when the pass has ended."""
        if self._batches is None:
            self._open()
        assert self._batches is not None
        batch = next(self._batches, None)
        if batch is None:
            return False
        self._kept.append((_compact(batch[0]), _compact(batch[1])))
        return True

    def feature_dim(self) -> int:
        """The width of the features, from the first batch (read now and kept for the statistics and training)."""
        with fail_together("reading the first batch"):
            if not self._kept and not self._read():
                raise ValueError(EMPTY_LOADER)
        return int(self._kept[0][0].shape[1])

    def statistics_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The pre-pass: the first `stats_batches` batches of epoch 0, kept for training; with stats_batches=None,
        every batch of a separate pass, dropped as it goes."""
        if self._separate:
            while self._kept or self._read():
                yield self._kept.popleft()
            self._batches, self._separate = None, False
            return
        assert self.stats_batches is not None
        i = 0
        while i < self.stats_batches and (i < len(self._kept) or self._read()):
            yield self._kept[i]
            i += 1

    def training_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Epoch 0 for training: the kept batches, then the rest of the pass (opened now if nothing was read)."""
        if self._batches is None:
            self._open()
        assert not self._separate and self._batches is not None
        kept, rest = self._kept, self._batches

        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            while kept:
                yield kept.popleft()
            yield from rest

        return batches()

    def close(self) -> None:
        """Drop the kept batches and end the open pass (its loader workers exit)."""
        self._kept.clear()
        if self._batches is not None:
            self._batches.close()
            self._batches = None


class _FirstSamples:
    """The first `limit` samples of a stream of (features, attributes) batches, kept on the CPU."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self.parts: list[tuple[Tensor, Tensor]] = []

    def add(self, z: Tensor, b: Tensor) -> bool:
        """Keep what fits of a batch; False once `limit` samples are held."""
        if self.held < self.limit:
            self.parts.append((z[:self.limit - self.held].float().cpu(), b[:self.limit - self.held].float().cpu()))
            self.held += len(self.parts[-1][0])
        return self.held < self.limit

    def tensors(self, width: int, attributes: int) -> tuple[Tensor, Tensor]:
        if not self.parts:
            return torch.zeros(0, width), torch.zeros(0, attributes)
        return torch.cat([z for z, _ in self.parts]), torch.cat([b for _, b in self.parts])


def estimate_statistics(objective: DeepMinMax, prepass: PrePass, keep: int = 0) -> tuple[Tensor, Tensor]:
    """Fill the standardisation buffers from the pre-pass's batches (`PrePass.statistics_batches`); return the
    first `keep` of their samples (features, attributes) on the CPU, for the alignment."""
    attributes = objective.attributes
    zs = RunningMoments(objective.feature_dim)
    bs = RunningMoments(len(attributes))
    sample = _FirstSamples(keep)
    with fail_together("statistics pre-pass"):  # a bad batch on one rank must not leave the others in the merge
        for z, b in prepass.statistics_batches():
            zs.update(z)
            bs.update(b)
            sample.add(z, b)
    zs, bs = zs.merge_ranks(), bs.merge_ranks()  # data-parallel: statistics of the union of the ranks' shards
    if zs.n == 0:
        raise ValueError(EMPTY_LOADER)
    if zs.n < 2:
        raise ValueError("The loader gave fewer than 2 samples; standardisation statistics need at least 2.")
    objective.feature_mean.copy_(zs.mean.float())
    objective.feature_std.copy_(zs.std.float())
    continuous = torch.tensor([a.kind == "continuous" for a in attributes])
    objective.attr_mean.copy_(torch.where(continuous, bs.mean.float(), torch.zeros(())))
    objective.attr_std.copy_(torch.where(continuous, bs.std.float(), torch.ones(())))
    return sample.tensors(objective.feature_dim, len(attributes))


def fit_alignment_target(objective: DeepMinMax, z: Tensor, b: Tensor, cfg: FitConfig) -> AlignmentTarget:
    """Round 0 of the alignment target (`dmm_wrap.alignment`), from the pre-pass's sample of raw features and
    attributes. Data-parallel: the ranks' samples (each `cfg.align_samples // world_size()` at most) are gathered on
    every rank."""
    parts = all_gather_object((z, b))
    with torch.no_grad():
        device = objective.feature_mean.device
        z_std = objective.normalize(torch.cat([p[0] for p in parts]).to(device))
        b_std = objective.normalize_attrs(torch.cat([p[1] for p in parts]).to(device))
    target = AlignmentTarget(objective.h, z_std, b_std, PiecewiseAlignment([]))
    refit_alignment(objective, target, cfg)
    return target


def refit_alignment(objective: DeepMinMax, target: AlignmentTarget, cfg: FitConfig) -> None:
    """Start a round of the alignment target: copy h_theta, fit the alignment on its output for the sample (rank 0;
    every rank receives the buffers). The piece counts of round 0 are kept."""
    features = target.snapshot_features(objective.h)
    state = None
    if is_main_process():
        clusters = ([stage.centroids.shape[1] for stage in target.alignment.stages] if len(target.alignment.stages)
                    else cfg.align_clusters)
        fitted = fit_alignment(features, target.sample_b.cpu(), objective.attributes, clusters, cfg.align_bins,
                               cfg.align_maps, seed=0)
        state = {k: v.cpu() for k, v in fitted.state_dict().items()}
    state = broadcast_object(state)
    alignment = PiecewiseAlignment.empty_like(state)
    alignment.load_state_dict(state)
    target.alignment = alignment.to(target.sample_z.device)


class EstimatorLoss(nn.Module):
    """CLUB's q networks and m_phi as one module whose forward is their fitting loss, so that data-parallel training
    can wrap exactly these parameters in DistributedDataParallel (h_theta is wrapped on its own)."""

    def __init__(self, objective: DeepMinMax) -> None:
        super().__init__()
        self.q = objective.q
        self.m = objective.m
        self._objective = [objective]  # not a submodule: the objective owns q and m

    def forward(self, z_std: Tensor, z_tilde: Tensor, b: Tensor, reduction: str) -> Tensor:
        est = self._objective[0].estimator_losses(z_std, z_tilde, b, reduction)
        return torch.stack([est.q_nll + est.m_nll, est.q_nll])


class StopSignals:
    """Within the block, SIGINT and SIGTERM ask training to stop at the next step boundary (after writing a
    checkpoint, with `checkpointing`) instead of killing it mid-step or mid-write. A second SIGINT (Ctrl-C twice)
    stops at once, but after the update in progress (see `deferred`); a third one stops even that. Repeated SIGTERMs
    (schedulers and torchrun both forward them) are ignored. Only the main thread can install handlers; elsewhere
    the block does nothing."""

    def __init__(self, enabled: bool, checkpointing: bool = True) -> None:
        self.enabled = enabled
        self.checkpointing = checkpointing
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._deferring = False
        self._pending = False

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                if self._deferring and not self._pending:
                    self._pending = True  # raised when the update in progress is done
                    return
                raise KeyboardInterrupt
            return
        self.signum = signum
        if is_main_process():
            then = "writing a checkpoint" if self.checkpointing else "keeping the heads of the steps taken"
            print(f"\ndmm_wrap: signal {signum} received; stopping after this step and {then} (Ctrl-C again stops "
                  "at once).", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block (a step's updates of the heads), a second SIGINT raises KeyboardInterrupt only at the
        block's end, so a stopped run never holds half-updated heads; a third SIGINT raises at once."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class _IgnoreStopSignals:
    """DataLoader worker_init_fn: workers ignore SIGINT / SIGTERM, which the main process handles (a scheduler's
    SIGTERM reaches the whole process group; workers killed by it would fail the next batch fetch)."""

    def __init__(self, then: Callable[[int], None] | None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


@contextlib.contextmanager
def _workers_ignore_stop_signals(loader: Iterable, enabled: bool) -> Iterator[None]:
    from torch.utils.data import DataLoader

    if not enabled or not isinstance(loader, DataLoader) or loader.num_workers == 0:
        yield
        return
    original = loader.worker_init_fn
    loader.worker_init_fn = _IgnoreStopSignals(original)
    try:
        yield
    finally:
        loader.worker_init_fn = original


def fingerprint(objective: DeepMinMax, loader: Iterable) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming from it, the same on every rank: the heads,
    the attributes, the number of processes and each rank's batches per epoch (the checkpoint's position counts
    batches). Collective under torch.distributed."""
    try:
        batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        batches = None
    return {"feature_dim": objective.feature_dim, "out_dim": objective.out_dim,
            "attributes": [a.to_dict() for a in objective.attributes], "head": dataclasses.asdict(objective.cfg),
            "world_size": world_size(), "batches_per_epoch": all_gather_object(batches)}


def _mean_over_ranks(value: Tensor) -> Tensor:
    return all_reduce_sum(value.clone()) / world_size()


def _gather_over_ranks(value: Tensor) -> Tensor:
    """`value` of every rank concatenated along dim 0; gradients flow back to each rank's own part."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(value.contiguous()))


def _set_epoch(loader: Iterable, epoch: int) -> None:
    """Let a DistributedSampler (or any sampler with set_epoch) reshuffle for this epoch."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def train(objective: DeepMinMax, loader: Iterable, extract: Callable[[Tensor], Tensor], cfg: FitConfig,
          device: torch.device, prepass: PrePass | None = None) -> FitHistory:
    """Train h_theta, CLUB's q networks and m_phi on a stream of batches; return the loss history.

    The standardisation statistics come from the first `cfg.stats_batches` batches of epoch 0, whose features are
    kept and trained on as the start of epoch 0 (see PrePass); pass the PrePass that sized the heads, if one did.

    Inside an initialised torch.distributed process group (e.g. under torchrun), each rank streams its own shard of
    the data through the backbone (outside DDP, under no_grad); h_theta and the estimators are wrapped in
    DistributedDataParallel, and CLUB's negative pairs are drawn from the global batch by summing the few numbers
    they need of B (class counts, sums of b and b^2) over ranks. With equal per-rank batches this takes the same
    steps as one process with the global batch, up to float rounding. The same small all-reduce at the start of
    each step carries three flags: a rank that failed, a rank whose shard ran out (every rank then ends the epoch,
    so uneven shards cannot desynchronise the ranks), and a rank that was signalled to stop.

    With `cfg.checkpoint_dir`, a checkpoint is written every `cfg.checkpoint_every` steps, at the end, and on
    SIGINT / SIGTERM (then TrainingInterrupted is raised); `cfg.resume` continues from the newest intact one. A new
    run into a checkpoint_dir that holds checkpoints is refused unless `cfg.overwrite_checkpoints`. Without
    checkpoint_dir, SIGINT / SIGTERM also stop training at a step boundary with TrainingInterrupted, and `objective`
    keeps the heads of the steps taken.
    """
    ddp = is_distributed()
    if ddp and device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives (and the object ones) run on the current device
    check_sharded(loader)
    checkpointer = (Checkpointer(cfg.checkpoint_dir, cfg.checkpoint_every, cfg.keep_checkpoints)
                    if cfg.checkpoint_dir is not None else None)
    if checkpointer is not None and getattr(loader, "persistent_workers", False) and is_main_process():
        warnings.warn("The DataLoader has persistent_workers=True: its workers outlive epochs, so a resumed run cannot "
                      "reproduce their random state, and a SIGTERM sent to the whole process group reaches them. "
                      "Use persistent_workers=False for exact resumes.", stacklevel=3)
    run_fingerprint = fingerprint(objective, loader) if checkpointer is not None else {}
    resumed = _find_resume_point(checkpointer, objective, cfg, run_fingerprint)
    if prepass is None:
        prepass = PrePass(loader, objective.attributes, extract, cfg, device, objective.cfg.standardize)
    aligning = cfg.align_weight > 0
    if resumed is not None:
        prepass.close()  # the checkpoint holds the statistics; its epoch is replayed from its RNG states
        _check_resumed_alignment(resumed, aligning)
        if aligning:
            objective.alignment = AlignmentTarget.empty_like(objective.h, resumed.heads, "alignment.").to(device)
    else:
        keep = cfg.align_samples // world_size() if aligning else 0  # per rank: the ranks' samples are gathered
        if objective.cfg.standardize:
            sample = estimate_statistics(objective, prepass, keep)
        elif aligning:
            sample = _first_samples(prepass, keep)
        if aligning:
            objective.alignment = fit_alignment_target(objective, *sample, cfg)
    try:
        return _train(objective, loader, extract, cfg, device, prepass, checkpointer, resumed, run_fingerprint, ddp)
    finally:
        if hasattr(objective, "alignment"):
            del objective.alignment  # a training target, not part of the fitted model


def _first_samples(prepass: PrePass, keep: int) -> tuple[Tensor, Tensor]:
    """The first `keep` samples of the pre-pass's batches (without standardisation statistics)."""
    sample = _FirstSamples(keep)
    for z, b in prepass.statistics_batches():
        if not sample.add(z, b):
            break
    return sample.tensors(0, 0)


def _check_resumed_alignment(resumed: Checkpoint, aligning: bool) -> None:
    has = any(k.startswith("alignment.") for k in resumed.heads)
    if has != aligning:
        raise ValueError(
            f"{resumed.path} was written by a run {'with' if has else 'without'} the alignment term, and this run has "
            f"align_weight={'0' if has else '> 0'}. Resume with the FitConfig of the run that wrote it, or start a new "
            "run in another checkpoint_dir.")


def _train(objective: DeepMinMax, loader: Iterable, extract: Callable[[Tensor], Tensor], cfg: FitConfig,
           device: torch.device, prepass: PrePass, checkpointer: Checkpointer | None, resumed: Checkpoint | None,
           run_fingerprint: dict[str, Any], ddp: bool) -> FitHistory:
    """The training loop of `train`, once the statistics (and any alignment target) are in place."""
    from tqdm.auto import tqdm

    fused = {"foreach": True}
    opt_h = torch.optim.Adam(objective.h.parameters(), lr=cfg.lr, **fused)
    opt_est = torch.optim.Adam(objective.estimator_parameters(), lr=cfg.estimator_lr or cfg.lr, **fused)
    history = FitHistory(club={a.name: [] for a in objective.attributes})
    position = Position()
    if resumed is not None:
        objective.load_state_dict(resumed.heads)
        load_optimizer_state(opt_h, resumed.optimizers["h"])
        load_optimizer_state(opt_est, resumed.optimizers["estimators"])
        history = FitHistory.from_dict(resumed.history)
        position = resumed.position
    h_net: nn.Module = objective.h
    est_net: nn.Module = EstimatorLoss(objective)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        h_net = DistributedDataParallel(h_net, device_ids=ids)
        est_net = DistributedDataParallel(est_net, device_ids=ids)
    try:
        total = len(loader) * cfg.epochs  # type: ignore[arg-type]
    except TypeError:
        total = None
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps) if total is not None else cfg.max_steps
    bar = tqdm(total=total, initial=position.step, disable=not cfg.progress or not is_main_process(),
               desc="dmm_wrap fit", dynamic_ncols=True)
    epoch_rng: dict[str, Any] = {}
    saved_at = position.step if resumed is not None else None

    def save_checkpoint() -> Path | None:
        """Write a checkpoint (rank 0); every rank raises if the write failed, so none waits for the others."""
        assert checkpointer is not None
        rngs = all_gather_object(epoch_rng)
        path = None
        with fail_together(f"Step {position.step}: writing the checkpoint"):  # disk full on rank 0: all ranks stop
            if is_main_process():
                path = checkpointer.save(objective, {"h": opt_h, "estimators": opt_est}, position,
                                         history.as_dict(), rngs, run_fingerprint)
        return path

    def done() -> bool:
        return cfg.max_steps is not None and position.step >= cfg.max_steps

    def interrupted(signum: int, path: Path | None) -> TrainingInterrupted:
        """The stop at a step boundary: the heads and `history` are those of the `position.step` steps taken."""
        history.steps_done = position.step
        return TrainingInterrupted(signum, position.step, path, rank(), history)

    stop = StopSignals(enabled=True, checkpointing=checkpointer is not None)
    try:
        with stop, _workers_ignore_stop_signals(loader, True):
            for epoch in range(position.epoch, cfg.epochs):
                if done():
                    break
                _set_epoch(loader, epoch)
                if resumed is not None and epoch == resumed.position.epoch:
                    epoch_rng = resumed.rng[rank()]
                    with fail_together("restoring the RNG states"):
                        restore_rng(epoch_rng, loader)  # replay this epoch's order, then skip what was consumed
                    batches = iterate_batches(loader, objective.attributes, extract, device, cfg.amp_dtype,
                                              position.batches)
                elif epoch == 0:
                    batches = prepass.training_batches()  # the pre-pass's features first, then the loader goes on
                    epoch_rng = prepass.rng
                    position.epoch, position.batches = epoch, 0
                else:
                    epoch_rng = capture_rng(loader) if checkpointer is not None else {}
                    position.epoch, position.batches = epoch, 0
                    batches = iterate_batches(loader, objective.attributes, extract, device, cfg.amp_dtype)
                while not done():
                    z = b = failure = None
                    try:
                        z, b = next(batches)
                    except StopIteration:
                        pass
                    except Exception as err:
                        if not ddp:
                            if stop.signum is not None:
                                # The signal also reached a loader worker; the run still stops at a step boundary.
                                raise interrupted(stop.signum, save_checkpoint() if checkpointer else None) from err
                            raise
                        failure = err
                    sums, stop_now = None, False
                    if ddp:
                        sums, stop_now = _synchronise(objective, b, stop.signum is not None, failure, device,
                                                      position.step)
                        if sums is None:
                            break  # some rank's shard ran out: every rank ends the epoch here
                    elif z is None:
                        break
                    position.batches += 1
                    if not ddp and z.shape[0] < 2:
                        continue  # CLUB's pairwise term needs at least two samples
                    if cfg.align_weight > 0 and position.step > 0 and position.step % cfg.align_every == 0:
                        with fail_together(f"Step {position.step}: refitting the alignment target"):
                            refit_alignment(objective, objective.alignment, cfg)
                    with stop.deferred():  # Ctrl-C twice: the heads are never left half-updated
                        _step(objective, h_net, est_net, opt_h, opt_est, z, b, sums, position.step, cfg, history,
                              ddp)
                        position.step += 1
                    bar.update(1)
                    stop_now = stop_now or (not ddp and stop.signum is not None)
                    if history.step and history.step[-1] == position.step - 1:
                        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", club=f"{history.debias[-1]:.3f}",
                                        nll=f"{history.retain[-1]:.3f}", refresh=False)
                    if checkpointer is not None and (position.step % checkpointer.every == 0 or stop_now):
                        path = save_checkpoint()
                        saved_at = position.step
                        if stop_now:
                            barrier()  # no rank exits (and gets the others killed) before rank 0 has written
                            raise interrupted(stop.signum or signal.SIGTERM, path)
                    elif stop_now:
                        raise interrupted(stop.signum or signal.SIGTERM, None)
                if position.batches == 0:
                    raise ValueError(EMPTY_LOADER)
            path = None
            if checkpointer is not None:
                path = save_checkpoint() if saved_at != position.step else None
            # A signal after the last flag was read (last step, last fetch): still reported as a stop.
            stopped = stop.signum is not None
            if ddp:
                stopped = all_reduce_sum(torch.tensor([float(stopped)], device=device)).item() > 0
            if stopped:
                if checkpointer is not None and is_main_process():
                    path = path or checkpointer.paths()[0]
                raise interrupted(stop.signum or signal.SIGTERM, path if is_main_process() else None)
    except KeyboardInterrupt as err:
        if isinstance(err, TrainingInterrupted) or checkpointer is not None or ddp:
            raise
        # Ctrl-C twice: it stops between two steps' updates (StopSignals.deferred), so the heads are a step's.
        raise interrupted(signal.SIGINT, None) from err
    finally:
        bar.close()
        prepass.close()
        if ddp:
            # Drop the DDP wrappers (and the process group their reducers hold) here: a raised exception's
            # traceback keeps this frame, and so them, alive while the caller shuts the group down.
            h_net = est_net = None  # noqa: F841
            gc.collect()
    history.steps_done = position.step
    return history


def _synchronise(objective: DeepMinMax, b: Tensor | None, stop: bool, failure: BaseException | None,
                 device: torch.device, step: int) -> tuple[Tensor | None, bool]:
    """The one all-reduce at the start of a data-parallel step: CLUB's pair sums over the global batch, and whether
    any rank failed (every rank raises), ran out of data (returns None: end the epoch) or was asked to stop."""
    width = objective.pair_width
    sums = objective.pair_sums(objective.normalize_attrs(b)) if b is not None else torch.zeros(width, device=device)
    flags = [float(stop), float(failure is not None), float(b is None and failure is None)]
    packed = all_reduce_sum(torch.cat([sums, sums.new_tensor(flags)]))
    any_stop, any_failure, any_exhausted = (v > 0 for v in packed[width:].tolist())
    if failure is not None:
        raise failure
    if any_failure:
        raise RuntimeError(f"Step {step}: another process failed (its error is in its own log); stopping this one.")
    if any_exhausted:
        return None, any_stop
    return packed[:width], any_stop


def _replace_earlier_run(checkpointer: Checkpointer, overwrite: bool) -> None:
    """A new run: refuse a checkpoint_dir holding an earlier run's checkpoints, unless told to overwrite them (they
    are then removed when this run writes its first checkpoint)."""
    earlier = checkpointer.paths()
    if not earlier:
        return
    if not overwrite:
        raise ConfigError(
            f"checkpoint_dir {checkpointer.directory} holds {len(earlier)} checkpoint(s) of an earlier run (newest "
            f"{earlier[0].name}), which a new run would remove. Continue that run with resume=True (dmm-wrap fit "
            "--resume), replace it with overwrite_checkpoints=True (dmm-wrap fit --overwrite), or choose another "
            "checkpoint_dir (--output-dir)."
        )
    checkpointer.replace_earlier_run()
    warnings.warn(f"Starting a new run (overwrite_checkpoints=True): the {len(earlier)} checkpoint(s) of an earlier "
                  f"run in {checkpointer.directory} will be removed when this run writes its first one.", stacklevel=5)


def _find_resume_point(checkpointer: Checkpointer | None, objective: DeepMinMax, cfg: FitConfig,
                       run_fingerprint: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint to continue from, chosen by rank 0 and read by every rank, or None for a new run. Every rank
    raises if any rank cannot read it or it does not fit this run."""
    if checkpointer is None:
        if cfg.resume:
            raise ValueError("resume=True needs checkpoint_dir: the folder the interrupted run wrote its checkpoints "
                             "to.")
        return None
    if not cfg.resume:
        with fail_together(f"checking checkpoint_dir {checkpointer.directory}"):
            if is_main_process():
                _replace_earlier_run(checkpointer, cfg.overwrite_checkpoints)
        return None
    found: Checkpoint | None = None
    # A read error or a checkpoint of a newer dmm_wrap is raised as it is (on rank 0; the others stop with it).
    with fail_together(f"finding the checkpoint to resume from in {checkpointer.directory}"):
        if is_main_process():
            found = checkpointer.latest()
    path = broadcast_object(str(found.path) if found is not None else None)
    if path is None:
        if is_main_process():
            warnings.warn(f"resume=True but {checkpointer.directory} holds no checkpoint; starting from scratch.",
                          stacklevel=3)
        return None
    with fail_together(f"resuming from {path}"):
        if found is None:
            found = Checkpointer.read(Path(path))
        check_fingerprint(found.fingerprint, run_fingerprint, found.path)
    assert found is not None
    if cfg.max_steps is not None and found.position.step > cfg.max_steps and is_main_process():
        warnings.warn(f"The checkpoint is at step {found.position.step}, beyond max_steps={cfg.max_steps}: nothing "
                      "to train; its heads are loaded as they are.", stacklevel=3)
    return found


def _step(objective: DeepMinMax, h_net: nn.Module, est_net: nn.Module, opt_h: torch.optim.Optimizer,
          opt_est: torch.optim.Optimizer, z: Tensor, b: Tensor, sums: Tensor | None, step: int, cfg: FitConfig,
          history: FitHistory, ddp: bool) -> None:
    """One training step on a batch (`sums`: CLUB's pair sums over the global batch, None for this batch)."""
    b = objective.normalize_attrs(b)
    z_std = objective.normalize(z)
    # h_theta runs once per batch: the estimator steps use its detached output and the theta step reuses the
    # same graph, so nothing is recomputed. Warm-up steps (no theta update) bypass DDP's gradient hooks.
    z_tilde = (h_net if step >= cfg.warmup_steps else objective.h)(z_std)
    for _ in range(cfg.estimator_steps):
        est = est_net(z_std, z_tilde, b, cfg.nll_reduction)
        opt_est.zero_grad(set_to_none=True)
        est[0].backward()
        opt_est.step()
    target = objective.alignment(z_std, b) if cfg.align_weight > 0 else None
    match = None
    if cfg.match_weight > 0:
        match = objective.match_loss(z_tilde, b, step, cfg.match_projections, cfg.match_bins,
                                     _gather_over_ranks if ddp else None)
    losses = objective.theta_losses(z_std, z_tilde, b, cfg.lam, cfg.nll_reduction, sums,
                                    _mean_over_ranks if ddp else None, match, cfg.match_weight, target,
                                    cfg.align_weight)
    if step >= cfg.warmup_steps:
        opt_h.zero_grad(set_to_none=True)
        losses.total.backward(inputs=list(objective.h.parameters()))
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(objective.h.parameters(), cfg.grad_clip, foreach=True)
        opt_h.step()
    if step % cfg.log_every == 0:
        _record(history, step, losses, est[1], ddp)
        if not math.isfinite(history.loss[-1]):
            raise FloatingPointError(
                f"Step {step}: the loss became {history.loss[-1]}. Lower lr, keep grad_clip on, or keep standardize on."
            )


def _record(history: FitHistory, step: int, losses: Any, q_nll: Tensor, ddp: bool) -> None:
    values = torch.stack([losses.total, losses.debias, losses.retain, q_nll, losses.match, losses.align,
                          *losses.club.values()]).detach()
    if ddp:
        values = _mean_over_ranks(values)  # the global batch's values, the same on every rank
    values = values.tolist()
    history.step.append(step)
    history.loss.append(values[0])
    history.debias.append(values[1])
    history.retain.append(values[2])
    history.q_nll.append(values[3])
    history.match.append(values[4])
    history.align.append(values[5])
    for name, v in zip(losses.club, values[6:]):
        history.club[name].append(v)


__all__ = ["FitHistory", "train", "PrePass", "RunningMoments", "split_batch", "attrs_tensor", "StopSignals",
           "EstimatorLoss"]
