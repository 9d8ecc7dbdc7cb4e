"""Real images described by a CSV file: one row per image, its path, its attributes and its label."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..config import Attribute, ConfigError


def default_transform() -> Callable[[Any], Tensor]:
    """PIL image -> float32 tensor [3, H, W] in [0, 1]."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows as {column: text}) of a CSV file with a header row; a missing or empty file is a
    ConfigError."""
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
        columns, rows = read_csv(csv_path)
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

        self._read_columns({c: [r[c].strip() for r in rows] for c in needed[1:]}, label_column, source, vocabulary)

    def _read_columns(self, values: Mapping[str, list[str]], label_column: str | None, source: str,
                      vocabulary: Mapping[str, Sequence[str]] | None, given: Mapping[str, list[str]] | None = None
                      ) -> None:
        """Set attrs, labels and the vocabulary from the text of each attribute (and label) column.

        `given`: the class names of columns that come with them (a ClassLabel feature of a Hugging Face dataset,
        its values written as the names): without `vocabulary`, id k is given[column][k], as the dataset numbers them.
        """
        self.class_names: dict[str, list[str]] = {}
        """String labels of categorical columns given as text: class id k is class_names[name][k]."""
        fixed = vocabulary is not None
        known = dict(vocabulary or {})
        given = dict(given or {})
        columns_out = []
        for a in self.attributes:
            if a.kind == "categorical":
                names_known = known.get(a.name, given.get(a.name))
                ids, names = _class_ids(values[a.name], a.name, source, a.num_classes, names_known, fixed)
                if names is not None:
                    self.class_names[a.name] = names
                columns_out.append(torch.tensor(ids, dtype=torch.float32))
            else:
                try:
                    columns_out.append(torch.tensor([float(v) for v in values[a.name]], dtype=torch.float32))
                except ValueError as err:
                    raise ConfigError(f"{source}: continuous attribute {a.name!r} must hold numbers ({err}).") from err
                if not torch.isfinite(columns_out[-1]).all():
                    raise ConfigError(f"{source}: continuous attribute {a.name!r} holds NaN or infinite values.")
        self.attrs = torch.stack(columns_out, 1)
        """Attributes [N, A] float32 in declared order."""
        self.label_names: list[str] | None = None
        """String labels of the task column when given as text: label k is label_names[k]."""
        if label_column:
            ids, self.label_names = _class_ids(values[label_column], label_column, source, None,
                                               known.get(label_column, given.get(label_column)), fixed)
            self.labels = torch.tensor(ids, dtype=torch.int64)
        else:
            self.labels = torch.full((len(self.attrs),), -1, dtype=torch.int64)
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


__all__ = ["default_transform", "read_csv", "ImageCSVDataset"]
