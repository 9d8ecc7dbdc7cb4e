"""Data sets: generated digits (determinism, splits, visible nuisances) and CSV / Camelyon17 image folders."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression, Ridge
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader

from dmm_wrap import Attribute
from dmm_wrap.apps.digits import NUM_DIGIT_CLASSES, SYNTHETIC_ATTRIBUTES, SyntheticDigits, source_indices
from dmm_wrap.data import CAMELYON17_ATTRIBUTES, Camelyon17Patches, ImageCSVDataset, camelyon17
from dmm_wrap.data.batches import attrs_tensor


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    # scikit-learn probes on 2 busy cores run far faster with one BLAS / OpenMP thread.
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def train_batch():
    return SyntheticDigits("train", 1500, seed=3).generate()


@pytest.fixture(scope="module")
def test_batch():
    return SyntheticDigits("test", 600, seed=3).generate()


# --------------------------------------------------------------------------- SyntheticDigits
def test_same_seed_same_samples_and_other_seed_differs() -> None:
    a = SyntheticDigits("train", 300, seed=7).generate()
    b = SyntheticDigits("train", 300, seed=7).generate()
    c = SyntheticDigits("train", 300, seed=8).generate()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.images, c.images) and not torch.equal(a.attrs, c.attrs)
    # A sample depends on its index only, not on which block it was generated in.
    ds = SyntheticDigits("train", 300, seed=7)
    assert torch.allclose(ds.generate([5, 299, 17]).images, a.images[[5, 299, 17]], atol=1e-5)


def test_iteration_matches_generate_and_is_the_same_with_workers() -> None:
    ds = SyntheticDigits("train", 600, seed=1)  # 3 blocks, the last one partial
    expected = ds.generate()
    by_workers = {}
    for workers in (0, 2):
        batches = list(DataLoader(ds, batch_size=64, num_workers=workers))
        images, attrs, labels = (torch.cat(t) for t in zip(*batches))
        assert images.shape == (600, 3, 32, 32) and labels.dtype == torch.int64
        order = torch.argsort(attrs[:, 0])  # rotations are continuous, hence distinct: a canonical order
        by_workers[workers] = images[order], attrs[order], labels[order]
    order = torch.argsort(expected.attrs[:, 0])
    for got in by_workers.values():
        assert torch.equal(got[1], expected.attrs[order]) and torch.equal(got[2], expected.labels[order])
        assert torch.equal(got[0], expected.images[order])
    assert len(ds) == 600


def test_train_and_test_use_disjoint_source_digits() -> None:
    train, test = set(source_indices("train").tolist()), set(source_indices("test").tolist())
    assert not train & test
    assert len(train | test) == 1797 and abs(len(test) - 0.3 * 1797) < 1
    assert set(SyntheticDigits("test", 10).source_indices.tolist()) == test
    # The validation split renders the training writers with draws of its own.
    val = SyntheticDigits("val", 64)
    assert set(val.source_indices.tolist()) == train
    assert not torch.equal(val.generate().attrs, SyntheticDigits("train", 64).generate().attrs)


def test_shapes_ranges_and_normalisation(train_batch) -> None:
    images, attrs, labels = train_batch
    assert images.shape == (1500, 3, 32, 32) and images.dtype == torch.float32
    assert attrs.shape == (1500, 3) and attrs.dtype == torch.float32
    assert attrs[:, :2].min() >= -1 and attrs[:, :2].max() <= 1
    assert attrs[:, 0].std() > 0.5 and attrs[:, 1].std() > 0.5  # uniform on [-1, 1]: std 0.577
    assert set(attrs[:, 2].tolist()) == {0.0, 1.0, 2.0}
    assert set(labels.tolist()) == set(range(NUM_DIGIT_CLASSES))
    assert abs(images.mean().item()) < 0.2 and 0.7 < images.std().item() < 1.3
    # The attributes are valid for the trainer as declared.
    attrs_tensor(attrs, SYNTHETIC_ATTRIBUTES, len(attrs), 0)
    ds = SyntheticDigits("train", 40, image_size=48, num_sites=5)
    b = ds.generate()
    assert b.images.shape == (40, 3, 48, 48) and b.attrs[:, 2].max() <= 4
    assert ds.attributes[2] == Attribute("site", "categorical", num_classes=5)


def _summary(images: torch.Tensor) -> np.ndarray:
    """Per-channel mean, std and the grey image at 16x16: simple features a linear probe can use."""
    grey = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 2).flatten(1)
    return torch.cat([images.mean((2, 3)), images.std((2, 3)), grey], 1).numpy()


def test_nuisances_are_visible_to_a_pixel_probe(train_batch, test_batch) -> None:
    xtr, xte = _summary(train_batch.images), _summary(test_batch.images)
    site_tr, site_te = train_batch.attrs[:, 2].numpy(), test_batch.attrs[:, 2].numpy()
    site_acc = LogisticRegression(max_iter=2000).fit(xtr[:, :6], site_tr).score(xte[:, :6], site_te)
    assert site_acc > 0.95  # measured 1.00; chance is about 1/3
    # Negative control: with site ids shuffled in both splits (independent of the images) the probe is at chance.
    rng = np.random.default_rng(0)
    control = LogisticRegression(max_iter=2000).fit(xtr[:, :6], rng.permutation(site_tr))
    assert 0.25 < control.score(xte[:, :6], rng.permutation(site_te)) < 0.42
    # Width changes the amount of ink, rotation moves it: a linear probe on pixels recovers both on unseen digits.
    for k, floor in ((0, 0.6), (1, 0.55)):  # measured R^2: rotation 0.80, width 0.74
        y_tr, y_te = train_batch.attrs[:, k].numpy(), test_batch.attrs[:, k].numpy()
        assert Ridge(alpha=10.0).fit(xtr, y_tr).score(xte, y_te) > floor


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="valid", num_samples=10), "split must be 'train', 'val', 'test' or 'probe'"),
    (dict(split="train", num_samples=0), "num_samples must be an int >= 1"),
    (dict(split="train", num_samples=10, num_sites=1), "num_sites must be an int in 2..8"),
    (dict(split="train", num_samples=10, num_sites=9), "num_sites must be an int in 2..8"),
    (dict(split="train", num_samples=10, image_size=8), "image_size must be an int >= 16"),
    (dict(split="train", num_samples=10, seed=-1), "seed must be an int >= 0"),
])
def test_synthetic_digits_rejects_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticDigits(**kwargs)


def test_generate_rejects_bad_indices() -> None:
    with pytest.raises(ValueError, match="indices must lie in 0..9"):
        SyntheticDigits("train", 10).generate([3, 10])


# --------------------------------------------------------------------------- ImageCSVDataset
def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    for k in range(4):
        _png(tmp_path / "img" / f"{k}.png", 60 * k)
    rows = [[f"img/{k}.png", ["b", "a", "c", "a"][k], 30.5 + k, k % 2, ["cat", "dog", "cat", "dog"][k]]
            for k in range(4)]
    _write_csv(tmp_path / "data.csv", ["path", "site", "age", "scanner", "label"], rows)
    return tmp_path


def test_image_csv_dataset_reads_images_attributes_and_labels(image_folder: Path) -> None:
    attributes = [Attribute("site", "categorical", 3), Attribute("age", "continuous"),
                  Attribute("scanner", "categorical", 2)]
    ds = ImageCSVDataset(image_folder, image_folder / "data.csv", attributes, label_column="label")
    assert len(ds) == 4
    image, attrs, label = ds[2]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full((3, 8, 8), 120 / 255))
    assert ds.class_names == {"site": ["a", "b", "c"]}  # string labels -> ids in sorted order; ints stay as they are
    assert attrs.tolist() == [2.0, 32.5, 0.0] and label.item() == 0 and ds.label_names == ["cat", "dog"]
    assert ds.attrs[:, 0].tolist() == [1.0, 0.0, 2.0, 0.0]
    images, batch_attrs, labels = next(iter(DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 1, 0, 1]
    attrs_tensor(batch_attrs, ds.attributes, 4, 0)

    unlabelled = ImageCSVDataset(image_folder, image_folder / "data.csv", [Attribute("age", "continuous")],
                                 transform=lambda img: torch.zeros(1))
    assert unlabelled[0][2].item() == -1 and unlabelled[0][0].shape == (1,)


def test_image_csv_dataset_errors(image_folder: Path) -> None:
    site = [Attribute("site", "categorical", 3)]
    with pytest.raises(ValueError, match="not found"):
        ImageCSVDataset(image_folder, image_folder / "nope.csv", site)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['hospital'\]; available columns: \['path', 'site'"):
        ImageCSVDataset(image_folder, image_folder / "data.csv", [Attribute("hospital", "categorical", 2)])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['file'\]"):
        ImageCSVDataset(image_folder, image_folder / "data.csv", site, path_column="file")
    with pytest.raises(ValueError, match="3 distinct labels .* num_classes=2"):
        ImageCSVDataset(image_folder, image_folder / "data.csv", [Attribute("site", "categorical", 2)])
    with pytest.raises(TypeError, match="must be a sequence of Attribute"):
        ImageCSVDataset(image_folder, image_folder / "data.csv", Attribute("age", "continuous"))
    with pytest.raises(ValueError, match="continuous attribute 'site' must hold numbers"):
        ImageCSVDataset(image_folder, image_folder / "data.csv", [Attribute("site", "continuous")])

    rows = [["img/0.png", 0], ["img/1.png", 3], ["img/9.png", 1], ["img/8.png", 1]]
    out_of_range = _write_csv(image_folder / "ids.csv", ["path", "site"], rows[:2])
    with pytest.raises(ValueError, match=r"must hold class ids 0..2, data row 2 has 3"):
        ImageCSVDataset(image_folder, out_of_range, site)
    missing = _write_csv(image_folder / "missing.csv", ["path", "site"], rows[2:])
    with pytest.raises(ValueError, match=r"2 of 2 image files do not exist.*img/9.png"):
        ImageCSVDataset(image_folder, missing, site)
    fractional = _write_csv(image_folder / "frac.csv", ["path", "site"], [["img/0.png", 0.5]])
    with pytest.raises(ValueError, match="non-integer value '0.5'"):
        ImageCSVDataset(image_folder, fractional, site)
    empty = _write_csv(image_folder / "empty.csv", ["path", "site"], [])
    with pytest.raises(ValueError, match="no rows"):
        ImageCSVDataset(image_folder, empty, site)


def test_eval_split_uses_the_training_vocabulary(image_folder: Path) -> None:
    """Train {a, b, c} maps to 0/1/2; a test CSV holding only {b, c} must keep b=1, c=2 (not 0/1)."""
    site = [Attribute("site", "categorical", 3)]
    train = ImageCSVDataset(image_folder, image_folder / "data.csv", site, label_column="label")
    assert train.vocabulary == {"site": ["a", "b", "c"], "label": ["cat", "dog"]}
    test_csv = _write_csv(image_folder / "test.csv", ["path", "site", "label"],
                          [["img/0.png", "c", "dog"], ["img/1.png", "b", "dog"], ["img/2.png", "c", "dog"]])
    alone = ImageCSVDataset(image_folder, test_csv, site, label_column="label")
    assert alone.attrs[:, 0].tolist() == [1.0, 0.0, 1.0]  # control: read on its own, the ids shift
    test = ImageCSVDataset(image_folder, test_csv, site, label_column="label", vocabulary=train.vocabulary)
    assert test.attrs[:, 0].tolist() == [2.0, 1.0, 2.0] and test.labels.tolist() == [1, 1, 1]
    assert test.vocabulary == train.vocabulary and test.class_names == {"site": ["a", "b", "c"]}

    unseen = _write_csv(image_folder / "unseen.csv", ["path", "site", "label"],
                        [["img/0.png", "a", "cat"], ["img/1.png", "d", "cat"]])
    with pytest.raises(ValueError, match=r"column 'site', data row 2 has the label 'd', which the training data "
                                         r"did not have \(its labels: \['a', 'b', 'c'\]\)"):
        ImageCSVDataset(image_folder, unseen, site, label_column="label", vocabulary=train.vocabulary)
    with pytest.raises(ValueError, match=r"column 'label', data row 1 has the label 'bird'"):
        ImageCSVDataset(image_folder, _write_csv(image_folder / "bird.csv", ["path", "site", "label"],
                                                 [["img/0.png", "a", "bird"]]), site, label_column="label",
                        vocabulary=train.vocabulary)
    # A column the training data held as class ids stays ids: text there is a mismatch, not a new vocabulary.
    with pytest.raises(ValueError, match=r"column 'site' held class ids in the training data, but data row 1 has "
                                         r"the label 'c'"):
        ImageCSVDataset(image_folder, test_csv, site, vocabulary={"label": ["cat", "dog"]})


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.png", "img/../../outside.png", "img/..\\..\\x.png",
                                  "C:\\data\\x.png"])
def test_image_paths_must_stay_under_the_root(image_folder: Path, path: str) -> None:
    outside = image_folder.parent / "outside.png"
    _png(outside, 0)
    bad = _write_csv(image_folder / "bad.csv", ["path", "site"], [["img/0.png", 0], [path, 1]])
    with pytest.raises(ValueError, match=rf"data row 2: the image path {re.escape(repr(path))} .*relative path "
                                         r"under the root"):
        ImageCSVDataset(image_folder, bad, [Attribute("site", "categorical", 3)], check_files=False)
    nested = _write_csv(image_folder / "ok.csv", ["path", "site"], [["img/0.png", 0], ["./img/1.png", 1]])
    assert len(ImageCSVDataset(image_folder, nested, [Attribute("site", "categorical", 3)])) == 2  # control


# --------------------------------------------------------------------------- Camelyon17
@pytest.fixture
def camelyon_root(tmp_path: Path) -> Path:
    root = tmp_path / "wilds" / "camelyon17_v1.0"
    # (patient, node, x, y, tumor, slide, center, split): WILDS stores patient zero-padded.
    rows = [("004", 4, 3328, 21792, 1, 0, 0, 0), ("004", 4, 3200, 22272, 0, 0, 0, 1),
            ("015", 1, 10, 20, 0, 8, 1, 0), ("022", 0, 96, 192, 1, 12, 2, 0), ("039", 1, 5, 6, 1, 19, 3, 0)]
    with open(_mkdir(root) / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"])
        for i, (p, node, x, y, tumor, slide, center, split) in enumerate(rows):
            writer.writerow([i, p, node, x, y, tumor, slide, center, split])
            _png(root / f"patches/patient_{p}_node_{node}/patch_patient_{p}_node_{node}_x_{x}_y_{y}.png", 40 * i)
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_camelyon17_reads_the_wilds_layout_and_splits(camelyon_root: Path) -> None:
    everything = camelyon17(camelyon_root)
    assert len(everything) == 5 and everything.attributes == CAMELYON17_ATTRIBUTES
    assert everything.attrs[:, 0].tolist() == [0, 0, 1, 2, 3] and everything.labels.tolist() == [1, 0, 0, 1, 1]
    image, attrs, label = everything[3]
    assert image.shape == (3, 8, 8) and torch.allclose(image, torch.full((3, 8, 8), 120 / 255))
    splits = {s: camelyon17(camelyon_root, split=s).attrs[:, 0].tolist() for s in ("train", "id_val", "val", "test")}
    assert splits == {"train": [0.0, 3.0], "id_val": [0.0], "val": [1.0], "test": [2.0]}
    # Several splits: their patches together, in the metadata's order.
    assert camelyon17(camelyon_root, split=["test", "id_val"]).attrs[:, 0].tolist() == [0.0, 2.0]
    # The folder holding camelyon17_v1.0 (as wilds downloads it) works too, and centers filter.
    by_center = Camelyon17Patches(camelyon_root.parent, centers=[0, 3], check_files=False)
    assert by_center.labels.tolist() == [1, 0, 1]


def test_camelyon17_errors(camelyon_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dmm_wrap never downloads"):
        camelyon17(tmp_path / "empty")
    with pytest.raises(ValueError, match="split must be None, one of .* or a list of them"):
        camelyon17(camelyon_root, split="validation")
    with pytest.raises(ValueError, match="split must be None, one of"):
        camelyon17(camelyon_root, split=["id_val", "heldout"])
    with pytest.raises(ValueError, match="centers must be a non-empty list of ids in 0..4"):
        camelyon17(camelyon_root, centers=[7])
    with pytest.raises(ValueError, match="No Camelyon17 patch matches"):
        camelyon17(camelyon_root, split="val", centers=[0])
    next((camelyon_root / "patches").glob("patient_015*/*.png")).unlink()
    with pytest.raises(ValueError, match="1 of 5 image files do not exist.*patient_015_node_1_x_10_y_20"):
        camelyon17(camelyon_root)
