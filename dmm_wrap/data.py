"""Data sets: generated digits with known nuisances, and loaders of real images described by a CSV file.

`SyntheticDigits` renders scikit-learn's 8x8 digits with a continuous rotation, a continuous stroke width and a
categorical acquisition "site" (colour tint, contrast, blur): the three sensitive attributes are known exactly and
independent of the digit. `ImageCSVDataset` reads a folder of images plus a CSV of attributes; `camelyon17` reads a
local copy of Camelyon17-WILDS. Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .config import Attribute, ConfigError

Split = Literal["train", "test"]
Camelyon17Split = Literal["train", "id_val", "val", "test"]

SYNTHETIC_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("rotation", "continuous"),
    Attribute("width", "continuous"),
    Attribute("site", "categorical", num_classes=3),
)
"""Attributes of `SyntheticDigits` (default 3 sites), in the column order of its attribute tensors."""

NUM_DIGIT_CLASSES = 10
"""Number of task classes of `SyntheticDigits` (the digits 0-9)."""

CAMELYON17_ATTRIBUTES: tuple[Attribute, ...] = (Attribute("center", "categorical", num_classes=5),)
"""Attributes of Camelyon17-WILDS: the hospital ("center") each patch comes from."""

MAX_ROTATION = 45.0
"""Rotations are drawn uniformly in [-MAX_ROTATION, MAX_ROTATION] degrees; the attribute is angle / MAX_ROTATION."""

TEST_FRACTION = 0.3
"""Share of scikit-learn's source digits held out for the test split (unseen writers)."""

_SPLIT_SEED = 0
_CHUNK = 256
_MASK64 = (1 << 64) - 1
_SPLIT_CODES = {"train": 1, "test": 2}

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
def _source_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as float images in [0, 1] [1797, 8, 8] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.from_numpy(digits.images / 16.0).float(), torch.from_numpy(digits.target).long()


def source_indices(split: Split) -> Tensor:
    """Indices into `sklearn.datasets.load_digits()` of the source images of `split` (the two sets are disjoint)."""
    _check_split(split)
    n = len(_source_digits()[1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_test = round(TEST_FRACTION * n)
    return perm[:n_test].sort().values if split == "test" else perm[n_test:].sort().values


def _check_split(split: Any) -> None:
    if split not in get_args(Split):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a bijective hash of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _sample_seed(seed: int, split: Split, index: int) -> int:
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
        split: "train" or "test".
        num_samples: samples per pass.
        image_size: side S of the square images (>= 16).
        num_sites: number of acquisition sites, 2..8 (the categorical attribute).
        seed: generation seed; a different seed gives different samples.

    Example:
        >>> ds = SyntheticDigits("train", 10_000)
        >>> loader = DataLoader(ds, batch_size=128, num_workers=2)
    """

    def __init__(self, split: Split, num_samples: int, image_size: int = 32, num_sites: int = 3,
                 seed: int = 0) -> None:
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
        self.split: Split = split
        self.num_samples = num_samples
        self.image_size = image_size
        self.num_sites = num_sites
        self.seed = seed
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
        images, labels = _source_digits()
        pool = self.source_indices
        draws = torch.empty(n, 5)
        noise = torch.empty(n, 3, size, size)
        for j, i in enumerate(indices):
            g = torch.Generator().manual_seed(_sample_seed(self.seed, self.split, i))
            draws[j] = torch.rand(5, generator=g)
            noise[j] = torch.randn(3, size, size, generator=g)
        src = pool[(draws[:, 0] * len(pool)).long().clamp_max(len(pool) - 1)]
        angle = (2 * draws[:, 1] - 1) * MAX_ROTATION
        width = 2 * draws[:, 2] - 1
        site = (draws[:, 3] * self.num_sites).long().clamp_max(self.num_sites - 1)
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


# --------------------------------------------------------------------------- images listed in a CSV file
def default_transform() -> Callable[[Any], Tensor]:
    """PIL image -> float32 tensor [3, H, W] in [0, 1]."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not csv_path.is_file():
        raise ConfigError(f"CSV file {str(csv_path)!r} not found. Pass the path of a CSV with one row per image.")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    if not columns:
        raise ConfigError(f"CSV file {str(csv_path)!r} is empty; it needs a header row and one row per image.")
    return columns, rows


def _class_ids(values: list[str], column: str, source: str, num_classes: int | None,
               known: list[str] | None = None, fixed: bool = False) -> tuple[list[int], list[str] | None]:
    """Integer class ids of a column: integers as they are, or string labels mapped to ids in sorted order.

    `known` (the training data's labels of this column) maps the labels instead, and an unseen one is an error;
    `fixed` without `known` says the training data held class ids in this column, so text is an error too.
    """
    if known is not None:
        return _known_ids(values, column, source, num_classes, list(known)), list(known)
    numbers: list[float] = []
    for v in values:
        try:
            numbers.append(float(v))
        except ValueError:
            break
    if len(numbers) == len(values):
        fractional = [v for v, x in zip(values, numbers) if not x.is_integer()]
        if fractional:
            raise ConfigError(f"{source}: column {column!r} holds class ids but has the non-integer value "
                              f"{fractional[0]!r}. Declare it continuous or fix the CSV.")
        ids = [int(x) for x in numbers]
        upper = num_classes if num_classes is not None else float("inf")
        out = [(row, i) for row, i in enumerate(ids) if not 0 <= i < upper]
        if out:
            row, i = out[0]
            allowed = f"0..{num_classes - 1}" if num_classes is not None else "ids >= 0"
            raise ConfigError(f"{source}: column {column!r} must hold class ids {allowed}, data row {row + 1} has {i}. "
                              "Map the labels to ids or raise num_classes.")
        return ids, None
    if fixed:
        row = len(numbers)
        raise ConfigError(f"{source}: column {column!r} held class ids in the training data, but data row {row + 1} "
                          f"has the label {values[row]!r}. Write the same class ids as the training CSV.")
    names = sorted(set(values))
    if num_classes is not None and len(names) > num_classes:
        raise ConfigError(f"{source}: column {column!r} has {len(names)} distinct labels {names[:10]} but the "
                          f"attribute declares num_classes={num_classes}. Raise num_classes or fix the CSV.")
    lookup = {name: k for k, name in enumerate(names)}
    return [lookup[v] for v in values], names


def _known_ids(values: list[str], column: str, source: str, num_classes: int | None, known: list[str]) -> list[int]:
    """Class ids of `values` in the training vocabulary `known` of the column (id k is known[k])."""
    if num_classes is not None and len(known) > num_classes:
        raise ConfigError(f"{source}: the vocabulary of column {column!r} has {len(known)} labels but the attribute "
                          f"declares num_classes={num_classes}.")
    lookup = {name: k for k, name in enumerate(known)}
    for row, v in enumerate(values):
        if v not in lookup:
            raise ConfigError(f"{source}: column {column!r}, data row {row + 1} has the label {v!r}, which the "
                              f"training data did not have (its labels: {known[:10]}{' ...' if len(known) > 10 else ''}"
                              "). Evaluate on labels seen in training, or train with this label.")
    return [lookup[v] for v in values]


def _image_path(root: Path, text: str, row: int, column: str, source: str) -> Path:
    """`root / text`, refusing a path that leaves `root` (absolute, a drive, or a `..` part)."""
    posix, windows = PurePosixPath(text), PureWindowsPath(text)
    if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        raise ConfigError(f"{source}: data row {row + 1}: the image path {text!r} in column {column!r} leaves the root "
                          f"folder {str(root)!r}. Write each image as a relative path under the root, without '..' "
                          "(or pass a root that contains the images).")
    return root / text


class ImageCSVDataset(Dataset):
    """Images in a folder, listed with their attributes (and optionally a task label) in a CSV file.

    Categorical attribute columns hold class ids 0..K-1, or string labels mapped to ids in sorted order (recorded
    in `class_names`; with the task label's, in `vocabulary`). Items are (image, attrs float32 [A] in declared
    order, label int64 or -1). Read a held-out split with the training split's `vocabulary`, so that both number
    the labels alike.

    Args:
        root: folder the image paths of the CSV are relative to.
        csv_path: CSV file with a header row and one row per image.
        attributes: the attributes, each read from the column of its name.
        path_column: column of the image paths.
        label_column: column of the task label (class ids or string labels); None gives label -1.
        transform: PIL RGB image -> tensor; default scales to float32 [0, 1] without resizing.
        check_files: verify at construction that every listed image exists (one stat per image).
        vocabulary: the training split's `vocabulary` ({column: labels}, class id k = labels[k]); its labels are
            mapped as in training, an unseen label is an error, and a categorical column it lacks must hold class
            ids. None derives the vocabulary from this CSV (a training split).

    Example:
        >>> train = ImageCSVDataset("data/scans", "data/scans/train.csv", [Attribute("site", "categorical", 3)])
        >>> test = ImageCSVDataset("data/scans", "data/scans/test.csv", train.attributes, vocabulary=train.vocabulary)
    """

    def __init__(self, root: str | os.PathLike, csv_path: str | os.PathLike, attributes: Sequence[Attribute],
                 path_column: str = "path", label_column: str | None = None,
                 transform: Callable[[Any], Tensor] | None = None, check_files: bool = True,
                 vocabulary: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        csv_path = Path(csv_path)
        columns, rows = _read_csv(csv_path)
        self._setup(Path(root), rows, columns, attributes, path_column, label_column, transform,
                    f"CSV {str(csv_path)!r}", check_files, vocabulary)

    def _setup(self, root: Path, rows: list[dict[str, str]], columns: list[str], attributes: Sequence[Attribute],
               path_column: str, label_column: str | None, transform: Callable[[Any], Tensor] | None,
               source: str, check_files: bool, vocabulary: Mapping[str, Sequence[str]] | None = None) -> None:
        if isinstance(attributes, Attribute) or not all(isinstance(a, Attribute) for a in attributes):
            raise TypeError("attributes must be a sequence of Attribute(name, kind, num_classes=None).")
        self.attributes: tuple[Attribute, ...] = tuple(attributes)
        if not self.attributes:
            raise ConfigError("Declare at least one attribute, e.g. [Attribute('site', 'categorical', num_classes=3)].")
        needed = [path_column, *(a.name for a in self.attributes)] + ([label_column] if label_column else [])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ConfigError(f"{source} lacks the column(s) {missing}; available columns: {columns}. Rename the "
                              "CSV columns, or pass path_column= / label_column= / matching attribute names.")
        if not rows:
            raise ConfigError(f"{source} has a header but no rows; it needs one row per image.")
        self.root = root
        self.transform = transform if transform is not None else default_transform()
        self.paths = [_image_path(root, r[path_column].strip(), row, path_column, source) for row, r in enumerate(rows)]
        absent = [str(p) for p in self.paths if not p.is_file()] if check_files else []
        if absent:
            raise ConfigError(f"{source}: {len(absent)} of {len(self.paths)} image files do not exist under "
                              f"{str(root)!r}, e.g. {absent[:3]}. Check root and the {path_column!r} column.")

        self.class_names: dict[str, list[str]] = {}
        """String labels of categorical columns given as text: class id k is class_names[name][k]."""
        fixed = vocabulary is not None
        known = dict(vocabulary or {})
        columns_out = []
        for a in self.attributes:
            values = [r[a.name].strip() for r in rows]
            if a.kind == "categorical":
                ids, names = _class_ids(values, a.name, source, a.num_classes, known.get(a.name), fixed)
                if names is not None:
                    self.class_names[a.name] = names
                columns_out.append(torch.tensor(ids, dtype=torch.float32))
            else:
                try:
                    columns_out.append(torch.tensor([float(v) for v in values], dtype=torch.float32))
                except ValueError as err:
                    raise ConfigError(f"{source}: continuous attribute {a.name!r} must hold numbers ({err}).") from err
                if not torch.isfinite(columns_out[-1]).all():
                    raise ConfigError(f"{source}: continuous attribute {a.name!r} holds NaN or infinite values.")
        self.attrs = torch.stack(columns_out, 1)
        """Attributes [N, A] float32 in declared order."""
        self.label_names: list[str] | None = None
        """String labels of the task column when given as text: label k is label_names[k]."""
        if label_column:
            ids, self.label_names = _class_ids([r[label_column].strip() for r in rows], label_column, source, None,
                                               known.get(label_column), fixed)
            self.labels = torch.tensor(ids, dtype=torch.int64)
        else:
            self.labels = torch.full((len(rows),), -1, dtype=torch.int64)
        self.vocabulary: dict[str, list[str]] = dict(self.class_names)
        """String labels of every column given as text (attributes and task label): what a held-out split of the
        same data must be read with (`vocabulary=`), and what a model trained on it records."""
        if label_column and self.label_names is not None:
            self.vocabulary[label_column] = self.label_names

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            image = self.transform(img.convert("RGB"))
        return image, self.attrs[index], self.labels[index]


class Camelyon17Patches(ImageCSVDataset):
    """Camelyon17-WILDS v1.0 patches from a local copy; attribute "center" (5 hospitals), label "tumor".

    Splits follow WILDS' official scheme: "train" and "id_val" are centers 0, 3, 4 (metadata split 0 / 1), "val"
    is center 1 and "test" is center 2; None keeps every patch.

    Args:
        root: the camelyon17_v1.0 folder (holding metadata.csv and patches/), or the folder that contains it.
        split: WILDS split, or None for all patches.
        centers: keep only these centers (0..4).
        transform: PIL RGB image -> tensor; default scales to float32 [0, 1].
        check_files: verify at construction that every listed patch exists (one stat per patch).

    Example:
        >>> train = Camelyon17Patches("data/wilds", split="train")
    """

    def __init__(self, root: str | os.PathLike, split: Camelyon17Split | None = None,
                 centers: Sequence[int] | None = None, transform: Callable[[Any], Tensor] | None = None,
                 check_files: bool = True) -> None:
        Dataset.__init__(self)
        root = Path(root)
        if not (root / "metadata.csv").is_file() and (root / "camelyon17_v1.0" / "metadata.csv").is_file():
            root = root / "camelyon17_v1.0"
        meta = root / "metadata.csv"
        if not meta.is_file():
            raise ConfigError(f"Camelyon17-WILDS metadata not found at {str(meta)!r}. Download Camelyon17-WILDS v1.0 "
                              "yourself (e.g. `wilds.get_dataset('camelyon17', download=True, root_dir=...)`) and pass "
                              "its camelyon17_v1.0 folder; dmm_wrap never downloads.")
        if split is not None and split not in get_args(Camelyon17Split):
            raise ConfigError(f"split must be None or one of {list(get_args(Camelyon17Split))}, got {split!r}.")
        if centers is not None:
            bad = [c for c in centers if c not in range(5)]
            if bad or not centers:
                raise ConfigError(f"centers must be a non-empty list of ids in 0..4, got {list(centers)!r}.")
        columns, rows = _read_csv(meta)
        required = ["patient", "node", "x_coord", "y_coord", "tumor", "center", "split"]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ConfigError(f"{str(meta)!r} lacks the column(s) {missing}; available columns: {columns}. "
                              "Is this the metadata.csv of Camelyon17-WILDS v1.0?")
        try:
            kept = [r for r in rows if _camelyon_keep(int(r["center"]), int(r["split"]), split, centers)]
            for r in kept:
                p, node = int(r["patient"]), int(r["node"])
                r["path"] = (f"patches/patient_{p:03d}_node_{node}/"
                             f"patch_patient_{p:03d}_node_{node}_x_{int(r['x_coord'])}_y_{int(r['y_coord'])}.png")
        except ValueError as err:
            raise ConfigError(f"{str(meta)!r}: patient, node, x_coord, y_coord, center and split must be integers "
                              f"({err}).") from err
        if not kept:
            raise ConfigError(f"No Camelyon17 patch matches split={split!r}, centers={centers!r} in {str(meta)!r}.")
        self.split = split
        self._setup(root, kept, [*columns, "path"], CAMELYON17_ATTRIBUTES, "path", "tumor", transform,
                    f"Camelyon17 metadata {str(meta)!r}", check_files)


def _camelyon_keep(center: int, split_code: int, split: Camelyon17Split | None, centers: Sequence[int] | None) -> bool:
    if centers is not None and center not in centers:
        return False
    if split is None:
        return True
    if split == "val":
        return center == 1
    if split == "test":
        return center == 2
    return center not in (1, 2) and split_code == (0 if split == "train" else 1)


def camelyon17(root: str | os.PathLike, split: Camelyon17Split | None = None, centers: Sequence[int] | None = None,
               transform: Callable[[Any], Tensor] | None = None, check_files: bool = True) -> Camelyon17Patches:
    """Camelyon17-WILDS patches from a local copy (see `Camelyon17Patches`).

    Example:
        >>> test = camelyon17("data/wilds", split="id_val")
    """
    return Camelyon17Patches(root, split=split, centers=centers, transform=transform, check_files=check_files)


__all__ = ["SYNTHETIC_ATTRIBUTES", "NUM_DIGIT_CLASSES", "CAMELYON17_ATTRIBUTES", "MAX_ROTATION", "TEST_FRACTION",
           "DigitsBatch", "SyntheticDigits", "source_indices", "default_transform", "ImageCSVDataset",
           "Camelyon17Patches", "camelyon17"]
