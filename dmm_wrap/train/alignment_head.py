"""The alignment head: h_theta as a fitted alignment applied with each attribute predicted from Z
(`dmm_wrap.core.alignment.PredictedAlignment`), fitted in one bounded pass instead of `fit`'s training loop.

`AlignmentHeadMixin` gives `DebiasedEncoder` its `fit_alignment_head` method; it uses the encoder's attributes,
feature extractor, heads and head config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any, get_args

import torch

from ..config import AlignMaps, AlignShrinkage, check_shrinkage
from ..core.alignment import PredictedAlignment, fit_predicted_alignment, require_categorical
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
                           shrinkage: AlignShrinkage = "oas") -> PredictedAlignment:
        """Make h_theta a fitted alignment that needs no B at inference, instead of training the MLP with `fit`.

        Reads `samples` rows of `(inputs, attrs)` batches through the frozen backbone, standardises them, fits the
        piecewise alignment of `dmm_wrap.core.alignment` (each attribute group's pieces moved onto the pooled ones)
        and, per attribute, a logistic regression that predicts its class from Z. Z~ is then T(z, b^(z)). With one
        attribute and `stream` (the default), it then reads the rest of the loader once and re-estimates every
        piece's mean and map from all the rows it read, accumulated batch by batch (`PieceMoments`: groups x pieces
        x D^2 floats, no rows kept); the pieces, their matching and the predictor stay the sample's.
        Categorical attributes; it suits one a linear model reads from Z (a tint, a stain): where it is not, a wrong
        prediction applies another group's map (`benchmarks/alignment_target.py`). Fit it on many more rows than a
        probe gets: on the suite's conv problem a fresh probe trained on 1,500 others reads the site at 0.461 when
        the head was fitted on as many, 0.354 on 4x (chance 0.333, raw 1.000; test split, seeds 0-2). The model
        then saves, loads and runs as any other; `fit` refuses it.

        Args:
            clusters: pieces per group, for all attributes or one per attribute (None: the silhouette score's).
            samples: rows the pieces, their matching and the predictor are fitted on (held in memory: samples x
                feature_dim floats).
            stream: with one attribute, re-estimate the maps from every row of the loader (one pass); False stops
                reading after `samples` rows. With several attributes only the sample is read.
            maps: per-piece maps, "full", "diagonal" or "shift" (None: full up to 256 features). Full maps gather a
                [N, D, D] tensor per batch at inference (about 270 MB for 1,024 rows of 256 features): use smaller
                batches, or "diagonal".
            seed: k-means seed.
            shrinkage: each piece's covariance is shrunk towards its mean variance before its map is fitted: by the
                Oracle Approximating Shrinkage fraction of its own row count ("oas", the default: little for pieces
                of many rows, more for few rows in many dimensions), or by a fixed fraction in [0, 1]. On the
                suite's val split (seeds 0, 1) "oas" read 0.458 on conv (0.1: 0.560, 0: 0.701 with the task lost)
                and 0.340 at 4x its rows (0.1: 0.379, 0: 0.325).

        Returns:
            The fitted map (also `self.heads.h`).

        Example:
            >>> encoder.fit_alignment_head(loader, clusters=4)
            >>> z_tilde = encoder(images)
        """
        require_categorical(self.attributes)
        _check_arguments(len(self.attributes), clusters, samples, maps, stream, shrinkage)
        # HeadConfig's own check that the head fits this encoder (out_dim), before the backbone pass.
        dataclasses.replace(self.head_config, align_head_pieces=[1] * len(self.attributes))
        device = self.device
        zs, bs, n = [], [], 0
        batches = iterate_batches(loader, self.attributes, self.extractor, device, None)
        for z, b in batches:
            zs.append(z.cpu())
            bs.append(b.cpu())
            n += len(z)
            if n >= samples:
                break
        if n < 2:
            raise ValueError(f"The loader gave {n} rows; fit_alignment_head needs at least 2 (and a few per piece).")
        read = (torch.cat(zs), torch.cat(bs))
        z, b = read[0][:samples], read[1][:samples]
        if self.heads is None:
            self._build_heads(z.shape[1])
        heads = self._require_heads()
        if self.head_config.standardize:
            mean, std = z.mean(0), z.std(0).clamp_min(1e-6)
        else:
            mean, std = torch.zeros(z.shape[1]), torch.ones(z.shape[1])
        head = fit_predicted_alignment((z - mean) / std, b, self.attributes, clusters, maps, seed, shrinkage)
        if stream and len(self.attributes) == 1 and n >= samples:
            _refit_from_stream(head, read, batches, mean, std, shrinkage)
        self.head_config = dataclasses.replace(
            self.head_config, align_head_pieces=[int(st.centroids.shape[1]) for st in head.alignment.stages],
            align_head_maps=head.alignment.stages[0].maps)
        heads.cfg = self.head_config
        heads.feature_mean.copy_(mean)
        heads.feature_std.copy_(std)
        heads.h = head.to(device)
        heads.eval()
        return head


def _check_arguments(attributes: int, clusters: object, samples: object, maps: object, stream: object,
                     shrinkage: object) -> None:
    """Raise, with what was expected, on a bad argument of `fit_alignment_head` (before the backbone pass)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}.")
    counts = clusters if isinstance(clusters, list) else [clusters]
    if (isinstance(clusters, list) and len(clusters) != attributes) or not all(
            c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 1) for c in counts):
        raise ValueError(f"clusters must be None, an int >= 1 or a list of one per attribute ({attributes}), got "
                         f"{clusters!r}.")
    if not isinstance(stream, bool):
        raise ValueError(f"stream must be True or False, got {stream!r}.")
    check_shrinkage(shrinkage, "shrinkage")
    if maps is not None and maps not in get_args(AlignMaps):
        raise ValueError(f"maps must be one of {get_args(AlignMaps)} or None, got {maps!r}.")


def _refit_from_stream(head: PredictedAlignment, read: tuple[torch.Tensor, torch.Tensor], batches: Iterator,
                       mean: torch.Tensor, std: torch.Tensor, shrinkage: AlignShrinkage) -> None:
    """Re-estimate the single stage's maps from every row: those already `read` (the sample's included) and the rest
    of `batches`, whose moments are accumulated batch by batch; the pieces and their matching stay the sample's."""
    stage = head.alignment.stages[0]
    moments = PieceMoments(stage)
    moments.add(stage, (read[0] - mean) / std, read[1][:, 0])
    for z, b in batches:
        moments.add(stage, (z.cpu() - mean) / std, b.cpu()[:, 0])
    refit_maps(stage, moments, shrinkage)


__all__ = ["AlignmentHeadMixin"]
