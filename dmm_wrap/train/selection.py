"""Model selection by a fresh probe: with `fit(..., val_loader=)`, h_theta is scored on a held-out sample every
`select_every` steps and at the end, and the run ends with the h_theta a freshly trained probe read the attributes
from least.

The online adversary (CLUB's q) is fooled rather than beaten, and the alignment rounds swing from round to round, so
the last step is not the best one; a probe trained from scratch on each candidate's output says which is. The
sample is read once, at the start of a new run (`select_samples` features and attributes, kept with the checkpoints);
nothing is read from the training stream. The probe (scikit-learn) draws nothing from torch's random streams:
selection changes no other draw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..config import Attribute, EvalConfig, FitConfig
from ..core.objective import DeepMinMax
from ..data.batches import iterate_batches
from . import averaging
from .checkpoint import Checkpoint
from .distributed import all_gather_rows, broadcast_object, is_main_process, world_size

PROBE_HIDDEN = (128, 128)
"""Hidden widths of the selection probe (as the leakage benchmark's fresh MLP probe)."""
PROBE_MAX_ITER = 300
"""Epochs at most of each probe (early stopping on a tenth of its training half usually ends it sooner)."""


class Selection(nn.Module):
    """The validation sample (standardised features, attributes) and the best h_theta so far, as buffers."""

    def __init__(self, sample_z: Tensor, sample_b: Tensor, best_h: Tensor) -> None:
        super().__init__()
        self.register_buffer("sample_z", sample_z)
        self.register_buffer("sample_b", sample_b)
        self.register_buffer("best_h", best_h)
        """h_theta's parameters as one vector (`parameters_to_vector`) at the best check so far."""
        self.register_buffer("best_score", torch.tensor(float("inf"), device=sample_z.device))
        self.register_buffer("best_step", torch.tensor(-1, device=sample_z.device))

    @classmethod
    def empty_like(cls, heads: dict[str, Tensor], prefix: str = "selection.") -> Selection:
        """A Selection shaped like the one saved under `prefix` in a checkpoint's heads."""
        return cls(torch.empty_like(heads[prefix + "sample_z"]), torch.empty_like(heads[prefix + "sample_b"]),
                   torch.empty_like(heads[prefix + "best_h"]))


def read_sample(loader: Iterable, attributes: tuple[Attribute, ...], extract: Callable[[Tensor], Tensor],
                device: torch.device, amp_dtype: str | None, n: int) -> tuple[Tensor, Tensor]:
    """The first `n` (features, attributes) of `loader`, read without touching the global random state."""
    zs: list[Tensor] = []
    bs: list[Tensor] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for z, b in iterate_batches(loader, attributes, extract, device, amp_dtype):
            zs.append(z.float())
            bs.append(b)
            if sum(len(t) for t in zs) >= n:
                break
    if not zs:
        raise ValueError("val_loader is empty: it produced no batch. Pass a loader of held-out (inputs, attrs) "
                         "batches, or leave val_loader=None to keep the last step's heads.")
    return torch.cat(zs)[:n], torch.cat(bs)[:n]


def start_selection(objective: DeepMinMax, loader: Iterable, extract: Callable[[Tensor], Tensor], cfg: FitConfig,
                    device: torch.device) -> None:
    """A new run: read the validation sample (every rank's, gathered) and attach `objective.selection`."""
    per_rank = -(-cfg.select_samples // world_size())
    z, b = read_sample(loader, objective.attributes, extract, device, cfg.amp_dtype, per_rank)
    z, b = all_gather_rows(z, b, device=device)
    with torch.no_grad():
        z = objective.normalize(z)
    if len(z) < 16:
        raise ValueError(f"val_loader gave {len(z)} samples; the selection probe needs at least 16 (half to train, "
                         "half to score). Pass a larger validation set.")
    objective.selection = Selection(z, b, parameters_to_vector(objective.h.parameters()).detach().clone())


def restore_selection(objective: DeepMinMax, resumed: Checkpoint, selecting: bool) -> None:
    """A resumed run: an empty Selection for the checkpoint's to load into, when the run that wrote it selected."""
    has = resumed.holds("selection.")
    if selecting and not has:
        raise ValueError(f"{resumed.path} was written by a run without val_loader; resume it without val_loader, or "
                         "start a new run in another checkpoint_dir.")
    if has:
        objective.selection = Selection.empty_like(resumed.heads).to(objective.feature_mean.device)


def probe_leakage(z: Tensor, b: Tensor, attributes: Sequence[Attribute], seed: int = 0) -> float:
    """How well a fresh MLP probe (`dmm_wrap.probes`, early stopping) reads the attributes from `z`, above chance,
    in [0, 1]: the largest over attributes of (balanced accuracy - 1/K) / (1 - 1/K), or of max(R^2, 0). Trained on
    one half of the rows (a fixed random half), scored on the other."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    from ..probes import mlp_leakage

    x = z.detach().double().cpu().numpy()
    y = b.detach().double().cpu().numpy()
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[: len(x) // 2], order[len(x) // 2:]
    cfg = EvalConfig(mlp_hidden=PROBE_HIDDEN, mlp_max_iter=PROBE_MAX_ITER, seed=seed)
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe capped by max_iter still measures leakage
        for k, attr in enumerate(attributes):
            score = mlp_leakage(x[train], y[train, k], x[test], y[test, k], attr, cfg)
            if attr.kind == "categorical":
                chance = 1.0 / len(np.unique(y[test, k]))
                score = (score - chance) / (1.0 - chance) if chance < 1.0 else 0.0  # one class: nothing to read
            scores.append(max(0.0, score))
    return max(scores)


def check(objective: DeepMinMax, step: int, record: Callable[[int, float], None]) -> None:
    """Score the current h_theta (its moving average, with `FitConfig.ema_decay`) on the sample (rank 0; broadcast)
    and keep it when it leaks least so far."""
    sel: Selection = objective.selection
    h = averaging.scored(objective)
    score = None
    if is_main_process():
        with torch.no_grad():
            z_tilde = h(sel.sample_z)
        score = probe_leakage(z_tilde, sel.sample_b, objective.attributes)
    score = float(broadcast_object(score))
    record(step, score)
    if score <= float(sel.best_score):  # a tie goes to the later, more trained h_theta
        sel.best_score.fill_(score)
        sel.best_step.fill_(step)
        sel.best_h.copy_(parameters_to_vector(h.parameters()).detach())


def check_if_due(objective: DeepMinMax, cfg: FitConfig, step: int, record: Callable[[int, float], None]) -> None:
    """Before step `step` (h_theta as `step` steps left it): a check every `cfg.select_every` steps."""
    if hasattr(objective, "selection") and step > 0 and step % cfg.select_every == 0:
        check(objective, step, record)


def finish_selection(objective: DeepMinMax, step: int, checked: Sequence[int],
                     record: Callable[[int, float], None]) -> int | None:
    """After the last step: a check of the last h_theta (unless `checked`, the steps checked so far, holds it), then
    h_theta takes the best parameters; returns their step."""
    if not hasattr(objective, "selection"):
        return None
    sel: Selection = objective.selection
    if not checked or checked[-1] != step:
        check(objective, step, record)
    with torch.no_grad():
        vector_to_parameters(sel.best_h.clone(), objective.h.parameters())
    return int(sel.best_step)


__all__ = ["PROBE_HIDDEN", "PROBE_MAX_ITER", "Selection", "check", "check_if_due", "finish_selection", "probe_leakage",
           "read_sample", "restore_selection", "start_selection"]
