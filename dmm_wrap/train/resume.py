"""The checkpoints of one training run: the point it resumes from, and the writes at step boundaries."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, FitConfig
from ..core.objective import DeepMinMax
from .checkpoint import Checkpoint, Checkpointer, Position, capture_rng, check_fingerprint, restore_rng
from .distributed import all_gather_object, broadcast_object, fail_together, is_main_process, rank, world_size
from .history import FitHistory


def fingerprint(objective: DeepMinMax, loader: Iterable) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming from it, the same on every rank.

    That is the heads, the attributes, the number of processes and each rank's batches per epoch (the checkpoint's
    position counts batches). Collective under torch.distributed.
    """
    try:
        batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        batches = None
    return {"feature_dim": objective.feature_dim, "out_dim": objective.out_dim,
            "attributes": [a.to_dict() for a in objective.attributes], "head": dataclasses.asdict(objective.cfg),
            "world_size": world_size(), "batches_per_epoch": all_gather_object(batches)}


def _replace_earlier_run(checkpointer: Checkpointer, overwrite: bool) -> None:
    """A new run: refuse a checkpoint_dir holding an earlier run's checkpoints, unless told to overwrite them.

    Overwritten ones are removed when this run writes its first checkpoint.
    """
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


class RunCheckpoints:
    """Where a run resumes from, and its checkpoint writes; without `cfg.checkpoint_dir` it writes nothing."""

    def __init__(self, objective: DeepMinMax, loader: Iterable, cfg: FitConfig) -> None:
        self.cfg, self.loader = cfg, loader
        self.checkpointer = (Checkpointer(cfg.checkpoint_dir, cfg.checkpoint_every, cfg.keep_checkpoints)
                             if cfg.checkpoint_dir is not None else None)
        """The checkpoint folder (None: no checkpoint_dir)."""
        if self.checkpointer is not None and getattr(loader, "persistent_workers", False) and is_main_process():
            warnings.warn("The DataLoader has persistent_workers=True: its workers outlive epochs, so a resumed run "
                          "cannot reproduce their random state, and a SIGTERM sent to the whole process group reaches "
                          "them. Use persistent_workers=False for exact resumes.", stacklevel=4)
        self.fingerprint = fingerprint(objective, loader) if self.checkpointer is not None else {}
        """The run's `fingerprint`, recorded in each checkpoint and checked on resume."""
        self.epoch_rng: dict[str, Any] = {}
        """This rank's RNG states at the start of the current epoch, from which a resume replays it."""
        self.saved_at: int | None = None
        """The step of the last checkpoint this run wrote or resumed from."""

    @property
    def enabled(self) -> bool:
        """Whether the run writes checkpoints."""
        return self.checkpointer is not None

    def resume_point(self) -> Checkpoint | None:
        """The checkpoint to continue from, chosen by rank 0 and read by every rank, or None for a new run.

        Every rank raises if any rank cannot read it or it does not fit this run.
        """
        checkpointer, cfg = self.checkpointer, self.cfg
        if checkpointer is None:
            if cfg.resume:
                raise ValueError("resume=True needs checkpoint_dir: the folder the interrupted run wrote its "
                                 "checkpoints to.")
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
            check_fingerprint(found.fingerprint, self.fingerprint, found.path)
        assert found is not None
        if cfg.max_steps is not None and found.position.step > cfg.max_steps and is_main_process():
            warnings.warn(f"The checkpoint is at step {found.position.step}, beyond max_steps={cfg.max_steps}: "
                          "nothing to train; its heads are loaded as they are.", stacklevel=3)
        self.saved_at = found.position.step
        return found

    def replay_epoch(self, resumed: Checkpoint) -> None:
        """Put back the RNG states the checkpoint's epoch started from, so the loader replays its order."""
        self.epoch_rng = resumed.rng[rank()]
        with fail_together("restoring the RNG states"):
            restore_rng(self.epoch_rng, self.loader)

    def start_epoch(self, rng: dict[str, Any] | None = None) -> None:
        """A new epoch starts: record `rng`, its starting RNG states (None: captured now, with checkpoints)."""
        if rng is None:
            rng = capture_rng(self.loader) if self.checkpointer is not None else {}
        self.epoch_rng = rng

    def due(self, step: int, stop: bool) -> bool:
        """Whether to write a checkpoint after `step` steps: every `checkpoint_every` steps, and on a stop."""
        return self.checkpointer is not None and (step % self.checkpointer.every == 0 or stop)

    def save(self, objective: DeepMinMax, optimizers: dict[str, torch.optim.Optimizer], position: Position,
             history: FitHistory) -> Path | None:
        """Write a checkpoint (rank 0: its path); every rank raises if the write failed, so none waits for the others."""
        assert self.checkpointer is not None
        rngs = all_gather_object(self.epoch_rng)
        path = None
        with fail_together(f"Step {position.step}: writing the checkpoint"):  # disk full on rank 0: all ranks stop
            if is_main_process():
                path = self.checkpointer.save(objective, optimizers, position, history.as_dict(), rngs,
                                              self.fingerprint)
        self.saved_at = position.step
        return path

    def save_final(self, objective: DeepMinMax, optimizers: dict[str, torch.optim.Optimizer], position: Position,
                   history: FitHistory) -> Path | None:
        """At the end of a run: a checkpoint of its last step, unless one was written there already."""
        if self.checkpointer is None or self.saved_at == position.step:
            return None
        return self.save(objective, optimizers, position, history)

    def newest(self) -> Path | None:
        """The newest checkpoint in the folder (None without checkpoints)."""
        return self.checkpointer.paths()[0] if self.checkpointer is not None else None


__all__ = ["RunCheckpoints", "fingerprint"]
