"""The DeepMinMax heads and losses: h_theta, one CLUB estimator per attribute, the retaining density m_phi."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Attribute, HeadConfig
from .alignment import PredictedAlignment, default_maps, require_categorical
from .estimators import CategoricalCLUB, ConditionalGaussian, GaussianCLUB, Residual, mlp
from .isometry import isometry_loss, pair_weights
from .matching import default_projections, group_ids, random_directions, sliced_group_discrepancy


class EstimatorLosses(NamedTuple):
    """Losses that fit the variational networks (on detached Z~)."""

    q_nll: Tensor
    """Sum over attributes of -log q(b | z~): how well CLUB's q is fitted."""
    m_nll: Tensor
    """-log m_phi(z | z~, b)."""


class ThetaLosses(NamedTuple):
    """Losses of h_theta for one batch."""

    total: Tensor
    """lam * debias + (1 - lam) * retain + match_weight * match + align_weight * align + iso_weight * iso."""
    debias: Tensor
    """L_d: CLUB upper bound of I(B; Z~), summed over attributes."""
    retain: Tensor
    """L_r: -log m_phi(Z | Z~, B)."""
    club: dict[str, Tensor]
    """CLUB estimate per attribute."""
    match: Tensor
    """Group-matching term: sliced Wasserstein distance of each attribute group's Z~ to the batch's (0 when off)."""
    align: Tensor
    """Piecewise-alignment term: mean squared distance of Z~ to its aligned target (0 when off)."""
    iso: Tensor
    """Within-group isometry term (`dmm_wrap.core.isometry`; 0 when off)."""


class DeepMinMax(nn.Module):
    """Heads of the method, with the feature and attribute standardisation statistics as buffers.

    CLUB with several attributes uses a factorised q(b | z~) = prod_k q_k(b_k | z~): its CLUB estimate of the joint
    I(B; Z~) is then exactly the sum of the per-attribute estimates over the same batch.
    """

    def __init__(self, feature_dim: int, attributes: tuple[Attribute, ...], cfg: HeadConfig) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.attributes = attributes
        self.cfg = cfg
        out_dim = cfg.out_dim or feature_dim
        self.out_dim = out_dim
        if cfg.align_head_pieces is not None:
            if cfg.align_head_groups is None:
                require_categorical(attributes)
            groups = cfg.align_head_groups or [int(a.num_classes or 0) for a in attributes]
            self.h: nn.Module = PredictedAlignment.empty(feature_dim, list(groups), list(cfg.align_head_pieces),
                                                         cfg.align_head_maps or default_maps(feature_dim))
        else:
            h = mlp(feature_dim, cfg.h_hidden or feature_dim, out_dim, cfg.h_layers)
            self.h = Residual(h) if cfg.residual else h
        q_hidden = cfg.q_hidden or feature_dim
        self.q = nn.ModuleDict({
            a.name: CategoricalCLUB(out_dim, q_hidden, a.num_classes, cfg.q_floor) if a.kind == "categorical"
            else GaussianCLUB(out_dim, q_hidden, cfg.logvar_min, cfg.logvar_max)
            for a in attributes
        })
        b_width = sum(a.width for a in attributes)
        self.m = ConditionalGaussian(out_dim + b_width, cfg.m_hidden or feature_dim, feature_dim, cfg.m_layers,
                                     cfg.logvar_min, cfg.logvar_max)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.register_buffer("attr_mean", torch.zeros(len(attributes)))
        self.register_buffer("attr_std", torch.ones(len(attributes)))

    def normalize(self, z: Tensor) -> Tensor:
        """Standardise features with the pre-pass's statistics."""
        return (z - self.feature_mean) / self.feature_std

    def normalize_attrs(self, b: Tensor) -> Tensor:
        """Standardise continuous columns; categorical columns (class ids) are left as they are."""
        return (b - self.attr_mean) / self.attr_std

    def debias(self, z: Tensor) -> Tensor:
        """Z~ = h_theta(standardised Z)."""
        return self.h(self.normalize(z))

    def condition(self, z_tilde: Tensor, b: Tensor) -> Tensor:
        """The input of m_phi: Z~ with each attribute appended (one-hot or standardised value)."""
        parts = [z_tilde]
        for k, a in enumerate(self.attributes):
            col = b[:, k]
            parts.append(F.one_hot(col.long(), a.num_classes).to(z_tilde.dtype) if a.kind == "categorical" else col[:, None])
        return torch.cat(parts, dim=1)

    def estimator_losses(self, z_std: Tensor, z_tilde: Tensor, b: Tensor, reduction: str) -> EstimatorLosses:
        """Losses that fit CLUB's q networks and m_phi on a batch (Z~ detached: h_theta gets no gradient)."""
        z_tilde = z_tilde.detach()
        q_nll = sum(q.nll(z_tilde, b[:, k]) for k, q in enumerate(self.q.values()))
        m_nll = self.m.nll(z_std, self.condition(z_tilde, b), reduction)
        return EstimatorLosses(q_nll, m_nll)  # type: ignore[arg-type]

    @property
    def pair_width(self) -> int:
        """Length of `pair_sums`."""
        return 1 + sum(q.pair_width for q in self.q.values())

    def pair_sums(self, b: Tensor) -> Tensor:
        """[n, then each attribute's pair sums]: all that CLUB's pairwise (negative) term needs of a batch's B.

        Data-parallel training sums this vector over ranks (a few floats) so that the negatives of every rank are
        drawn from the global batch, exactly as in one process with the global batch."""
        parts = [torch.full((1,), float(b.shape[0]), device=b.device)]  # a fill, not a host-to-device copy
        parts += [q.pair_sums(b[:, k]) for k, q in enumerate(self.q.values())]
        return torch.cat(parts)

    def match_loss(self, z_tilde: Tensor, b: Tensor, step: int, projections: int | None, bins: int,
                   gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The group-matching term on a batch (`dmm_wrap.core.matching`), with step `step`'s random directions.

        Args:
            gather: concatenates a tensor over data-parallel ranks, differentiably (default: this batch alone). The
                directions are the same on every rank, so each rank computes the term of the global batch.
        """
        count = projections or default_projections(self.out_dim)
        directions = random_directions(self.out_dim, count, step, z_tilde.device)
        projected = z_tilde @ directions
        if gather is not None:
            projected, b = gather(projected), gather(b)
        return sliced_group_discrepancy(projected, group_ids(b, self.attributes, bins), self.out_dim)

    def theta_losses(self, z_std: Tensor, z_tilde: Tensor, b: Tensor, lam: float, reduction: str,
                     sums: Tensor | None = None, mean_over_ranks: Callable[[Tensor], Tensor] | None = None,
                     match: Tensor | None = None, match_weight: float = 0.0, target: Tensor | None = None,
                     align_weight: float = 0.0, iso_weight: float = 0.0, iso_bandwidth: float = 0.2) -> ThetaLosses:
        """Losses of h_theta on a batch.

        Args:
            sums: `pair_sums` of the batch the CLUB negatives come from (default: this batch).
            mean_over_ranks: maps this rank's value of the (detached) CLUB sum to its mean over ranks; the clamp
                at 0 is then decided on the global value, as one process with the global batch would.
            match: the batch's `match_loss` (None: the term is off), weighted by `match_weight`.
            target: the batch's aligned target (`dmm_wrap.core.alignment`; None: the term is off), weighted by
                `align_weight`.
            iso_weight: weight of the within-group isometry term (0: off), its kernel `iso_bandwidth` wide.
        """
        if sums is None:
            sums = self.pair_sums(b)
        n, offset, club = sums[0], 1, {}
        for k, (name, q) in enumerate(self.q.items()):
            club[name] = q.club_terms(z_tilde, b[:, k], sums[offset:offset + q.pair_width], n).mean()
            offset += q.pair_width
        # The true MI is >= 0: a negative batch estimate only says q lags behind h_theta, and pushing it further
        # down rewards making q predict the wrong class, which leaves B just as decodable.
        debias = torch.stack(list(club.values())).sum()
        overall = debias.detach() if mean_over_ranks is None else mean_over_ranks(debias.detach())
        debias = debias * (overall > 0)
        retain = self.m.nll(z_std, self.condition(z_tilde, b), reduction)
        total = lam * debias + (1 - lam) * retain
        if match is None:
            match = total.new_zeros(())
        else:
            total = total + match_weight * match
        if target is None:
            align = total.new_zeros(())
        else:
            align = (z_tilde - target).pow(2).mean()
            total = total + align_weight * align
        if iso_weight > 0:
            iso = isometry_loss(z_std, z_tilde, pair_weights(b, self.attributes, iso_bandwidth))
            total = total + iso_weight * iso
        else:
            iso = total.new_zeros(())
        return ThetaLosses(total, debias, retain, club, match, align, iso)

    def estimator_parameters(self) -> list[nn.Parameter]:
        """Parameters of CLUB's q networks and m_phi (the estimator optimiser's)."""
        return list(self.q.parameters()) + list(self.m.parameters())


__all__ = ["DeepMinMax", "EstimatorLosses", "ThetaLosses"]
