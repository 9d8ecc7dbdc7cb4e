"""Within-group isometry: h_theta keeps the distances between samples that share their attributes.

Without task labels, a term that only makes the groups' Z~ alike (CLUB, group matching) is indifferent to which
content of one group lands on which content of another, and to what happens inside a group: h_theta may fold,
merge or scramble each group's features as long as the groups end up looking the same. This term pins the inside
of each group. Over the pairs of a batch that share their attributes (the same class of every categorical attribute;
continuous attributes weighted by a Gaussian kernel of their standardised difference), it adds the mean squared
difference between the Euclidean distance of the two samples' Z~ and of their standardised Z, per feature. It is zero
when h_theta moves every group rigidly, and the groups are then free to be aligned with one another: a Gromov-
Wasserstein-style prior (keep the geometry within each group, match the groups). Measured on the digits encoder
trained without labels, with the group-matching term: it kept far more of the digit than the defaults (task 0.765
vs 0.284) but removed almost none of the site (0.970; README, "The label-free encoder"), so it is off by default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import Attribute


def pair_weights(b: Tensor, attributes: tuple[Attribute, ...], bandwidth: float) -> Tensor:
    """[N, N] weights of the pairs of a batch that share their attributes, 0 on the diagonal.

    Args:
        b: attributes [N, K], continuous columns standardised (`DeepMinMax.normalize_attrs`), categorical ones class
            ids.
        bandwidth: width of the Gaussian kernel on each continuous attribute's difference, in its standard deviations.
    """
    n = len(b)
    w = torch.ones(n, n, dtype=b.dtype, device=b.device)
    for k, attr in enumerate(attributes):
        col = b[:, k]
        if attr.kind == "categorical":
            w = w * (col[:, None] == col[None, :]).to(b.dtype)
        else:
            d = col[:, None] - col[None, :]
            w = w * torch.exp(-0.5 * (d / bandwidth) ** 2)
    return w.fill_diagonal_(0.0)


def distances(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Euclidean distances [N, N] between the rows of x, differentiable everywhere (also at 0)."""
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    return (d2 + eps).sqrt()


def isometry_loss(z_std: Tensor, z_tilde: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean over pairs of (|z~_i - z~_j| - |z_i - z_j|)^2 / D, D the width of z_std (0 with no weight)."""
    gap = distances(z_tilde) - distances(z_std.to(z_tilde.dtype)).detach()
    return (weights * gap.pow(2)).sum() / weights.sum().clamp_min(1e-12) / z_std.shape[1]


__all__ = ["distances", "isometry_loss", "pair_weights"]
