"""Batches as training reads them: (inputs, attrs) parsed and validated, inputs run through the frozen backbone."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable
from typing import Any

import torch
from torch import Tensor

from ..config import Attribute


def split_batch(batch: Any, batch_idx: int) -> tuple[Any, Any]:
    """(inputs, attrs) from a batch: a tuple/list starting with them, or a mapping with 'inputs' and 'attrs'.

    Later items of a tuple/list (task labels kept for evaluation, say) are ignored.
    """
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
    """Refuse NaN or infinite features from the backbone, naming the batch."""
    if not torch.isfinite(z).all():
        raise ValueError(
            f"Batch {batch_idx}: the backbone produced NaN or infinite features. Check the inputs of this batch "
            "(NaN pixels?) and, with amp_dtype='float16', try 'bfloat16'."
        )


def autocast(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    """torch.autocast on `device` to `dtype` (a torch dtype's name), or a no-op when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def iterate_batches(loader: Iterable, attributes: tuple[Attribute, ...], extract: Callable[[Tensor], Tensor],
                    device: torch.device, amp_dtype: str | None,
                    skip: int = 0) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Yield validated (features, attrs) on `device` for each batch of one pass over `loader`.

    `loader` may also be an iterator: the pass it already is. The first `skip` batches are drawn from the loader but
    not run through the backbone (to resume mid-epoch).
    """
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


__all__ = ["split_batch", "attrs_tensor", "check_features", "autocast", "iterate_batches"]
