"""Streamed training: each batch goes backbone -> hook -> heads and is dropped; no feature is ever cached."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import Attribute, FitConfig
from .objective import DeepMinMax


@dataclass
class FitHistory:
    """Loss terms recorded during `fit`, one entry per logged step."""

    step: list[int] = field(default_factory=list)
    """Index of the h_theta step (0-based, counting warm-up steps)."""
    loss: list[float] = field(default_factory=list)
    """lam * L_d + (1 - lam) * L_r."""
    debias: list[float] = field(default_factory=list)
    """L_d, the CLUB estimate of I(B; Z~) summed over attributes (nats)."""
    retain: list[float] = field(default_factory=list)
    """L_r, -log m_phi(Z | Z~, B)."""
    q_nll: list[float] = field(default_factory=list)
    """Fit loss of CLUB's q networks."""
    club: dict[str, list[float]] = field(default_factory=dict)
    """CLUB estimate per attribute."""
    steps_done: int = 0
    """Total optimisation steps taken."""

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "debias": self.debias, "retain": self.retain,
                "q_nll": self.q_nll, "club": self.club, "steps_done": self.steps_done}


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
        nb = x.shape[0]
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        delta = mb - self.mean
        total = self.n + nb
        self.mean = self.mean + delta * nb / total
        self.m2 = self.m2 + m2b + delta**2 * self.n * nb / total
        self.n = total
        return self

    @property
    def std(self) -> Tensor:
        var = self.m2 / max(self.n - 1, 1)
        return var.sqrt().clamp_min(1e-6)


def autocast(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def iterate_batches(loader: Iterable, attributes: tuple[Attribute, ...], extract: Callable[[Tensor], Tensor],
                    device: torch.device, amp_dtype: str | None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (features, attrs) for each batch of one pass over `loader`, validated, on `device`."""
    for batch_idx, batch in enumerate(loader):
        inputs, attrs = split_batch(batch, batch_idx)
        n = len(inputs)
        b = attrs_tensor(attrs, attributes, n, batch_idx).to(device, non_blocking=True)
        inputs = inputs.to(device, non_blocking=True)
        with torch.no_grad(), autocast(device, amp_dtype):
            z = extract(inputs)
        z = z.float()
        check_features(z, batch_idx)
        yield z, b


def estimate_statistics(objective: DeepMinMax, loader: Iterable, extract: Callable[[Tensor], Tensor],
                        cfg: FitConfig, device: torch.device) -> None:
    """Fill the standardisation buffers from a streamed pass over up to `cfg.stats_batches` batches."""
    attributes = objective.attributes
    zs = RunningMoments(objective.feature_dim)
    bs = RunningMoments(len(attributes))
    batches = iterate_batches(loader, attributes, extract, device, cfg.amp_dtype)
    for z, b in itertools.islice(batches, cfg.stats_batches):
        zs.update(z)
        bs.update(b)
    if zs.n == 0:
        raise ValueError("The loader is empty: it produced no batch. Check the dataset and drop_last.")
    if zs.n < 2:
        raise ValueError("The loader gave fewer than 2 samples; standardisation statistics need at least 2.")
    objective.feature_mean.copy_(zs.mean.float())
    objective.feature_std.copy_(zs.std.float())
    continuous = torch.tensor([a.kind == "continuous" for a in attributes])
    objective.attr_mean.copy_(torch.where(continuous, bs.mean.float(), torch.zeros(())))
    objective.attr_std.copy_(torch.where(continuous, bs.std.float(), torch.ones(())))


def train(objective: DeepMinMax, loader: Iterable, extract: Callable[[Tensor], Tensor], cfg: FitConfig,
          device: torch.device) -> FitHistory:
    """Train h_theta, CLUB's q networks and m_phi on a stream of batches; return the loss history."""
    from tqdm.auto import tqdm

    if objective.cfg.standardize:
        estimate_statistics(objective, loader, extract, cfg, device)
    fused = {"foreach": True}
    opt_h = torch.optim.Adam(objective.h.parameters(), lr=cfg.lr, **fused)
    opt_est = torch.optim.Adam(objective.estimator_parameters(), lr=cfg.estimator_lr or cfg.lr, **fused)
    history = FitHistory(club={a.name: [] for a in objective.attributes})
    try:
        total = len(loader) * cfg.epochs  # type: ignore[arg-type]
    except TypeError:
        total = None
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps) if total is not None else cfg.max_steps
    bar = tqdm(total=total, disable=not cfg.progress, desc="dmm_wrap fit", dynamic_ncols=True)
    step = 0
    try:
        for _epoch in range(cfg.epochs):
            seen = 0
            for z, b in iterate_batches(loader, objective.attributes, extract, device, cfg.amp_dtype):
                seen += 1
                if z.shape[0] < 2:
                    continue  # CLUB's pairwise term needs at least two samples
                b = objective.normalize_attrs(b)
                z_std = objective.normalize(z)
                # h_theta runs once per batch: the estimator steps use its detached output and the
                # theta step reuses the same graph, so nothing is recomputed.
                z_tilde = objective.h(z_std)
                for _ in range(cfg.estimator_steps):
                    est = objective.estimator_losses(z_std, z_tilde, b, cfg.nll_reduction)
                    opt_est.zero_grad(set_to_none=True)
                    (est.q_nll + est.m_nll).backward()
                    opt_est.step()
                losses = objective.theta_losses(z_std, z_tilde, b, cfg.lam, cfg.nll_reduction)
                if step >= cfg.warmup_steps:
                    opt_h.zero_grad(set_to_none=True)
                    losses.total.backward(inputs=list(objective.h.parameters()))
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(objective.h.parameters(), cfg.grad_clip, foreach=True)
                    opt_h.step()
                if step % cfg.log_every == 0:
                    _record(history, step, losses, est.q_nll)
                    if not math.isfinite(history.loss[-1]):
                        raise FloatingPointError(
                            f"Step {step}: the loss became {history.loss[-1]}. Lower lr, keep grad_clip on, "
                            "or keep standardize on."
                        )
                    bar.set_postfix(loss=f"{history.loss[-1]:.3f}", club=f"{history.debias[-1]:.3f}",
                                    nll=f"{history.retain[-1]:.3f}", refresh=False)
                bar.update(1)
                step += 1
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            if seen == 0:
                raise ValueError("The loader is empty: it produced no batch. Check the dataset and drop_last.")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    finally:
        bar.close()
    history.steps_done = step
    return history


def _record(history: FitHistory, step: int, losses: Any, q_nll: Tensor) -> None:
    values = torch.stack([losses.total, losses.debias, losses.retain, q_nll, *losses.club.values()]).tolist()
    history.step.append(step)
    history.loss.append(values[0])
    history.debias.append(values[1])
    history.retain.append(values[2])
    history.q_nll.append(values[3])
    for name, v in zip(losses.club, values[4:]):
        history.club[name].append(v)


__all__ = ["FitHistory", "train", "RunningMoments", "split_batch", "attrs_tensor"]
