"""Streamed training: each batch goes backbone -> hook -> heads once and is dropped.

Only the statistics pre-pass's first `stats_batches` batches of features are kept, until training takes them as the
start of epoch 0 (`prepass.PrePass`). `Trainer` holds a run's state and takes it one epoch and one step at a time;
data-parallel sync (`sync.RankSync`), checkpoints (`resume.RunCheckpoints`), stop signals (`signals.StopSignals`) and
the alignment rounds (`aligning`) are its collaborators.
"""

from __future__ import annotations

import gc
import math
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..config import FitConfig
from ..core.objective import DeepMinMax
from ..data.batches import iterate_batches
from . import aligning, averaging, selection
from .checkpoint import Checkpoint, Position, TrainingInterrupted, load_optimizer_state
from .distributed import barrier, check_sharded, is_main_process, rank, set_epoch
from .estimator_fit import EstimatorFit
from .history import FitHistory
from .prepass import EMPTY_LOADER, PrePass, start_from_prepass
from .resume import RunCheckpoints
from .signals import StopSignals, workers_ignore_stop_signals
from .sync import RankSync, Shared


class Batch(NamedTuple):
    """A batch the loop steps on."""

    z: Tensor
    """Raw features [N, D]."""
    b: Tensor
    """Attributes [N, A] (class ids, values)."""
    shared: Shared
    """What the ranks shared at the start of its step."""


def progress_bar(loader: Iterable, cfg: FitConfig, initial: int) -> Any:
    """The tqdm bar of a run (shown on rank 0 with `cfg.progress`), counting steps."""
    from tqdm.auto import tqdm

    try:
        total = len(loader) * cfg.epochs  # type: ignore[arg-type]
    except TypeError:
        total = None
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps) if total is not None else cfg.max_steps
    return tqdm(total=total, initial=initial, disable=not cfg.progress or not is_main_process(),
                desc="dmm_wrap fit", dynamic_ncols=True)


class Trainer:
    """One run of the training loop, once the statistics (and any alignment target) are in place.

    Example:
        >>> history = Trainer(objective, loader, extract, cfg, device, prepass, checkpoints, None, ranks).run()
    """

    def __init__(self, objective: DeepMinMax, loader: Iterable, extract: Callable[[Tensor], Tensor], cfg: FitConfig,
                 device: torch.device, prepass: PrePass, checkpoints: RunCheckpoints, resumed: Checkpoint | None,
                 ranks: RankSync) -> None:
        self.objective, self.loader, self.extract, self.cfg, self.device = objective, loader, extract, cfg, device
        self.prepass, self.checkpoints, self.resumed, self.ranks = prepass, checkpoints, resumed, ranks
        fused = {"foreach": True}
        self.opt_h = torch.optim.Adam(objective.h.parameters(), lr=cfg.lr, **fused)
        self.opt_est = torch.optim.Adam(objective.estimator_parameters(), lr=cfg.estimator_lr or cfg.lr, **fused)
        self.optimizers = {"h": self.opt_h, "estimators": self.opt_est}
        self.history = FitHistory(club={a.name: [] for a in objective.attributes})
        """The loss history (a resumed run's continues the checkpoint's)."""
        self.position = Position()
        """Steps taken, and the epoch and batches of it consumed."""
        if resumed is not None:
            self._restore(resumed)
        self.h_net: nn.Module | None = ranks.wrap(objective.h)
        self.est_net: nn.Module | None = ranks.wrap(EstimatorFit(objective))
        self.bar = progress_bar(loader, cfg, self.position.step)
        self.stop = StopSignals(enabled=True, checkpointing=checkpoints.enabled)

    def _restore(self, resumed: Checkpoint) -> None:
        self.objective.load_state_dict(resumed.heads)
        load_optimizer_state(self.opt_h, resumed.optimizers["h"])
        load_optimizer_state(self.opt_est, resumed.optimizers["estimators"])
        self.history = FitHistory.from_dict(resumed.history)
        self.position = resumed.position

    def run(self) -> FitHistory:
        """Train to the end of `cfg.epochs` (or `cfg.max_steps`) and return the loss history."""
        try:
            with self.stop, workers_ignore_stop_signals(self.loader, True):
                for epoch in range(self.position.epoch, self.cfg.epochs):
                    if self.done():
                        break
                    self.epoch(epoch)
                self.finish()
        except KeyboardInterrupt as err:
            if isinstance(err, TrainingInterrupted) or self.checkpoints.enabled or self.ranks.enabled:
                raise
            # Ctrl-C twice: it stops between two steps' updates (StopSignals.deferred), so the heads are a step's.
            raise self.interrupted(signal.SIGINT, None) from err
        finally:
            self.close()
        self.history.steps_done = self.position.step
        return self.history

    def epoch(self, epoch: int) -> None:
        """Train on epoch `epoch` until it ends (on any rank) or `cfg.max_steps` is reached."""
        batches = self.open_epoch(epoch)
        while not self.done():
            batch = self.fetch(batches)
            if batch is None:
                break
            self.position.batches += 1
            if not self.ranks.takes(batch.z):
                continue
            selection.check_if_due(self.objective, self.cfg, self.position.step, self.history.record_selection)
            aligning.refit_if_due(self.objective, self.cfg, self.position.step)
            with self.stop.deferred():  # Ctrl-C twice: the heads are never left half-updated
                self.step(batch.z, batch.b, batch.shared.sums)
                self.position.step += 1
            self.after_step(batch.shared)
        if self.position.batches == 0:
            raise ValueError(EMPTY_LOADER)

    def step(self, z: Tensor, b: Tensor, sums: Tensor | None) -> None:
        """One training step on a batch (`sums`: CLUB's pair sums over the global batch, None for this batch)."""
        objective, cfg, step = self.objective, self.cfg, self.position.step
        b = objective.normalize_attrs(b)
        z_std = objective.normalize(z)
        # h_theta runs once per batch: the estimator steps use its detached output and the theta step reuses the
        # same graph, so nothing is recomputed. Warm-up steps (no theta update) bypass DDP's gradient hooks.
        z_tilde = (self.h_net if step >= cfg.warmup_steps else objective.h)(z_std)
        for _ in range(cfg.estimator_steps):
            est = self.est_net(z_std, z_tilde, b, cfg.nll_reduction)
            self.opt_est.zero_grad(set_to_none=True)
            est.total.backward()
            self.opt_est.step()
        target = objective.alignment(z_std, b) if cfg.align_weight > 0 else None
        match = None
        if cfg.match_weight > 0:
            match = objective.match_loss(z_tilde, b, step, cfg.match_projections, cfg.match_bins, self.ranks.gather)
        losses = objective.theta_losses(z_std, z_tilde, b, cfg.lam, cfg.nll_reduction, sums, self.ranks.mean, match,
                                        cfg.match_weight, target, cfg.align_weight, cfg.iso_weight, cfg.iso_bandwidth)
        if step >= cfg.warmup_steps:
            self.opt_h.zero_grad(set_to_none=True)
            losses.total.backward(inputs=list(objective.h.parameters()))
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(objective.h.parameters(), cfg.grad_clip, foreach=True)
            self.opt_h.step()
            averaging.update(objective)
        if step % cfg.log_every == 0:
            self.history.record(step, losses, est.q_nll, self.ranks.mean)
            if not math.isfinite(self.history.loss[-1]):
                raise FloatingPointError(f"Step {step}: the loss became {self.history.loss[-1]}. Lower lr, keep "
                                         "grad_clip on, or keep standardize on.")

    def open_epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of `epoch`: a resumed epoch replayed from its RNG states, epoch 0 from the pre-pass, or new."""
        set_epoch(self.loader, epoch)
        if self.resumed is not None and epoch == self.resumed.position.epoch:
            self.checkpoints.replay_epoch(self.resumed)  # replay this epoch's order, then skip what was consumed
            return self.batches(skip=self.position.batches)
        if epoch == 0:
            batches = self.prepass.training_batches()  # the pre-pass's features first, then the loader goes on
            self.checkpoints.start_epoch(self.prepass.rng)
        else:
            self.checkpoints.start_epoch()
            batches = self.batches()
        self.position.epoch, self.position.batches = epoch, 0
        return batches

    def batches(self, skip: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """(features, attrs) of one pass over the loader, its first `skip` batches drawn but not run."""
        return iterate_batches(self.loader, self.objective.attributes, self.extract, self.device, self.cfg.amp_dtype,
                               skip)

    def fetch(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Batch | None:
        """The next batch and what the ranks share before its step; None when the epoch has ended (on any rank)."""
        z = b = failure = None
        try:
            z, b = next(batches)
        except StopIteration:
            pass
        except Exception as err:
            if self.ranks.enabled:
                failure = err  # every rank learns of it in the step's all-reduce, and raises
            elif self.stop.signum is not None:
                # The signal also reached a loader worker; the run still stops at a step boundary.
                raise self.interrupted(self.stop.signum, self.save() if self.checkpoints.enabled else None) from err
            else:
                raise
        shared = self.ranks.share(self.objective, b, self.stop.signum is not None, failure, self.position.step)
        if shared is None or z is None:
            return None  # data-parallel: some rank's shard ran out, and every rank ends the epoch here
        return Batch(z, b, shared)

    def after_step(self, shared: Shared) -> None:
        """Progress, a checkpoint when one is due, and the stop at this step boundary when asked for."""
        self.bar.update(1)
        stop_now = self.ranks.stop_after_step(shared, self.stop.signum is not None)
        if self.history.step and self.history.step[-1] == self.position.step - 1:
            self.bar.set_postfix(loss=f"{self.history.loss[-1]:.3f}", club=f"{self.history.debias[-1]:.3f}",
                                 nll=f"{self.history.retain[-1]:.3f}", refresh=False)
        if self.checkpoints.due(self.position.step, stop_now):
            path = self.save()
            if stop_now:
                barrier()  # no rank exits (and gets the others killed) before rank 0 has written
                raise self.interrupted(self.stop.signum or signal.SIGTERM, path)
        elif stop_now:
            raise self.interrupted(self.stop.signum or signal.SIGTERM, None)

    def finish(self) -> None:
        """After the last step: the final checkpoint, and TrainingInterrupted for a signal too late to act on."""
        path = self.checkpoints.save_final(self.objective, self.optimizers, self.position, self.history)
        # A signal after the last flag was read (last step, last fetch): still reported as a stop.
        if self.ranks.any(self.stop.signum is not None):
            if is_main_process():
                path = path or self.checkpoints.newest()
            raise self.interrupted(self.stop.signum or signal.SIGTERM, path if is_main_process() else None)

    def done(self) -> bool:
        """Whether `cfg.max_steps` steps have been taken."""
        return self.cfg.max_steps is not None and self.position.step >= self.cfg.max_steps

    def save(self) -> Path | None:
        """Write a checkpoint of the steps taken (its path on rank 0)."""
        return self.checkpoints.save(self.objective, self.optimizers, self.position, self.history)

    def interrupted(self, signum: int, path: Path | None) -> TrainingInterrupted:
        """The stop at a step boundary: the heads and `history` are those of the `position.step` steps taken."""
        self.history.steps_done = self.position.step
        return TrainingInterrupted(signum, self.position.step, path, rank(), self.history)

    def close(self) -> None:
        """End the progress bar and the pre-pass's pass, and drop the DDP wrappers."""
        self.bar.close()
        self.prepass.close()
        if self.ranks.enabled:
            # Drop the DDP wrappers (and the process group their reducers hold) here: a raised exception's
            # traceback keeps the trainer, and so them, alive while the caller shuts the group down.
            self.h_net = self.est_net = None
            gc.collect()


def train(objective: DeepMinMax, loader: Iterable, extract: Callable[[Tensor], Tensor], cfg: FitConfig,
          device: torch.device, prepass: PrePass | None = None, val_loader: Iterable | None = None) -> FitHistory:
    """Train h_theta, CLUB's q networks and m_phi on a stream of batches; return the loss history.

    The standardisation statistics come from the first `cfg.stats_batches` batches of epoch 0, whose features are
    kept and trained on as the start of epoch 0 (see PrePass); pass the PrePass that sized the heads, if one did.
    Inside an initialised torch.distributed process group each rank streams its own shard (see `sync.RankSync`).
    With `cfg.checkpoint_dir`, checkpoints are written every `cfg.checkpoint_every` steps, at the end and on SIGINT /
    SIGTERM, and `cfg.resume` continues from the newest intact one. A stop signal ends training at a step boundary
    with TrainingInterrupted; `objective` keeps the heads of the steps taken. With `cfg.ema_decay` the run ends with
    the moving average of h_theta's weights (`averaging`); with `val_loader`, with the h_theta (averaged, if so) a
    fresh probe read the attributes from least (`selection`).
    """
    ranks = RankSync(device)
    check_sharded(loader)
    checkpoints = RunCheckpoints(objective, loader, cfg)
    resumed = checkpoints.resume_point()
    if prepass is None:
        prepass = PrePass(loader, objective.attributes, extract, cfg, device, objective.cfg.standardize)
    if resumed is not None:
        prepass.close()  # the checkpoint holds the statistics; its epoch is replayed from its RNG states
        aligning.restore_alignment(objective, resumed, cfg, device)
        selection.restore_selection(objective, resumed, val_loader is not None)
        averaging.restore_average(objective, resumed, cfg)
    else:
        start_from_prepass(objective, prepass, cfg)
        averaging.start_average(objective, cfg)
        if val_loader is not None:
            selection.start_selection(objective, val_loader, extract, cfg, device)
    try:
        history = Trainer(objective, loader, extract, cfg, device, prepass, checkpoints, resumed, ranks).run()
        averaging.finish_average(objective)
        history.selected_step = selection.finish_selection(objective, history.steps_done, history.select_step,
                                                           history.record_selection)
        return history
    finally:
        for target in ("alignment", "selection", "h_average"):  # training state, not part of the fitted model
            if hasattr(objective, target):
                delattr(objective, target)


__all__ = ["FitHistory", "PrePass", "Trainer", "TrainingInterrupted", "train"]
