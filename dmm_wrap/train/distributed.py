"""Data-parallel training on torch.distributed: process-group setup for torchrun, rank queries, sharding.

Only the heads are data-parallel (each wrapped in DistributedDataParallel by the trainer); the frozen backbone runs
outside DDP under no_grad on each rank's own shard of the data. Nothing here all-reduces gradients: DDP does.

    torchrun --nproc-per-node 4 -m dmm_wrap fit configs/camelyon17.yaml --device cuda
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes of the group (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes files, prints results and pushes to the Hub."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher setting WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None) -> str | None:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).

    NCCL when `device` is CUDA, gloo otherwise. A bare "cuda" becomes "cuda:LOCAL_RANK", one GPU per process.
    Returns the device this rank should use. Without torchrun's environment (or with WORLD_SIZE=1) nothing is
    initialised and `device` is returned unchanged.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device is not None and device.startswith("cuda")
    if cuda:
        if device != "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(f"device {device!r} would put every process of this node on one GPU; pass --device cuda "
                             "and each process takes the GPU of its LOCAL_RANK.")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine; "
                             "use --device cpu (gloo backend) or run on a GPU node.")
        if device == "cuda":
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def shutdown(sync: bool = True) -> None:
    """Leave the process group (no-op when none is initialised).

    With `sync` (a normal exit, every rank calling it), the ranks first meet at a barrier and drop unreachable
    objects, so that no rank tears its connections down while another still uses them. Pass sync=False on an error
    path, where another rank may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank arrives here (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors for collectives live: this process's GPU under NCCL, the CPU otherwise."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Collective around a block that may fail on some ranks only: every rank learns whether any rank failed.

    The failed rank re-raises its own error, the others raise a RuntimeError naming `what` and pointing to it, so no
    rank is left waiting in a later collective. Outside a process group the block runs as it is.
    """
    if not is_distributed():
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:
        error = err
    failed = torch.tensor([float(error is not None)], device=collective_device())
    dist.all_reduce(failed, op=dist.ReduceOp.SUM)
    if error is not None:
        raise error
    if failed.item() > 0:
        raise RuntimeError(f"{what}: another process failed (its error is in its own log); stopping this one.")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over ranks in place (identity outside a process group) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_tensor(tensor: Tensor) -> list[Tensor]:
    """Every rank's `tensor` (same shape on every rank), in rank order."""
    if not is_distributed():
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of `value` over ranks (a new tensor; `value` itself is left as it is)."""
    return all_reduce_sum(value.clone()) / world_size()


def gather_over_ranks(value: Tensor) -> Tensor:
    """`value` of every rank concatenated along dim 0; gradients flow back to each rank's own part."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(value.contiguous()))


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (a small picklable value, e.g. RNG states), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(*tensors: Tensor, device: torch.device) -> tuple[Tensor, ...]:
    """Each tensor's rows from every rank, concatenated in rank order on `device` (small samples: sent as objects)."""
    parts = all_gather_object(tuple(t.cpu() for t in tensors))
    return tuple(torch.cat([p[i] for p in parts]).to(device) for i in range(len(tensors)))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a small picklable value, e.g. the checkpoint rank 0 chose)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_sharded(loader: Iterable) -> None:
    """Warn when a map-style DataLoader would feed every rank the same samples (no DistributedSampler)."""
    from torch.utils.data import DataLoader, IterableDataset
    from torch.utils.data.distributed import DistributedSampler

    if not is_distributed() or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return
    sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
    if not isinstance(sampler, DistributedSampler):
        warnings.warn(
            f"Training on {world_size()} processes with a DataLoader whose sampler is {type(sampler).__name__}: "
            "every rank sees the same samples. Pass sampler=DistributedSampler(dataset) so each rank reads its own "
            "shard.", stacklevel=3)


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Let a DistributedSampler (or any sampler with set_epoch) reshuffle for this epoch."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "launched_by_torchrun", "init_from_env",
           "shutdown", "barrier", "collective_device", "fail_together", "all_reduce_sum", "all_gather_tensor",
           "mean_over_ranks", "gather_over_ranks", "all_gather_object", "all_gather_rows", "broadcast_object", "check_sharded",
           "set_epoch"]
