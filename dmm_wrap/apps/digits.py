"""Generated digits with known nuisances: the default job's data.

`SyntheticDigits` renders scikit-learn's 8x8 digits with a continuous rotation, a continuous stroke width and a
categorical acquisition "site" (colour tint, contrast, blur): the three sensitive attributes are known exactly and
independent of the digit. Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from ..config import Attribute

Split = Literal["train", "val", "test", "probe"]

SYNTHETIC_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("rotation", "continuous"),
    Attribute("width", "continuous"),
    Attribute("site", "categorical", num_classes=3),
)
"""Attributes of `SyntheticDigits` (default 3 sites), in the column order of its attribute tensors."""

NUM_DIGIT_CLASSES = 10
"""Number of task classes of `SyntheticDigits` (the digits 0-9)."""

MAX_ROTATION = 45.0
"""Rotations are drawn uniformly in [-MAX_ROTATION, MAX_ROTATION] degrees; the attribute is angle / MAX_ROTATION."""

TEST_FRACTION = 0.3
"""Share of scikit-learn's source digits held out for the test split (unseen writers)."""

_SPLIT_SEED = 0
_CHUNK = 256
_MASK64 = (1 << 64) - 1
_SPLIT_CODES = {"train": 1, "test": 2, "val": 3, "probe": 4}

# Per site: background RGB, foreground RGB, Gaussian blur sigma (in pixels of a 32x32 image).
_SITE_STYLES: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...] = (
    ((0.00, 0.00, 0.00), (1.00, 1.00, 1.00), 0.0),  # neutral
    ((0.35, 0.22, 0.12), (0.85, 0.62, 0.40), 0.0),  # warm tint, low contrast
    ((0.00, 0.05, 0.25), (0.50, 0.72, 1.00), 1.0),  # blue tint, blurred
    ((0.00, 0.12, 0.00), (0.55, 1.00, 0.45), 0.0),  # green, high contrast
    ((0.30, 0.10, 0.30), (0.80, 0.50, 0.80), 0.7),  # magenta, low contrast, soft
    ((0.90, 0.90, 0.90), (0.10, 0.10, 0.10), 0.0),  # inverted grey
    ((0.15, 0.15, 0.00), (1.00, 0.95, 0.30), 0.5),  # yellow
    ((0.05, 0.20, 0.20), (0.40, 0.80, 0.80), 1.3),  # dim cyan, blurred
)
_NOISE_STD = 0.05
# Fixed normalisation (measured on 3-site training samples) so that images are roughly zero-mean, unit-std
# without per-image standardisation, which would erase the site's tint.
_PIXEL_MEAN = (0.23, 0.21, 0.24)
_PIXEL_STD = (0.25, 0.22, 0.23)


class DigitsBatch(NamedTuple):
    """A block of generated samples."""

    images: Tensor
    """Images [N, 3, S, S], float32, roughly zero mean and unit variance."""
    attrs: Tensor
    """Attributes [N, 3] float32: rotation / 45 degrees in [-1, 1], stroke width in [-1, 1], site id."""
    labels: Tensor
    """Digit labels [N], int64."""


@functools.lru_cache(maxsize=1)
def source_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as float images in [0, 1] [1797, 8, 8] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.from_numpy(digits.images / 16.0).float(), torch.from_numpy(digits.target).long()


def source_indices(split: Split) -> Tensor:
    """Indices into `sklearn.datasets.load_digits()` of the source images of `split`: "test" holds writers that
    "train", "val" and "probe" never see; "val" and "probe" render the training writers with draws of their own."""
    _check_split(split)
    n = len(source_digits()[1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_test = round(TEST_FRACTION * n)
    return perm[:n_test].sort().values if split == "test" else perm[n_test:].sort().values


def _check_split(split: Any) -> None:
    if split not in get_args(Split):
        raise ValueError(f"split must be 'train', 'val', 'test' or 'probe', got {split!r}.")


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a bijective hash of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, split: Split, index: int) -> int:
    """A generator seed that depends only on (seed, split, index)."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ _SPLIT_CODES[split]) ^ index) >> 1


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run small tensor ops on one intra-op thread: on few cores, thread hand-offs cost more than the ops."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Depthwise Gaussian blur of [N, C, H, W] with reflect padding."""
    radius = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class SyntheticDigits(IterableDataset):
    """Digits rendered with a known rotation, stroke width and acquisition site, generated on the fly.

    Sample `i` depends only on (split, seed, i): it is identical whatever the DataLoader's number of workers.
    Yields (image [3, S, S] float32, attrs [3] float32 = [rotation / 45 deg, width, site], digit label int64).
    The train and test splits draw from disjoint source images of `sklearn.datasets.load_digits`.

    Args:
        split: "train", "val" (the training writers, rendered with other draws: for model selection), "probe"
            (likewise, with draws of its own: for the evaluation's leakage probes) or "test" (held-out writers).
        num_samples: samples per pass.
        image_size: side S of the square images (>= 16).
        num_sites: number of acquisition sites, 2..8 (the categorical attribute).
        seed: generation seed; a different seed gives different samples.
        sites: the site ids (in 0..num_sites-1) samples are drawn from, uniformly; None = every site. The attribute
            still has `num_sites` classes, so a test split of every site holds sites a training split of some never
            had (`data.train_sites`: transfer to an unseen site).

    Example:
        >>> ds = SyntheticDigits("train", 10_000)
        >>> loader = DataLoader(ds, batch_size=128, num_workers=2)
    """

    def __init__(self, split: Split, num_samples: int, image_size: int = 32, num_sites: int = 3,
                 seed: int = 0, sites: Sequence[int] | None = None) -> None:
        super().__init__()
        _check_split(split)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16 (the 8x8 digits are upsampled), got {image_size!r}.")
        if not isinstance(num_sites, int) or isinstance(num_sites, bool) or not 2 <= num_sites <= len(_SITE_STYLES):
            raise ValueError(f"num_sites must be an int in 2..{len(_SITE_STYLES)} (one style per site), "
                             f"got {num_sites!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
        if sites is not None and (not sites or len(set(sites)) != len(sites) or any(
                not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < num_sites for s in sites)):
            raise ValueError(f"sites must be None or distinct site ids in 0..{num_sites - 1} (num_sites={num_sites}), "
                             f"got {sites!r}.")
        self.split: Split = split
        self.num_samples = num_samples
        self.image_size = image_size
        self.num_sites = num_sites
        self.seed = seed
        self.sites: tuple[int, ...] = tuple(range(num_sites)) if sites is None else tuple(sorted(sites))
        """The site ids samples are drawn from."""
        self.source_indices = source_indices(split)
        self._shard = (1, 0)

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        """The attributes of this data set (the site has `num_sites` classes)."""
        return tuple(Attribute(a.name, a.kind, self.num_sites) if a.name == "site" else a
                     for a in SYNTHETIC_ATTRIBUTES)

    def shard(self, num_shards: int, index: int) -> SyntheticDigits:
        """One of `num_shards` interleaved parts of the samples (index, index + num_shards, ...): what rank `index`
        of a data-parallel run reads. Every shard has num_samples // num_shards samples (the remainder is dropped),
        so all ranks take the same number of steps. Without loader workers, the ranks' batches k together hold the
        samples of batch k of one process with num_shards times the batch size (with workers, each worker batches
        its own chunks, so the grouping differs, in one process as in several).

        Example:
            >>> ds = SyntheticDigits("train", 8192).shard(dist.get_world_size(), dist.get_rank())
        """
        for name, v in (("num_shards", num_shards), ("index", index)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an int, got {v!r}.")
        if not 0 <= index < num_shards <= self.num_samples:
            raise ValueError(f"Need 0 <= index < num_shards <= num_samples ({self.num_samples}), got index={index}, "
                             f"num_shards={num_shards}.")
        part = copy.copy(self)
        part._shard = (num_shards, index)
        return part

    def _indices(self) -> range:
        num_shards, index = self._shard
        return range(index, self.num_samples // num_shards * num_shards, num_shards)

    def __len__(self) -> int:
        return len(self._indices())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        indices = self._indices()
        # Whole chunks go to workers, so every chunk is computed with the same batch composition everywhere.
        for chunk in range(worker, math.ceil(len(indices) / _CHUNK), num_workers):
            batch = self.generate(indices[chunk * _CHUNK:(chunk + 1) * _CHUNK])
            yield from zip(batch.images, batch.attrs, batch.labels)

    def generate(self, indices: Sequence[int] | None = None) -> DigitsBatch:
        """Samples `indices` (default: all) as stacked tensors.

        With the default, the result is bit-identical to what iteration yields; other index lists are rendered in
        other blocks and agree with it up to float rounding.

        Example:
            >>> images, attrs, labels = SyntheticDigits("test", 512).generate()
        """
        indices = range(self.num_samples) if indices is None else indices
        if len(indices) == 0:
            raise ValueError("generate() needs at least one index.")
        bad = [i for i in indices if not 0 <= int(i) < self.num_samples]
        if bad:
            raise ValueError(f"Sample indices must lie in 0..{self.num_samples - 1}, got {bad[:3]}.")
        idx = [int(i) for i in indices]
        with _one_thread():
            parts = [self._render(idx[k:k + _CHUNK]) for k in range(0, len(idx), _CHUNK)]
        if len(parts) == 1:
            return parts[0]
        return DigitsBatch(*(torch.cat(p) for p in zip(*parts)))

    def _render(self, indices: list[int]) -> DigitsBatch:
        n, size = len(indices), self.image_size
        images, labels = source_digits()
        pool = self.source_indices
        draws = torch.empty(n, 5)
        noise = torch.empty(n, 3, size, size)
        for j, i in enumerate(indices):
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.split, i))
            draws[j] = torch.rand(5, generator=g)
            noise[j] = torch.randn(3, size, size, generator=g)
        src = pool[(draws[:, 0] * len(pool)).long().clamp_max(len(pool) - 1)]
        angle = (2 * draws[:, 1] - 1) * MAX_ROTATION
        width = 2 * draws[:, 2] - 1
        pick = (draws[:, 3] * len(self.sites)).long().clamp_max(len(self.sites) - 1)
        site = torch.tensor(self.sites)[pick]  # with every site: the site is `pick` itself
        gain = 0.9 + 0.2 * draws[:, 4]

        # Upsample the digit to 3/4 of the frame and centre it, so that rotation keeps it inside.
        inner = round(0.75 * size)
        x = F.interpolate(images[src][:, None], size=(inner, inner), mode="bilinear", align_corners=False)
        lo = (size - inner) // 2
        x = F.pad(x, (lo, size - inner - lo, lo, size - inner - lo))

        # Stroke width: blend towards a grey dilation (width > 0) or erosion (width < 0).
        k = 2 * max(1, round(size / 32)) + 1
        dilated = F.max_pool2d(x, k, stride=1, padding=k // 2)
        eroded = -F.max_pool2d(-x, k, stride=1, padding=k // 2)
        w = width.view(n, 1, 1, 1)
        x = x + w.clamp_min(0) * (dilated - x) + (-w).clamp_min(0) * (eroded - x)

        # Rotation about the centre, counter-clockwise on screen for positive angles (as torchvision's rotate).
        rad = torch.deg2rad(angle)
        cos, sin = torch.cos(rad), torch.sin(rad)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1),
                             torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
        grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)

        # Site style: colour the strokes and the background, then blur.
        out = torch.empty(n, 3, size, size)
        for s in range(self.num_sites):
            mask = site == s
            if not mask.any():
                continue
            bg, fg, sigma = _SITE_STYLES[s]
            bg_t, fg_t = torch.tensor(bg).view(1, 3, 1, 1), torch.tensor(fg).view(1, 3, 1, 1)
            styled = bg_t + (fg_t - bg_t) * x[mask]
            if sigma > 0:
                styled = _gaussian_blur(styled, sigma * size / 32)
            out[mask] = styled
        out = out * gain.view(n, 1, 1, 1) + _NOISE_STD * noise
        mean, std = torch.tensor(_PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(_PIXEL_STD).view(1, 3, 1, 1)
        out = (out - mean) / std
        attrs = torch.stack([angle / MAX_ROTATION, width, site.float()], 1)
        return DigitsBatch(out.contiguous(), attrs, labels[src])




__all__ = ["SYNTHETIC_ATTRIBUTES", "NUM_DIGIT_CLASSES", "MAX_ROTATION", "TEST_FRACTION", "DigitsBatch",
           "SyntheticDigits", "source_indices", "source_digits", "sample_seed"]
