"""A local copy of Camelyon17-WILDS (its metadata.csv and patches folder): the hospital is the attribute."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from torch import Tensor
from torch.utils.data import Dataset

from ..config import Attribute, ConfigError
from .images import ImageCSVDataset, read_csv

Camelyon17Split = Literal["train", "id_val", "val", "test"]

CAMELYON17_ATTRIBUTES: tuple[Attribute, ...] = (Attribute("center", "categorical", num_classes=5),)
"""Attributes of Camelyon17-WILDS: the hospital ("center") each patch comes from."""


class Camelyon17Patches(ImageCSVDataset):
    """Camelyon17-WILDS v1.0 patches from a local copy; attribute "center" (5 hospitals), label "tumor".

    Splits follow WILDS' official scheme: "train" and "id_val" are centers 0, 3, 4 (metadata split 0 / 1), "val"
    is center 1 and "test" is center 2; None keeps every patch.

    Args:
        root: the camelyon17_v1.0 folder (holding metadata.csv and patches/), or the folder that contains it.
        split: WILDS split, a list of them (their patches together, e.g. ["id_val", "test"]: held-out patches of the
            training hospitals and the unseen test hospital), or None for all patches.
        centers: keep only these centers (0..4).
        transform: PIL RGB image -> tensor; default scales to float32 [0, 1].
        check_files: verify at construction that every listed patch exists (one stat per patch).

    Example:
        >>> train = Camelyon17Patches("data/wilds", split="train")
    """

    def __init__(self, root: str | os.PathLike, split: Camelyon17Split | Sequence[Camelyon17Split] | None = None,
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
        names = [split] if isinstance(split, str) else list(split) if split is not None else None
        if names is not None and (not names or any(n not in get_args(Camelyon17Split) for n in names)):
            raise ConfigError(f"split must be None, one of {list(get_args(Camelyon17Split))} or a list of them, got "
                              f"{split!r}.")
        if centers is not None:
            bad = [c for c in centers if c not in range(5)]
            if bad or not centers:
                raise ConfigError(f"centers must be a non-empty list of ids in 0..4, got {list(centers)!r}.")
        columns, rows = read_csv(meta)
        required = ["patient", "node", "x_coord", "y_coord", "tumor", "center", "split"]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ConfigError(f"{str(meta)!r} lacks the column(s) {missing}; available columns: {columns}. "
                              "Is this the metadata.csv of Camelyon17-WILDS v1.0?")
        try:
            kept = [r for r in rows
                    if any(_camelyon_keep(int(r["center"]), int(r["split"]), n, centers) for n in names or [None])]
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


def camelyon17(root: str | os.PathLike, split: Camelyon17Split | Sequence[Camelyon17Split] | None = None,
               centers: Sequence[int] | None = None,
               transform: Callable[[Any], Tensor] | None = None, check_files: bool = True) -> Camelyon17Patches:
    """Camelyon17-WILDS patches from a local copy (see `Camelyon17Patches`).

    Example:
        >>> test = camelyon17("data/wilds", split="id_val")
    """
    return Camelyon17Patches(root, split=split, centers=centers, transform=transform, check_files=check_files)


__all__ = ["CAMELYON17_ATTRIBUTES", "Camelyon17Patches", "camelyon17"]
