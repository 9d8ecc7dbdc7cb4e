"""Piecewise alignment: a label-free target for h_theta that moves each attribute group's features onto the others'.

An attribute that is entangled with the content moves and reshapes each piece of the feature distribution (a class,
a mode) differently per group; a pooled penalty (CLUB, MMD, HSIC) cannot see which piece of one group corresponds to
which piece of another, and any permutation satisfies it. This module fixes the correspondence from geometry, on a
bounded sample of standardised features (the training's statistics pre-pass):

1. split the sample into groups: the classes of a categorical attribute, or quantile bins of a continuous one;
2. cluster each group into K pieces (k-means; unless given, K is the silhouette score's most common choice over a
   few groups: `choose_pieces`);
3. match pieces across groups by least movement: a categorical attribute's groups against their barycentre (Hungarian
   assignment, iterated), a continuous attribute's bins in order, each to the previous one (its smoothness);
4. map each group's piece onto the pooled piece by the Gaussian optimal-transport map of its mean and covariance
   (a shift, or a per-coordinate scale, where full covariances would not fit: see `maps`).

Attributes are aligned one after the other, each on the previous one's output. The result, `PiecewiseAlignment`,
needs B and so serves only as a training target: `align_weight * mean((h(z) - T(z, b))^2)` distils it into h_theta,
which needs no B at inference.

Example:
    >>> align = fit_alignment(z_std, b, attributes, clusters=None, bins=8, maps="full", seed=0)
    >>> target = align(z_std, b)   # [N, D]
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..config import AlignShrinkage, Attribute
from .gaussian import TargetCovariance, check_target, gaussian_map, mean_target, oas_shrinkage, shrink_covariance
from .joint import quantile_edges
from .pieces import choose_pieces

MapKind = Literal["full", "diagonal", "shift"]
MIN_PIECE = 3
"""A piece with fewer samples than this is only shifted, not reshaped."""


class AlignmentStage(nn.Module):
    """One attribute's alignment: per group, K centroids (to assign a sample to a piece) and each piece's affine map."""

    def __init__(self, groups: int, clusters: int, dim: int, maps: MapKind, edges: Tensor | None = None) -> None:
        super().__init__()
        self.maps = maps
        self.register_buffer("centroids", torch.zeros(groups, clusters, dim))
        self.register_buffer("source_mean", torch.zeros(groups, clusters, dim))
        """Mean of group g's piece k."""
        self.register_buffer("target_mean", torch.zeros(groups, clusters, dim))
        """Mean of the pooled piece that group g's piece k is matched to."""
        # Every piece starts as the identity map: a group absent from the fitting sample, or a piece too small to
        # estimate a shape from, keeps it.
        identity = (torch.eye(dim).expand(groups, clusters, dim, dim).clone() if maps == "full"
                    else torch.ones(groups, clusters, dim if maps == "diagonal" else 1))
        self.register_buffer("linear", identity)
        self.register_buffer("edges", edges if edges is not None else torch.zeros(0))
        """Quantile edges of a continuous attribute's bins (empty: categorical, the class id is the group)."""
        self.register_buffer("radius", torch.full((groups, clusters), float("inf")))
        """Distance from piece (g, k)'s centroid beyond which a row keeps its features (inf: every row is mapped)."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # States written before pieces had a radius (saves, checkpoints) load with an infinite one: every row mapped,
        # as they were.
        state_dict.setdefault(prefix + "radius", torch.full_like(self.radius, float("inf")))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def groups_of(self, b: Tensor) -> Tensor:
        """The group of each attribute value: its class id, or its bin of `edges`."""
        if self.edges.numel() == 0:
            return b.long()
        return torch.bucketize(b.contiguous(), self.edges.to(b.dtype), right=True)

    def pieces_of(self, z: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample's group (g clamped to the stage's groups) and its nearest piece of that group."""
        g, k, _ = self._nearest(z, g)
        return g, k

    def _nearest(self, z: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`pieces_of`, and each sample's distance to that piece's centroid."""
        g = g.clamp(0, self.centroids.shape[0] - 1)
        dist, k = (z[:, None, :] - self.centroids[g]).pow(2).sum(-1).min(1)  # not cdist: ONNX has no such op
        return g, k, dist.sqrt()

    def apply(self, z: Tensor, g: Tensor) -> Tensor:
        """Group g's map of each sample: its nearest piece's mean moved onto the pooled piece's, its shape mapped.
        A sample farther from that piece's centroid than the piece's `radius` keeps its features: it is unlike the
        rows the map was fitted on (a site never seen, a wrong group prediction), and another piece's map would
        move it somewhere arbitrary."""
        g, k, dist = self._nearest(z, g)
        centred = z - self.source_mean[g, k]
        if self.maps == "full":
            moved = torch.einsum("nij,nj->ni", self.linear[g, k], centred)
        else:
            moved = self.linear[g, k] * centred
        return torch.where((dist > self.radius[g, k])[:, None], z, self.target_mean[g, k] + moved)

    def forward(self, z: Tensor, b: Tensor) -> Tensor:
        """The aligned features of samples z [N, D] with this attribute's values b [N]."""
        if self.edges.numel() == 0:
            return self.apply(z, b.long())
        # A continuous attribute: blend the maps of the two bins whose centres enclose b, so that the target moves
        # smoothly with b (a target that jumps at every bin edge is one h_theta cannot follow from Z alone).
        centres = self.centres.to(b.dtype)
        upper = torch.bucketize(b.contiguous(), centres).clamp(1, len(centres) - 1)
        lower = upper - 1
        weight = (b - centres[lower]) / (centres[upper] - centres[lower]).clamp_min(1e-12)
        # Inside, interpolate; beyond the outer centres, extrapolate the outer segment (by at most its length).
        lo = torch.where(lower == 0, -1.0, 0.0).to(weight.dtype)
        hi = torch.where(upper == len(centres) - 1, 2.0, 1.0).to(weight.dtype)
        weight = torch.minimum(torch.maximum(weight, lo), hi)[:, None]
        return (1 - weight) * self.apply(z, lower) + weight * self.apply(z, upper)

    @property
    def centres(self) -> Tensor:
        """Centres of a continuous attribute's bins: midpoints of the edges, the outer ones mirrored."""
        e = self.edges
        if len(e) == 1:
            return torch.stack([e[0] - 1, e[0] + 1])
        inner = (e[1:] + e[:-1]) / 2
        return torch.cat([(2 * e[:1] - inner[:1]), inner, (2 * e[-1:] - inner[-1:])])


class PiecewiseAlignment(nn.Module):
    """T(z, b): every attribute's `AlignmentStage`, applied in order. A training target only (it needs B)."""

    def __init__(self, stages: list[AlignmentStage]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    @torch.no_grad()
    def forward(self, z: Tensor, b: Tensor) -> Tensor:
        """T(z, b): each attribute's stage on the previous one's output."""
        for k, stage in enumerate(self.stages):
            z = stage(z, b[:, k])
        return z

    @classmethod
    def empty_like(cls, state: dict[str, Tensor], prefix: str = "") -> PiecewiseAlignment:
        """Stages shaped as in a saved `state_dict` (to load a checkpoint into)."""
        stages, k = [], 0
        while f"{prefix}stages.{k}.centroids" in state:
            centroids = state[f"{prefix}stages.{k}.centroids"]
            linear = state[f"{prefix}stages.{k}.linear"]
            maps: MapKind = "full" if linear.dim() == 4 else "shift" if linear.shape[-1] == 1 else "diagonal"
            g, c, d = centroids.shape
            stages.append(AlignmentStage(g, c, d, maps, torch.zeros_like(state[f"{prefix}stages.{k}.edges"])))
            k += 1
        return cls(stages)


class AlignmentTarget(nn.Module):
    """The training target of h_theta, refitted in rounds: T_r(h_r(z), b).

    h_r is a frozen copy of h_theta taken at round r and T_r the alignment fitted on h_r's output for a fixed sample
    of the stream.

    Round 0 aligns Z itself (h_theta starts as the identity with `HeadConfig(residual=True)`). Each later round sees
    what h_theta's distillation of the previous target left of the attribute and aligns that, so the residue shrinks
    from round to round instead of staying as the distillation's error. The piece count is chosen in round 0 and
    kept, so the target's shapes do not change.

    Memory: the sample, `align_samples` x (feature_dim + attributes) floats, plus a copy of h_theta and the maps.
    """

    def __init__(self, h: nn.Module, sample_z: Tensor, sample_b: Tensor, alignment: PiecewiseAlignment) -> None:
        super().__init__()
        import copy

        self.snapshot = copy.deepcopy(h).requires_grad_(False)
        self.alignment = alignment
        self.register_buffer("sample_z", sample_z)
        """The standardised features of the pre-pass sample the alignment is fitted on."""
        self.register_buffer("sample_b", sample_b)
        """Their standardised attributes."""

    @torch.no_grad()
    def forward(self, z_std: Tensor, b: Tensor) -> Tensor:
        """The target of a batch: the alignment of the snapshot's output."""
        return self.alignment(self.snapshot(z_std), b)

    @torch.no_grad()
    def snapshot_features(self, h: nn.Module, chunk: int = 4096) -> Tensor:
        """Take a copy of h and return its output on the sample (on the CPU)."""
        self.snapshot.load_state_dict(h.state_dict())
        return torch.cat([self.snapshot(self.sample_z[i:i + chunk]).cpu() for i in range(0, len(self.sample_z), chunk)])

    @classmethod
    def empty_like(cls, h: nn.Module, state: dict[str, Tensor], prefix: str = "") -> AlignmentTarget:
        """A target shaped as in a saved `state_dict` (to load a checkpoint into)."""
        return cls(h, torch.zeros_like(state[f"{prefix}sample_z"]), torch.zeros_like(state[f"{prefix}sample_b"]),
                   PiecewiseAlignment.empty_like(state, f"{prefix}alignment."))


class PredictedAlignment(nn.Module):
    """h_theta as a fitted alignment that needs no B: T(z, b^(z)), each attribute's value predicted from its stage's
    input by a linear classifier (argmax), then that stage applied. Categorical attributes only: continuous ones
    enter as bins of joint groups (`dmm_wrap.core.joint`, `fit_alignment_head(joint=True)`).

    Where the attribute is linearly readable from Z (a site's tint or stain), the predicted value is the true one and
    the map is the alignment target itself, without the error a distilled MLP adds (`benchmarks/alignment_target.py`).
    Where it is not, a wrong prediction applies another group's map: compare with the distilled h_theta there.
    """

    def __init__(self, alignment: PiecewiseAlignment, predictors: list[nn.Linear]) -> None:
        super().__init__()
        if len(predictors) != len(alignment.stages):
            raise ValueError(f"PredictedAlignment needs one predictor per stage: got {len(predictors)} for "
                             f"{len(alignment.stages)} stages.")
        self.alignment = alignment
        self.predictors = nn.ModuleList(predictors).requires_grad_(False)

    def forward(self, z: Tensor) -> Tensor:
        """The aligned features of standardised features z [N, D], each attribute predicted from z (differentiable
        in z within a piece, as the MLP is: saliency and fine-tuning through the encoder still get gradients)."""
        for stage, predictor in zip(self.alignment.stages, self.predictors):
            z = stage.apply(z, predictor(z).argmax(-1))
        return z

    @classmethod
    def empty(cls, dim: int, groups: list[int], pieces: list[int], maps: MapKind) -> PredictedAlignment:
        """A map shaped as a fitted one with these group and piece counts (to load saved weights into)."""
        if len(groups) != len(pieces):
            raise ValueError(f"One piece count per attribute: got {len(pieces)} for {len(groups)} attributes.")
        stages = [AlignmentStage(g, k, dim, maps) for g, k in zip(groups, pieces)]
        return cls(PiecewiseAlignment(stages), [nn.Linear(dim, g) for g in groups])


def require_categorical(attributes: tuple[Attribute, ...]) -> None:
    """Raise unless every attribute is categorical: the alignment head predicts class ids."""
    continuous = [a.name for a in attributes if a.kind != "categorical"]
    if continuous:
        raise ValueError(f"The alignment head predicts categorical attributes only; {continuous} are continuous. "
                         "Align joint groups instead (fit_alignment_head(joint=True), the default with a continuous "
                         "attribute: bins of each continuous value), or train the distilled alignment with "
                         "fit(config=FitConfig.aligned()).")


def fit_predicted_alignment(z: Tensor, b: Tensor, attributes: tuple[Attribute, ...], clusters: int | list[int] | None,
                            maps: MapKind | None, seed: int, shrinkage: AlignShrinkage = "oas",
                            max_iter: int = 2000, outliers: float | None = None,
                            target: TargetCovariance = "pooled") -> PredictedAlignment:
    """Fit the alignment on standardised features z [N, D] and class ids b [N, A], and per attribute a logistic
    regression (scikit-learn, on standardised inputs; the scaling is folded into a `nn.Linear`) that predicts its
    class from that stage's input. `outliers`, `target`: see `fit_alignment`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    require_categorical(attributes)
    for k, attr in enumerate(attributes):
        seen = sorted(int(c) for c in torch.unique(b[:, k].long()).tolist())
        if len(seen) < 2:
            raise ValueError(f"The sample holds only class {seen} of {attr.name!r}: nothing to align. Shuffle the "
                             "loader or read more samples, so that at least two classes are in it.")
        absent = sorted(set(range(int(attr.num_classes or 0))) - set(seen))
        if absent:
            warnings.warn(f"Classes {absent} of {attr.name!r} are not in the sample: they are never predicted, and "
                          "their rows get another class's map (with outliers=, only those near its pieces). Shuffle "
                          "the loader or read more samples.",
                          stacklevel=3)
    alignment = fit_alignment(z, b, attributes, clusters, 8, maps, seed, shrinkage, outliers, target)
    predictors, x = [], z.detach().float().cpu()
    for k, (attr, stage) in enumerate(zip(attributes, alignment.stages)):
        groups = b[:, k].long().cpu()
        scaler = StandardScaler().fit(x.double().numpy())
        model = LogisticRegression(max_iter=max_iter).fit(scaler.transform(x.double().numpy()), groups.numpy())
        count = int(attr.num_classes or int(groups.max()) + 1)
        coef = np.zeros((count, x.shape[1]))
        bias = np.full(count, -1e4)  # a class absent from the sample is never predicted
        classes = model.classes_.astype(int)
        if len(classes) == 2:  # scikit-learn keeps one row: the logit of the second class against the first
            coef[classes[1]], bias[classes[0]], bias[classes[1]] = model.coef_[0], 0.0, model.intercept_[0]
        else:
            coef[classes], bias[classes] = model.coef_, model.intercept_
        coef = coef / scaler.scale_
        bias = bias - coef @ scaler.mean_
        linear = nn.Linear(x.shape[1], count)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(coef))
            linear.bias.copy_(torch.from_numpy(bias))
        predictors.append(linear)
        if k < len(attributes) - 1:
            x = stage(x, b[:, k].float().cpu())
    return PredictedAlignment(alignment, predictors)


def default_maps(dim: int) -> MapKind:
    """Full covariance maps up to 256 features (groups x K x D^2 floats), a per-coordinate scale beyond."""
    return "full" if dim <= 256 else "diagonal"


def fit_alignment(z: Tensor, b: Tensor, attributes: tuple[Attribute, ...], clusters: int | list[int] | None,
                  bins: int, maps: MapKind | None, seed: int, shrinkage: AlignShrinkage = 0.1,
                  outliers: float | None = None, target: TargetCovariance = "pooled") -> PiecewiseAlignment:
    """Fit the alignment on a sample of standardised features z [N, D] and attributes b [N, A] (class ids, values).

    Args:
        clusters: pieces per group, for all attributes or one per attribute (None: `choose_pieces`, the silhouette
            score's most common choice, from 2 to 12, over up to 5 groups).
        bins: quantile bins of a continuous attribute.
        maps: "full" (Gaussian OT map of each piece's covariance), "diagonal" or "shift"; None: `default_maps`.
        shrinkage: each piece's covariance is shrunk towards its mean variance by this fraction (few samples per
            piece in many dimensions), or by the OAS fraction of its sample size ("oas").
        outliers: a quantile q in (0, 1]: each piece's `radius` is the q-quantile of its rows' distances to its
            centroid, and a row beyond it keeps its features (None: every row is mapped).
        target: the covariance each group's piece is mapped onto: the pooled piece's ("pooled"), or the geometric
            or harmonic mean of the groups' own plus the spread of their means (`gaussian.mean_target`).
    """
    check_outliers(outliers)
    check_target(target)
    x = z.detach().double().cpu().numpy()
    cols = b.detach().double().cpu().numpy()
    maps = maps or default_maps(x.shape[1])
    stages = []
    for k, attr in enumerate(attributes):
        col = cols[:, k]
        if attr.kind == "categorical":
            groups, edges = col.astype(int), None
            count = int(attr.num_classes or groups.max() + 1)
        else:
            edges = quantile_edges(col, bins)
            groups, count = np.searchsorted(edges, col, side="right"), len(edges) + 1
        sizes = np.bincount(groups, minlength=count)
        present = [g for g in range(count) if sizes[g] > 0]
        smallest = min(sizes[g] for g in present)
        given = clusters[k] if isinstance(clusters, list) else clusters
        pieces = given or choose_pieces(x, groups, present, seed)
        pieces = max(1, min(pieces, smallest // 2))
        stage = _fit_stage(x, groups, count, present, pieces, attr.kind == "continuous", maps, seed, shrinkage,
                           None if edges is None else torch.from_numpy(edges).float(), outliers, target)
        stages.append(stage)
        if k < len(attributes) - 1:  # the next stage's input (a [N, D, D] gather with full maps): not after the last
            x = stage(torch.from_numpy(x).float(), torch.from_numpy(col).float()).double().numpy()
    return PiecewiseAlignment(stages)


def _fit_stage(x: np.ndarray, groups: np.ndarray, count: int, present: list[int], pieces: int, ordered: bool,
               maps: MapKind, seed: int, shrinkage: AlignShrinkage, edges: Tensor | None,
               outliers: float | None = None, target: TargetCovariance = "pooled") -> AlignmentStage:
    from sklearn.cluster import KMeans

    dim = x.shape[1]
    centroids = np.zeros((count, pieces, dim))
    assign = np.zeros(len(x), dtype=int)
    for g in present:
        km = KMeans(pieces, n_init=5, random_state=seed).fit(x[groups == g])
        centroids[g], assign[groups == g] = km.cluster_centers_, km.labels_
    slots = _match(centroids, present, ordered)  # slots[g, k]: the pooled piece group g's piece k belongs to
    slot_of = slots[groups, assign]
    stage = AlignmentStage(count, pieces, dim, maps, edges)
    diagonal = maps == "diagonal"
    for s in range(pieces):
        members = [(g, int(np.flatnonzero(slots[g] == s)[0])) for g in present]
        rows = [x[(groups == g) & (assign == k)] for g, k in members]
        # Too few rows to estimate a shape: that piece is only moved (None).
        covs = [_covariance(own, shrinkage, diagonal) if len(own) >= MIN_PIECE and maps != "shift" else None
                for own in rows]
        pooled = x[slot_of == s]
        mu = pooled.mean(0)
        if maps == "shift":
            cov = None
        elif target == "pooled":
            cov = _covariance(pooled, shrinkage, diagonal)
        else:
            cov = _mean_of(rows, covs, target)
        for (g, k), own, own_cov in zip(members, rows, covs):
            stage.source_mean[g, k] = torch.from_numpy(own.mean(0))
            if outliers is not None:
                stage.radius[g, k] = float(np.quantile(np.linalg.norm(own - centroids[g, k], axis=1), outliers))
            stage.target_mean[g, k] = torch.from_numpy(mu)
            if own_cov is None:
                continue
            stage.linear[g, k] = torch.from_numpy(gaussian_map(own_cov, cov) if maps == "full"
                                                  else np.sqrt(cov / own_cov))
    stage.centroids[present] = torch.from_numpy(centroids[present]).float()
    stage.slots = slots  # fit time only (not saved): which pooled piece each group's piece is matched to
    return stage


def _mean_of(rows: list[np.ndarray], covs: list[np.ndarray | None], kind: TargetCovariance) -> np.ndarray | None:
    """`mean_target` of one matched piece's groups: their rows and their covariances (None: too few rows; None if
    no group has one, and then every group's piece is only moved)."""
    if all(c is None for c in covs):
        return None
    shape = next(c.shape for c in covs if c is not None)
    stacked = np.stack([np.zeros(shape) if c is None else c for c in covs])
    return mean_target(np.stack([r.mean(0) for r in rows]), stacked, np.array([len(r) for r in rows], float),
                       np.array([c is not None for c in covs]), kind)  # type: ignore[arg-type]


def _match(centroids: np.ndarray, present: list[int], ordered: bool) -> np.ndarray:
    """Which pooled piece each group's piece belongs to, by least movement: in order along a continuous attribute's
    bins (each bin to the previous one), or against the groups' barycentre (iterated) for a categorical one."""
    from scipy.optimize import linear_sum_assignment

    count, pieces, _ = centroids.shape
    slots = np.tile(np.arange(pieces), (count, 1))

    def assign(own: np.ndarray, ref: np.ndarray) -> np.ndarray:
        rows, cols = linear_sum_assignment(((own[:, None] - ref[None]) ** 2).sum(-1))
        out = np.empty(pieces, dtype=int)
        out[rows] = cols
        return out

    if ordered:
        ref = centroids[present[0]]
        for g in present[1:]:
            slots[g] = assign(centroids[g], ref)
            ref = np.empty_like(ref)
            ref[slots[g]] = centroids[g]
        return slots
    ref = centroids[present[0]]
    for _ in range(10):
        for g in present:
            slots[g] = assign(centroids[g], ref)
        new = np.zeros_like(ref)
        for g in present:
            new[slots[g]] += centroids[g] / len(present)
        if np.allclose(new, ref):
            break
        ref = new
    return slots


def check_outliers(outliers: object, name: str = "outliers") -> None:
    """Raise, with what was expected, unless `outliers` is None or a quantile in (0, 1]."""
    if outliers is not None and (isinstance(outliers, bool) or not isinstance(outliers, (int, float))
                                 or not 0 < outliers <= 1):
        raise ValueError(f"{name} must be None (map every row) or a quantile in (0, 1] such as 0.99, got {outliers!r}.")


def _covariance(x: np.ndarray, shrinkage: AlignShrinkage, diagonal: bool = False) -> np.ndarray:
    """The shrunk covariance of the rows x [N, D], or with `diagonal` their shrunk variances [D] alone."""
    if diagonal:
        return shrink_covariance(x.var(0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1]), shrinkage, len(x))
    cov = np.cov(x.T) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
    return shrink_covariance(np.atleast_2d(cov), shrinkage, len(x))


__all__ = ["AlignmentStage", "AlignmentTarget", "PiecewiseAlignment", "PredictedAlignment", "default_maps",
           "check_outliers", "fit_alignment", "fit_predicted_alignment", "oas_shrinkage",
           "require_categorical"]
