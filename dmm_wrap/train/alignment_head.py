"""The alignment head: h_theta as a fitted alignment applied with each attribute predicted from Z
(`dmm_wrap.core.alignment.PredictedAlignment`), fitted in one bounded pass instead of `fit`'s training loop.

`AlignmentHeadMixin` gives `DebiasedEncoder` its `fit_alignment_head` method; it uses the encoder's attributes,
feature extractor, heads and head config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, get_args

import torch

from ..config import AlignMaps, AlignShrinkage, Attribute, check_shrinkage
from ..core.alignment import PredictedAlignment, check_outliers, fit_predicted_alignment, require_categorical
from ..core.gaussian import TargetCovariance, check_target
from ..core.joint import JointGroups, check_bins
from ..core.moments import PieceMoments, refit_maps
from ..data.batches import iterate_batches


class AlignmentHeadMixin:
    """`fit_alignment_head` for `DebiasedEncoder`."""

    attributes: Any
    extractor: Any
    heads: Any
    head_config: Any
    device: Any
    _build_heads: Any
    _require_heads: Any

    def fit_alignment_head(self, loader: Iterable, *, clusters: int | list[int] | None = None, samples: int = 8192,
                           maps: AlignMaps | None = None, seed: int = 0, stream: bool = True,
                           shrinkage: AlignShrinkage = "oas", joint: bool | None = None,
                           bins: int = 4, outliers: float | None = None,
                           target: TargetCovariance = "geometric") -> PredictedAlignment:
        """Make h_theta a fitted alignment that needs no B at inference, instead of training the MLP with `fit`.

        Reads `samples` rows of `(inputs, attrs)` batches through the frozen backbone, standardises them, fits the
        piecewise alignment of `dmm_wrap.core.alignment` (each attribute group's pieces moved onto the pooled ones)
        and, per attribute, a logistic regression that predicts its class from Z. Z~ is then T(z, b^(z)). With one
        attribute and `stream` (the default), it then reads the rest of the loader once and re-estimates every
        piece's mean and map from all the rows it read, accumulated batch by batch (`PieceMoments`: groups x pieces
        x D^2 floats, no rows kept); the pieces, their matching and the predictor stay the sample's.
        With `joint`, every combination of the attributes' classes and bins is one group of one stage (so streamed
        too); otherwise they are aligned one after the other. It suits attributes a linear model reads from Z (a
        tint, a stain, a rotation the encoder encodes): where one is not, a wrong prediction applies another
        group's map. Fit it on many more rows than a probe gets (conv, test: a probe trained on 1,500 rows reads the
        site at 0.461 after a head fitted on as many, 0.354 on 4x). It saves, loads and runs as any model.

        Args:
            clusters: pieces per group, for all attributes or one per attribute (None: `core.pieces.choose_pieces`).
            samples: rows the pieces, their matching and the predictor are fitted on (held in memory).
            stream: with one attribute, re-estimate the maps from every row of the loader (one pass); False stops
                reading after `samples` rows. With several attributes only the sample is read.
            maps: per-piece maps, "full", "diagonal" or "shift" (None: full up to 256 features). Full maps gather
                [N, D, D] per batch (270 MB for 1,024 rows of 256 features): use smaller batches, or "diagonal".
            seed: k-means seed.
            joint: align the joint groups (`dmm_wrap.core.joint`; None: when an attribute is continuous, which
                False refuses). On digits they removed all three attributes; one after the other broke the digit.
            bins: quantile bins of each continuous attribute in the joint groups (edges from the sample).
            outliers: a row farther from its piece's centroid than this quantile of the sample's distances in that
                piece keeps its features (None: every row is mapped): a site never seen in training is not moved by
                a seen group's maps.
            shrinkage: each piece's covariance is shrunk towards its mean variance, by the OAS fraction of its row
                count ("oas") or a fraction in [0, 1] (conv, val, seeds 0, 1: "oas" 0.458, 0.1 0.560, 0 0.701).
            target: what each group's piece is mapped onto: "geometric", "harmonic" (`core.gaussian.mean_target`)
                or "pooled", the pooled piece's covariance (until 2026-12-02), which stretched thin groups.

        Returns:
            The fitted map (also `self.heads.h`).

        Example:
            >>> encoder.fit_alignment_head(loader, clusters=4)
            >>> z_tilde = encoder(images)
        """
        if joint is None:
            joint = any(a.kind != "categorical" for a in self.attributes)
        if not joint:
            require_categorical(self.attributes)
        stages = 1 if joint else len(self.attributes)
        _check_arguments(stages, clusters, samples, maps, stream, shrinkage, joint, bins, outliers, target)
        # HeadConfig's own check that the head fits this encoder (out_dim), before the backbone pass.
        dataclasses.replace(self.head_config, align_head_pieces=[1] * stages)
        device = self.device
        batches = iterate_batches(loader, self.attributes, self.extractor, device, None)
        read = _read_sample(batches, samples)
        z, b = read[0][:samples], read[1][:samples]
        if self.heads is None:
            self._build_heads(z.shape[1])
        heads = self._require_heads()
        if self.head_config.standardize:
            mean, std = z.mean(0), z.std(0).clamp_min(1e-6)
        else:
            mean, std = torch.zeros(z.shape[1]), torch.ones(z.shape[1])
        groups, attributes, b = _stage_groups(b, self.attributes, joint, bins)
        head = fit_predicted_alignment((z - mean) / std, b, attributes, clusters, maps, seed, shrinkage,
                                       outliers=outliers, target=target)
        if stream and len(attributes) == 1 and len(read[0]) >= samples:
            _refit_from_stream(head, read, batches, mean, std, shrinkage, groups, target)
        self.head_config = dataclasses.replace(
            self.head_config, align_head_pieces=[int(st.centroids.shape[1]) for st in head.alignment.stages],
            align_head_maps=head.alignment.stages[0].maps,
            align_head_groups=[int(st.centroids.shape[0]) for st in head.alignment.stages] if joint else None)
        heads.cfg = self.head_config
        heads.feature_mean.copy_(mean)
        heads.feature_std.copy_(std)
        heads.h = head.to(device)
        heads.eval()
        return head


def _stage_groups(b: torch.Tensor, attributes: tuple[Attribute, ...], joint: bool, bins: int
                  ) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[Attribute, ...], torch.Tensor]:
    """What the alignment is fitted on: the map from a batch's attribute rows to the single stage's groups (used
    when streaming), the stages' attributes, and the sample's class ids: the attributes as they are, or their joint
    groups as one attribute (edges of the bins from the sample b)."""
    if not joint:
        return (lambda cols: cols[:, 0]), attributes, b
    joined = JointGroups.fit(b, attributes, bins)
    return joined, (joined.attribute(),), joined(b)[:, None]


def _read_sample(batches: Iterator, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z, B) of the first batches, on the CPU, until `samples` rows are read (the last batch whole)."""
    zs, bs, n = [], [], 0
    for z, b in batches:
        zs.append(z.cpu())
        bs.append(b.cpu())
        n += len(z)
        if n >= samples:
            break
    if n < 2:
        raise ValueError(f"The loader gave {n} rows; fit_alignment_head needs at least 2 (and a few per piece).")
    return torch.cat(zs), torch.cat(bs)


def _check_arguments(attributes: int, clusters: object, samples: object, maps: object, stream: object,
                     shrinkage: object, joint: object, bins: object, outliers: object, target: object) -> None:
    """Raise, with what was expected, on a bad argument of `fit_alignment_head` (before the backbone pass);
    `attributes` is the number of stages (1 for joint groups)."""
    if not isinstance(joint, bool):
        raise ValueError(f"joint must be True, False or None, got {joint!r}.")
    check_bins(bins)
    check_outliers(outliers)
    check_target(target)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}.")
    counts = clusters if isinstance(clusters, list) else [clusters]
    if (isinstance(clusters, list) and len(clusters) != attributes) or not all(
            c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 1) for c in counts):
        raise ValueError(f"clusters must be None, an int >= 1 or a list of one per stage ({attributes}: one per "
                         f"attribute, or 1 for joint groups), got "
                         f"{clusters!r}.")
    if not isinstance(stream, bool):
        raise ValueError(f"stream must be True or False, got {stream!r}.")
    check_shrinkage(shrinkage, "shrinkage")
    if maps is not None and maps not in get_args(AlignMaps):
        raise ValueError(f"maps must be one of {get_args(AlignMaps)} or None, got {maps!r}.")


def _refit_from_stream(head: PredictedAlignment, read: tuple[torch.Tensor, torch.Tensor], batches: Iterator,
                       mean: torch.Tensor, std: torch.Tensor, shrinkage: AlignShrinkage,
                       groups: Callable[[torch.Tensor], torch.Tensor], target: TargetCovariance) -> None:
    """Re-estimate the single stage's maps from every row: those already `read` (the sample's included) and the rest
    of `batches`, whose moments are accumulated batch by batch; the pieces and their matching stay the sample's.
    `groups` maps a batch's attribute rows to the stage's group ids."""
    stage = head.alignment.stages[0]
    moments = PieceMoments(stage)
    moments.add(stage, (read[0] - mean) / std, groups(read[1]))
    for z, b in batches:
        moments.add(stage, (z.cpu() - mean) / std, groups(b.cpu()))
    refit_maps(stage, moments, shrinkage, target)


__all__ = ["AlignmentHeadMixin"]
