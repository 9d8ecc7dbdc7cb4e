"""The statistics pre-pass: the first batches of epoch 0 size the heads and give the standardisation statistics."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..config import Attribute, FitConfig
from ..core.objective import DeepMinMax
from ..data.batches import iterate_batches
from .aligning import fit_alignment_target
from .checkpoint import capture_rng
from .distributed import all_gather_tensor, collective_device, fail_together, is_distributed, set_epoch, world_size
from .signals import workers_ignore_stop_signals


class RunningMoments:
    """Streamed mean and variance (Chan et al.'s parallel update) in float64."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: Tensor) -> RunningMoments:
        """Fold in the rows of `x` [N, dim]."""
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
        """The sample standard deviation, at least 1e-6."""
        var = self.m2 / max(self.n - 1, 1)
        return var.sqrt().clamp_min(1e-6)


EMPTY_LOADER = "The loader is empty: it produced no batch. Check the dataset and drop_last."
"""The error of a loader that gives no batch."""


def _compact(t: Tensor) -> Tensor:
    """`t` in a storage of its own: a kept view (the class token of a sequence, say) would keep its whole base alive."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _check_one_pass(loader: Iterator, cfg: FitConfig, standardize: bool) -> None:
    """Refuse a one-pass iterator (a generator, say) when fit would read it more than once.

    With one epoch, the pre-pass's kept batches and the rest of the same pass are each trained on once.
    """
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
    """The first batches of epoch 0, read ahead of training, then trained on as the start of epoch 0.

    The first batch sizes the heads, the first `cfg.stats_batches` give the standardisation statistics, and training
    then takes their features as the first batches of epoch 0 before the loader continues. Every batch thus goes
    through the backbone once.

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
        set_epoch(self.loader, 0)
        if not self._separate and self.record_rng:
            self.rng = capture_rng(self.loader)
        with workers_ignore_stop_signals(self.loader, True):
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
        """The pre-pass: the first `stats_batches` batches of epoch 0, kept for training.

        With stats_batches=None: every batch of a separate pass, dropped as it goes.
        """
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


class FirstSamples:
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
        """The samples held (features [n, width], attributes [n, attributes]) on the CPU."""
        if not self.parts:
            return torch.zeros(0, width), torch.zeros(0, attributes)
        return torch.cat([z for z, _ in self.parts]), torch.cat([b for _, b in self.parts])


def estimate_statistics(objective: DeepMinMax, prepass: PrePass, keep: int = 0) -> tuple[Tensor, Tensor]:
    """Fill the standardisation buffers from the pre-pass's batches (`PrePass.statistics_batches`).

    Returns the first `keep` of their samples (features, attributes) on the CPU, for the alignment.
    """
    attributes = objective.attributes
    zs = RunningMoments(objective.feature_dim)
    bs = RunningMoments(len(attributes))
    sample = FirstSamples(keep)
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


def first_samples(prepass: PrePass, keep: int) -> tuple[Tensor, Tensor]:
    """The first `keep` samples of the pre-pass's batches (without standardisation statistics)."""
    sample = FirstSamples(keep)
    for z, b in prepass.statistics_batches():
        if not sample.add(z, b):
            break
    return sample.tensors(0, 0)


def start_from_prepass(objective: DeepMinMax, prepass: PrePass, cfg: FitConfig) -> None:
    """A new run: the standardisation statistics from the pre-pass, and round 0 of any alignment target."""
    aligning = cfg.align_weight > 0
    keep = cfg.align_samples // world_size() if aligning else 0  # per rank: the ranks' samples are gathered
    if objective.cfg.standardize:
        sample = estimate_statistics(objective, prepass, keep)
    elif aligning:
        sample = first_samples(prepass, keep)
    if aligning:
        objective.alignment = fit_alignment_target(objective, *sample, cfg)


__all__ = ["EMPTY_LOADER", "RunningMoments", "PrePass", "FirstSamples", "estimate_statistics", "first_samples",
           "start_from_prepass"]
