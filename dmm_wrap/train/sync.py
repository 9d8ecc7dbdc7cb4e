"""What the ranks of a data-parallel run share around a training step; in one process, the one-process answers."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..core.objective import DeepMinMax
from .distributed import all_reduce_sum, gather_over_ranks, is_distributed, mean_over_ranks


class Shared(NamedTuple):
    """What the ranks share at the start of a step."""

    sums: Tensor | None
    """CLUB's pair sums over the global batch (None in one process: the batch's own)."""
    stop: bool
    """Whether any rank was asked to stop (data-parallel; one process reads its flag after the step)."""


class RankSync:
    """The data-parallel side of training: DDP wrappers, the one all-reduce per step, the losses over ranks.

    Inside an initialised process group of several processes (`enabled`), CLUB's negative pairs are drawn from the
    global batch by summing the few numbers they need of B over ranks, and the same all-reduce carries three flags:
    a rank that failed, a rank whose shard ran out (every rank then ends the epoch, so uneven shards cannot
    desynchronise the ranks), and a rank that was signalled to stop. In one process every call is the one-process
    no-op.
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = is_distributed()
        """Whether training is data-parallel."""
        self.device = device
        if self.enabled and device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's collectives (and the object ones) run on the current device
        self.mean = mean_over_ranks if self.enabled else None
        """Mean over ranks of a tensor (None in one process)."""
        self.gather = gather_over_ranks if self.enabled else None
        """Differentiable concatenation over ranks (None in one process)."""

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in DistributedDataParallel (as it is in one process)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def share(self, objective: DeepMinMax, b: Tensor | None, stop: bool, failure: BaseException | None,
              step: int) -> Shared | None:
        """The one all-reduce at the start of a data-parallel step; None: some rank ran out of data (end the epoch).

        `b` is this rank's batch of attributes (None: its shard ran out, or `failure` came instead). If any rank
        failed, every rank raises: the failed one its own error, the others a RuntimeError pointing to it.
        """
        if not self.enabled:
            return Shared(None, False)
        width = objective.pair_width
        sums = (objective.pair_sums(objective.normalize_attrs(b)) if b is not None
                else torch.zeros(width, device=self.device))
        flags = [float(stop), float(failure is not None), float(b is None and failure is None)]
        packed = all_reduce_sum(torch.cat([sums, sums.new_tensor(flags)]))
        any_stop, any_failure, any_exhausted = (v > 0 for v in packed[width:].tolist())
        if failure is not None:
            raise failure
        if any_failure:
            raise RuntimeError(f"Step {step}: another process failed (its error is in its own log); stopping this one.")
        if any_exhausted:
            return None
        return Shared(packed[:width], any_stop)

    def takes(self, z: Tensor) -> bool:
        """Whether to step on a batch: in one process, not on fewer than 2 samples (CLUB's pairs need two).

        Data-parallel, every rank takes every step: each takes part in the step's collectives.
        """
        return self.enabled or z.shape[0] >= 2

    def stop_after_step(self, shared: Shared, signalled: bool) -> bool:
        """Whether to stop after this step: as the ranks agreed at its start, or in one process, as signalled now."""
        return shared.stop or (not self.enabled and signalled)

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (collective when data-parallel)."""
        if not self.enabled:
            return flag
        return all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0


__all__ = ["RankSync", "Shared"]
