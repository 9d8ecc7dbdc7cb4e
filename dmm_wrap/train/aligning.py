"""Rounds of the alignment target (`dmm_wrap.core.alignment`) during training.

Round 0 is fitted on the pre-pass's sample, the next ones every `align_every` steps; a resumed run loads the
checkpoint's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import FitConfig
from ..core.alignment import AlignmentTarget, PiecewiseAlignment, fit_alignment
from ..core.objective import DeepMinMax
from .checkpoint import Checkpoint
from .distributed import all_gather_rows, broadcast_object, fail_together, is_main_process


def fit_alignment_target(objective: DeepMinMax, z: Tensor, b: Tensor, cfg: FitConfig) -> AlignmentTarget:
    """Round 0 of the alignment target, from the pre-pass's sample of raw features and attributes.

    Data-parallel: the ranks' samples (each `cfg.align_samples // world_size()` at most) are gathered on every rank.
    """
    z, b = all_gather_rows(z, b, device=objective.feature_mean.device)
    with torch.no_grad():
        z_std, b_std = objective.normalize(z), objective.normalize_attrs(b)
    target = AlignmentTarget(objective.h, z_std, b_std, PiecewiseAlignment([]))
    refit_alignment(objective, target, cfg)
    return target


def refit_alignment(objective: DeepMinMax, target: AlignmentTarget, cfg: FitConfig) -> None:
    """Start a round of the alignment target: copy h_theta, fit the alignment on its output for the sample.

    Rank 0 fits; every rank receives the buffers. The piece counts of round 0 are kept.
    """
    features = target.snapshot_features(objective.h)
    state = None
    if is_main_process():
        clusters = ([stage.centroids.shape[1] for stage in target.alignment.stages] if len(target.alignment.stages)
                    else cfg.align_clusters)
        fitted = fit_alignment(features, target.sample_b.cpu(), objective.attributes, clusters, cfg.align_bins,
                               cfg.align_maps, seed=0, shrinkage=cfg.align_shrinkage)
        state = {k: v.cpu() for k, v in fitted.state_dict().items()}
    state = broadcast_object(state)
    alignment = PiecewiseAlignment.empty_like(state)
    alignment.load_state_dict(state)
    target.alignment = alignment.to(target.sample_z.device)


def refit_if_due(objective: DeepMinMax, cfg: FitConfig, step: int) -> None:
    """Before step `step`: start the next round of `objective.alignment` every `cfg.align_every` steps."""
    if cfg.align_weight > 0 and step > 0 and step % cfg.align_every == 0:
        with fail_together(f"Step {step}: refitting the alignment target"):
            refit_alignment(objective, objective.alignment, cfg)


def restore_alignment(objective: DeepMinMax, resumed: Checkpoint, cfg: FitConfig, device: torch.device) -> None:
    """A resumed run: an empty alignment target for the checkpoint's to load into (with align_weight > 0)."""
    aligning = cfg.align_weight > 0
    if resumed.require_same("alignment.", aligning, "the alignment term", f"align_weight={cfg.align_weight:g}"):
        objective.alignment = AlignmentTarget.empty_like(objective.h, resumed.heads, "alignment.").to(device)


__all__ = ["fit_alignment_target", "refit_alignment", "refit_if_due", "restore_alignment"]
