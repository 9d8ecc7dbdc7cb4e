"""Hugging Face `datasets` as a data source: `HFImageDataset` and `data.kind: hf_dataset` (offline, save_to_disk)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from dmm_wrap import (
    Attribute,
    ConfigError,
    DebiasedEncoder,
    HFImageDataset,
    ImageCSVDataset,
)
from dmm_wrap.apps.cli import main
from dmm_wrap.data import load_hf_splits
from dmm_wrap.data.hf import hf_split

SITES = ["east", "north", "west"]
datasets.disable_progress_bars()


def _split(tmp_path: Path, name: str, sites: list[str], seed: int) -> tuple[object, Path]:
    """A split as a datasets.Dataset (images, a ClassLabel site, a string scanner, a float dose, an int label) and
    the same rows as PNG files + CSV, ImageCSVDataset's input."""
    rng = np.random.default_rng(seed)
    folder = tmp_path / "png" / name
    folder.mkdir(parents=True)
    images, rows = [], []
    for i, site in enumerate(sites):
        image = Image.fromarray((rng.random((12, 10, 3)) * 255).astype("uint8"))
        image.save(folder / f"{i}.png")
        images.append(image)
        rows.append([f"{name}/{i}.png", site, ["old", "new"][i % 2], 0.5 * i, i % 2])
    with open(tmp_path / "png" / f"{name}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "site", "scanner", "dose", "label"])
        writer.writerows(rows)
    features = datasets.Features({"image": datasets.Image(), "site": datasets.ClassLabel(names=SITES),
                                  "scanner": datasets.Value("string"), "dose": datasets.Value("float32"),
                                  "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": images, "site": [SITES.index(s) for s in sites],
                                     "scanner": [r[2] for r in rows], "dose": [r[3] for r in rows],
                                     "label": [r[4] for r in rows]}, features=features)
    return ds, tmp_path / "png" / f"{name}.csv"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    train, _ = _split(tmp_path, "train", SITES * 4, 0)
    test, _ = _split(tmp_path, "test", ["west", "north", "west", "north"], 1)
    val, _ = _split(tmp_path, "val", SITES * 6, 2)  # the selection probe needs 16 at least
    datasets.DatasetDict({"train": train, "test": test, "validation": val}).save_to_disk(tmp_path / "hf")
    return tmp_path


ATTRS = [Attribute("site", "categorical", 3), Attribute("scanner", "categorical", 2), Attribute("dose", "continuous")]


def test_reads_what_image_csv_reads(saved: Path) -> None:
    splits = load_hf_splits(saved / "hf")
    hf = HFImageDataset(splits["train"], ATTRS, label_column="label")
    ref = ImageCSVDataset(saved / "png", saved / "png" / "train.csv", ATTRS, label_column="label")
    assert len(hf) == len(ref) == 12
    for i in (0, 5, 11):
        for a, b in zip(hf[i], ref[i]):
            assert torch.equal(a, b)
    assert torch.equal(hf.attrs, ref.attrs) and torch.equal(hf.labels, ref.labels)
    # The ClassLabel's own numbering is kept and its names recorded; text is numbered in sorted order, as in a CSV.
    assert hf.vocabulary == {"site": SITES, "scanner": ["new", "old"]} == ref.vocabulary
    # A held-out split read with the training vocabulary numbers the sites alike.
    test = HFImageDataset(splits["test"], ATTRS, label_column="label", vocabulary=hf.vocabulary)
    assert test.attrs[:, 0].tolist() == [2.0, 1.0, 2.0, 1.0]


def test_input_errors(saved: Path) -> None:
    splits = load_hf_splits(saved / "hf")
    with pytest.raises(ConfigError, match=r"lacks the column\(s\) \['hospital'\]; available columns: \['image', "):
        HFImageDataset(splits["train"], [Attribute("hospital", "categorical", 2)])
    with pytest.raises(ConfigError, match=r"lacks the column\(s\) \['img'\]"):
        HFImageDataset(splits["train"], ATTRS, image_column="img")
    with pytest.raises(TypeError, match=r"Pass one split of the DatasetDict \(its splits: \['train', 'test', "):
        HFImageDataset(splits, ATTRS)
    with pytest.raises(ConfigError, match="column .site. has 3 labels but the attribute declares num_classes=2"):
        HFImageDataset(splits["train"], [Attribute("site", "categorical", 2)])
    unseen = splits["test"].cast_column("site", datasets.ClassLabel(names=["east", "north", "south"]))
    with pytest.raises(ConfigError, match="has the label 'south', which the training data did not have"):
        HFImageDataset(unseen, ATTRS[:1], vocabulary={"site": SITES})
    assert len(hf_split(splits, ["train", "test"], "x")) == 16  # several splits: their rows together
    with pytest.raises(ConfigError, match=r"has no split 'heldout'; its splits: \['train', 'test', 'validation'\]"):
        hf_split(splits, ["train", "heldout"], "x")
    with pytest.raises(ConfigError, match="Hugging Face dataset folder './nowhere' not found"):
        load_hf_splits("./nowhere")
    splits["train"].save_to_disk(saved / "one")
    with pytest.raises(ConfigError, match="holds one Dataset, not a DatasetDict"):
        load_hf_splits(saved / "one")


def test_cli_fits_and_evaluates_an_hf_dataset(saved: Path) -> None:
    attributes = ", ".join(f"{{name: {a.name}, kind: {a.kind}" + (f", num_classes: {a.num_classes}}}"
                                                                  if a.num_classes else "}") for a in ATTRS)
    config = saved / "run.yaml"
    config.write_text(f"data: {{kind: hf_dataset, dataset: {saved / 'hf'}, label_column: label, batch_size: 4, "
                      f"image_size: 16, val_split: validation, attributes: [{attributes}]}}\n"
                      "model: {backbone: 'torchvision:resnet18', layer: layer1}\n")
    fast = ["--set", "fit.stats_batches=2", "--set", "fit.progress=false", "--set", "eval.tsne_samples=0",
            "--set", "fit.select_every=2"]
    out = saved / "out"
    assert main(["fit", str(config), "--max-steps", "3", "--output-dir", str(out), *fast]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["select_step"] == [2, 3]  # the validation split was read for model selection
    model = DebiasedEncoder.from_pretrained(out / "model")
    assert model.vocabulary == {"site": SITES, "scanner": ["new", "old"]}
    assert main(["eval", str(out / "model"), str(config), "--output-dir", str(saved / "eval"), *fast]) == 0
    # The saved model, evaluated again on the same splits, scores what the fit's own evaluation scored.
    fitted, again = (json.loads((folder / "metrics.json").read_text())["methods"] for folder in (out, saved / "eval"))
    assert list(again) == ["raw", "leace", "dmm"] and again == fitted
    # A split the dataset lacks is named with the ones it has, before any training.
    assert main(["fit", str(config), "--set", "data.test_split=heldout", "--output-dir", str(saved / "bad"),
                 *fast]) == 2
    assert not (saved / "bad" / "model").exists()
