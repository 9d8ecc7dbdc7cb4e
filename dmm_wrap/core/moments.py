"""Streamed re-estimation of a fitted categorical alignment stage: each piece's moments accumulated batch by batch, and
its means and maps recomputed from them (`DebiasedEncoder.fit_alignment_head` with `stream=True`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..config import AlignShrinkage
from .alignment import MIN_PIECE, AlignmentStage
from .gaussian import TargetCovariance, check_target, gaussian_map, mean_target, shrink_covariance


class PieceMoments:
    """The count, sum and sum of squares (outer products for full maps) of one categorical stage's rows, per group
    and piece, accumulated batch by batch in float64 about each piece's centroid: what the stage's maps are estimated
    from, so that they can be re-estimated from a whole stream in bounded memory (groups x pieces x D^2 floats for
    full maps) after the pieces were found and matched on a sample (`refit_maps`)."""

    def __init__(self, stage: AlignmentStage) -> None:
        if stage.edges.numel():
            raise ValueError("PieceMoments takes a categorical stage (a continuous one blends two bins' maps).")
        groups, pieces, dim = stage.centroids.shape
        self.count = torch.zeros(groups * pieces, dtype=torch.float64)
        self.total = torch.zeros(groups * pieces, dim, dtype=torch.float64)
        shape = (groups * pieces, dim, dim) if stage.maps == "full" else (groups * pieces, dim)
        self.squares = torch.zeros(shape, dtype=torch.float64)

    @torch.no_grad()
    def add(self, stage: AlignmentStage, z: Tensor, b: Tensor) -> None:
        """Add rows z [N, D] (the stage's input) of classes b [N], each in its own group's nearest piece."""
        g, k = stage.pieces_of(z, b.long())
        x = z.double() - stage.centroids[g, k].double()
        cell = (g * stage.centroids.shape[1] + k).cpu()
        x = x.cpu()
        self.count.index_add_(0, cell, torch.ones(len(cell), dtype=torch.float64))
        self.total.index_add_(0, cell, x)
        if self.squares.dim() == 2:
            self.squares.index_add_(0, cell, x * x)
            return
        for c in torch.unique(cell).tolist():
            rows = x[cell == c]
            self.squares[c] += rows.T @ rows


def refit_maps(stage: AlignmentStage, moments: PieceMoments, shrinkage: AlignShrinkage = "oas",
               target: TargetCovariance = "pooled") -> None:
    """Re-estimate a fitted stage's means and maps from `moments`, keeping its pieces and their matching (the
    stage must come from `fit_alignment` in this process: the matching is not saved). `target`: see
    `fit_alignment`."""
    check_target(target)
    slots = getattr(stage, "slots", None)
    if slots is None:
        raise ValueError("refit_maps needs a stage fitted in this process (its matching of pieces is not saved).")
    groups, pieces, dim = stage.centroids.shape
    count = moments.count.numpy().reshape(groups, pieces)
    total = moments.total.numpy().reshape(groups, pieces, dim)
    full = moments.squares.dim() == 3
    squares = moments.squares.numpy().reshape((groups, pieces, dim, dim) if full else (groups, pieces, dim))
    centre = stage.centroids.double().numpy()
    present = [g for g in range(groups) if count[g].sum() > 0]

    def raw_moments(g: int, k: int) -> tuple[float, np.ndarray, np.ndarray]:
        """n, the sum and the sum of squares (outer products) of piece (g, k)'s rows about the origin."""
        n, t, c = count[g, k], total[g, k], centre[g, k]
        second = (squares[g, k] + np.outer(t, c) + np.outer(c, t) + n * np.outer(c, c) if full
                  else squares[g, k] + 2 * t * c + n * c * c)
        return n, t + n * c, second

    def mean_cov(parts: list[tuple[float, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """The mean and the shrunk covariance (variances, for diagonal maps) of the pooled parts."""
        n = sum(p[0] for p in parts)
        mu = sum(p[1] for p in parts) / n
        second = sum(p[2] for p in parts)
        spread = (second - n * (np.outer(mu, mu) if full else mu * mu)) / max(n - 1, 1)
        return mu, shrink_covariance(spread, shrinkage, n)

    for s in range(pieces):
        cells = [(g, int(np.flatnonzero(slots[g] == s)[0])) for g in present]
        cells = [(g, k) for g, k in cells if count[g, k] > 0]
        if not cells:
            continue
        mu, cov = mean_cov([raw_moments(g, k) for g, k in cells])
        owns = [mean_cov([raw_moments(g, k)]) for g, k in cells]
        rows = np.array([count[g, k] for g, k in cells])
        if target != "pooled" and stage.maps != "shift":
            cov = mean_target(np.stack([o[0] for o in owns]), np.stack([o[1] for o in owns]), rows,
                              rows >= MIN_PIECE, target)
        for (g, k), (own_mu, own_cov) in zip(cells, owns):
            stage.source_mean[g, k] = torch.from_numpy(own_mu)
            stage.target_mean[g, k] = torch.from_numpy(mu)
            if stage.maps == "shift":
                continue
            if count[g, k] < MIN_PIECE:  # too few to estimate a shape: the piece is only moved
                stage.linear[g, k] = (torch.eye(dim) if full else torch.ones(dim))
            elif full:
                stage.linear[g, k] = torch.from_numpy(gaussian_map(own_cov, cov))
            else:  # own_cov and cov are the shrunk variances
                stage.linear[g, k] = torch.from_numpy(np.sqrt(cov / own_cov))


__all__ = ["PieceMoments", "refit_maps"]
