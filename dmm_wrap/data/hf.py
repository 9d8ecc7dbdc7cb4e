"""A Hugging Face `datasets` split of images: an image column, attribute columns and optionally a task label."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from ..config import Attribute, ConfigError
from .images import ImageCSVDataset, default_transform


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("Reading a Hugging Face dataset needs the `datasets` package: pip install 'dmm-wrap[hf]' "
                          "(or pip install datasets).") from err
    return datasets


def load_hf_splits(source: str | os.PathLike) -> Any:
    """The DatasetDict at `source`: a folder written by `DatasetDict.save_to_disk`, or else a dataset name on the Hub
    (`datasets.load_dataset`, which needs the network or its cache).

    A `source` that looks like a path (it exists, is absolute, or starts with '.' or '~') is read from disk only.
    """
    datasets = _require_datasets()
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists() or path.is_absolute() or text.startswith((".", "~")):
        if not path.is_dir():
            raise ConfigError(f"Hugging Face dataset folder {text!r} not found. Pass a folder written by "
                              "DatasetDict.save_to_disk, or a dataset name on the Hub.")
        splits = datasets.load_from_disk(str(path))
        if isinstance(splits, datasets.Dataset):
            raise ConfigError(f"{text!r} holds one Dataset, not a DatasetDict of splits. Save "
                              "DatasetDict({'train': ..., 'test': ...}) with save_to_disk, so that the run can name "
                              "its training and test splits.")
        return splits
    return datasets.load_dataset(text)


def hf_split(splits: Any, names: str | list[str], source: str) -> Any:
    """Split `names` of a DatasetDict (several: their rows together, in order), or a ConfigError naming the splits it
    has."""
    names = [names] if isinstance(names, str) else names
    for name in names:
        if name not in splits:
            raise ConfigError(f"Hugging Face dataset {source!r} has no split {name!r}; its splits: {list(splits)}. "
                              "Set data.train_split / test_split / val_split to one of them (or several, joined "
                              "with '+').")
    if len(names) == 1:
        return splits[names[0]]
    return _require_datasets().concatenate_datasets([splits[name] for name in names])


class HFImageDataset(ImageCSVDataset):
    """One split of a Hugging Face `datasets.Dataset`: an image column and attribute columns (and a task label).

    The columns are read as `ImageCSVDataset` reads a CSV: categorical attributes hold class ids 0..K-1, string labels
    (mapped to ids in sorted order and recorded in `vocabulary`), or a `ClassLabel` feature (its ids kept, its names
    recorded). Items are (image, attrs float32 [A] in declared order, label int64 or -1). Read a held-out split with
    the training split's `vocabulary`. Images are decoded one item at a time; only the metadata columns are read at
    construction.

    Args:
        dataset: a `datasets.Dataset` (one split; index a DatasetDict by its split name first).
        attributes: the attributes, each read from the column of its name.
        image_column: column of the images (an `Image` feature, decoded to PIL).
        label_column: column of the task label; None gives label -1.
        transform: PIL RGB image -> tensor; default scales to float32 [0, 1] without resizing.
        vocabulary: the training split's `vocabulary`, for a held-out split.

    Example:
        >>> splits = datasets.load_from_disk("data/scans_hf")
        >>> train = HFImageDataset(splits["train"], [Attribute("site", "categorical", 3)], label_column="label")
        >>> test = HFImageDataset(splits["test"], train.attributes, label_column="label", vocabulary=train.vocabulary)
    """

    def __init__(self, dataset: Any, attributes: Sequence[Attribute], image_column: str = "image",
                 label_column: str | None = None, transform: Callable[[Any], Tensor] | None = None,
                 vocabulary: Mapping[str, Sequence[str]] | None = None, source: str = "Hugging Face dataset") -> None:
        Dataset.__init__(self)
        datasets = _require_datasets()
        if isinstance(dataset, datasets.DatasetDict):
            raise TypeError(f"Pass one split of the DatasetDict (its splits: {list(dataset)}), e.g. dataset['train'].")
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
        if isinstance(attributes, Attribute) or not all(isinstance(a, Attribute) for a in attributes):
            raise TypeError("attributes must be a sequence of Attribute(name, kind, num_classes=None).")
        self.attributes: tuple[Attribute, ...] = tuple(attributes)
        if not self.attributes:
            raise ConfigError("Declare at least one attribute, e.g. [Attribute('site', 'categorical', num_classes=3)].")
        metadata = [a.name for a in self.attributes] + ([label_column] if label_column else [])
        columns = list(dataset.column_names)
        missing = [c for c in [image_column, *metadata] if c not in columns]
        if missing:
            raise ConfigError(f"{source} lacks the column(s) {missing}; available columns: {columns}. Pass "
                              "image_column= / label_column= / matching attribute names.")
        if len(dataset) == 0:
            raise ConfigError(f"{source} has no rows; it needs one row per image.")
        values: dict[str, list[str]] = {}
        given: dict[str, list[str]] = {}
        for column in metadata:
            feature = dataset.features[column]
            raw = dataset[column]
            if any(v is None for v in raw):
                row = next(i for i, v in enumerate(raw) if v is None)
                raise ConfigError(f"{source}: column {column!r}, row {row} is empty (None). Fill or drop such rows.")
            if isinstance(feature, datasets.ClassLabel):
                given[column] = list(feature.names)
                values[column] = [feature.int2str(int(v)) for v in raw]
            else:
                values[column] = [str(v).strip() for v in raw]
        self.dataset = dataset
        self.images = dataset.select_columns([image_column])
        self.image_column = image_column
        self.transform = transform if transform is not None else default_transform()
        self._read_columns(values, label_column, source, vocabulary, given)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        image = self.images[int(index)][self.image_column]
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image

            with Image.open(image) as img:
                return self.transform(img.convert("RGB")), self.attrs[index], self.labels[index]
        if not hasattr(image, "convert"):
            raise TypeError(f"Column {self.image_column!r} gave a {type(image).__name__}, not an image. Cast it with "
                            "dataset.cast_column(name, datasets.Image()).")
        return self.transform(image.convert("RGB")), self.attrs[index], self.labels[index]


__all__ = ["HFImageDataset", "hf_split", "load_hf_splits"]
