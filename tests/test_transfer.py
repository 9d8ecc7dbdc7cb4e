"""Transfer to attribute classes training never saw (`dmm_wrap.apps.transfer`, `data.train_sites`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dmm_wrap import Attribute, SyntheticDigits
from dmm_wrap.apps.cli import main
from dmm_wrap.apps.evaluate import Metrics
from dmm_wrap.apps.targets import check_targets
from dmm_wrap.apps.transfer import macro_auroc, task_classifiers, transfer_metrics, unseen_classes
from dmm_wrap.config import EvalConfig

ATTRS = [Attribute("site", "categorical", 4), Attribute("dose", "continuous")]
FAST = EvalConfig(linear_max_iter=500)


def _problem(n: int, sites: list[int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 3-class task in dims 0-1; each site adds its own offset to dims 0-1 of the "biased" features (site 3's
    moves every class across the boundaries the other sites' rows teach), which "clean" features lack."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    site = rng.choice(sites, n)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    offsets = np.array([[0.0, 0.0], [0.3, 0.0], [0.0, 0.3], [4.0, 4.0]])
    clean = centres[y] + rng.normal(size=(n, 2))
    biased = clean + offsets[site]
    attrs = np.c_[site, rng.normal(size=n)].astype(np.float32)
    return clean, biased, attrs, y


def test_unseen_site_scores_against_a_reference() -> None:
    clean_tr, biased_tr, attrs_tr, y_tr = _problem(600, [0, 1, 2], 0)
    clean_te, biased_te, attrs_te, y_te = _problem(800, [0, 1, 2, 3], 1)
    assert unseen_classes(attrs_tr, attrs_te, ATTRS) == {"site": (3,)}  # the continuous column is not grouped
    assert unseen_classes(attrs_te, attrs_te, ATTRS) == {}  # negative control: nothing unseen
    views = {"raw": (biased_tr, biased_te), "dmm": (clean_tr, clean_te)}
    (t,) = transfer_metrics(views, attrs_tr, y_tr, attrs_te, y_te, ATTRS, FAST)
    unseen = attrs_te[:, 0] == 3
    assert t.attribute == "site" and t.unseen == (3,)
    assert t.methods["raw"]["unseen"].samples == unseen.sum() and t.methods["raw"]["seen"].samples == (~unseen).sum()
    # The shift of the unseen site breaks the classifier of the biased features there, not on the seen sites.
    assert t.methods["raw"]["seen"].accuracy > 0.9 and t.methods["raw"]["unseen"].accuracy < 0.7
    assert t.methods["dmm"]["unseen"].accuracy > 0.9
    # AUROC: scikit-learn's one-vs-rest macro average, recomputed from a classifier fitted the same way.
    from dmm_wrap.probes import linear_classifier

    model = linear_classifier(FAST).fit(biased_tr, y_tr)
    reference = roc_auc_score(y_te[unseen], model.predict_proba(biased_te[unseen]), multi_class="ovr")
    assert t.methods["raw"]["unseen"].auroc == pytest.approx(reference, abs=1e-12)
    # A class absent from the rows is left out of the average; one class alone has no AUROC.
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert macro_auroc(np.array([0, 1, 1]), proba, np.array([0, 1])) == pytest.approx(1.0)
    assert macro_auroc(np.array([1, 1, 1]), proba, np.array([0, 1])) is None
    # Without task labels there is nothing to transfer.
    assert transfer_metrics(views, attrs_tr, -np.ones_like(y_tr), attrs_te, y_te, ATTRS, FAST) == []


def test_compare_all_fits_one_task_classifier_per_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task accuracy and the seen / unseen scores come from one regression per method, and give the figures
    that fitting them apart gives."""
    from dmm_wrap.apps import evaluate, transfer
    from dmm_wrap.apps.evaluate import FeatureSet, compare_all, compare_methods
    from dmm_wrap.probes import linear_classifier

    clean_tr, biased_tr, attrs_tr, y_tr = _problem(600, [0, 1, 2], 0)
    clean_te, biased_te, attrs_te, y_te = _problem(800, [0, 1, 2, 3], 1)
    train = FeatureSet(biased_tr.astype(np.float32), clean_tr.astype(np.float32), attrs_tr, y_tr)
    test = FeatureSet(biased_te.astype(np.float32), clean_te.astype(np.float32), attrs_te, y_te)
    cfg = EvalConfig(linear_max_iter=500, mlp_hidden=(16,), mlp_max_iter=50, leace=False)
    apart = compare_methods(train, test, ATTRS, cfg)
    views = {"raw": (train.raw, test.raw), "dmm": (train.debiased, test.debiased)}
    apart_transfer = transfer_metrics(views, attrs_tr, y_tr, attrs_te, y_te, ATTRS, cfg)
    fits = []

    def counting(c: EvalConfig) -> object:
        fits.append(1)
        return linear_classifier(c)

    monkeypatch.setattr(evaluate, "linear_classifier", counting)
    monkeypatch.setattr(transfer, "linear_classifier", counting)
    methods, (t,) = compare_all(train, test, ATTRS, cfg)
    # Per method: one task regression and the categorical site's linear probe (the tilt's is a ridge). Fitting the
    # task apart in the transfer would make it three.
    assert len(fits) == 2 * len(views)
    for name in views:
        assert methods[name].task_accuracy == apart[name].task_accuracy
        assert t.methods[name] == apart_transfer[0].methods[name]
    given = task_classifiers(views, y_tr, cfg)
    assert transfer_metrics(views, attrs_tr, y_tr, attrs_te, y_te, ATTRS, cfg, given) == apart_transfer
    assert task_classifiers(views, np.zeros_like(y_tr), cfg) == {}  # one class: nothing to classify


def test_synthetic_digits_draw_from_the_given_sites() -> None:
    some = SyntheticDigits("train", 256, num_sites=4, sites=[0, 2]).generate()
    assert set(some.attrs[:, 2].tolist()) == {0.0, 2.0}
    every = SyntheticDigits("train", 64, num_sites=4).generate()
    listed = SyntheticDigits("train", 64, num_sites=4, sites=[3, 1, 0, 2]).generate()
    assert all(np.array_equal(a, b) for a, b in zip(every, listed))  # every site listed: the same samples
    for bad in ([], [0, 0], [4], [-1]):
        with pytest.raises(ValueError, match=r"sites must be None or distinct site ids in 0..3"):
            SyntheticDigits("train", 8, num_sites=4, sites=bad)


def _fit_run(args: list[str], out: Path, attribute: str, unseen: list[int]) -> tuple[dict, dict]:
    """Run `dmm-wrap fit ARGS`; its metrics.json and the one transfer entry, checked to name `attribute`, `unseen`."""
    assert main(args) == 0
    data = json.loads((out / "metrics.json").read_text())
    (transfer,) = data["transfer"]
    assert transfer["attribute"] == attribute and transfer["unseen"] == unseen
    return data, transfer


def test_fit_reports_the_unseen_site(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["fit", "configs/synthetic_digits.yaml", "--max-steps", "3", "--output-dir", str(out),
            "--set", "data.num_sites=4", "--set", "data.train_sites=[0, 1, 2]", "--set", "data.num_val=0",
            "--set", "eval.tsne_samples=0", "--set", "fit.progress=false", "--set", "method=deepminmax"]
    data, transfer = _fit_run(args, out, "site", [3])
    assert list(transfer["methods"]) == ["raw", "leace", "dmm"]
    # Leakage is scored on the rows of sites a probe could have learnt: chance 1/3, not 1/4.
    assert data["methods"]["raw"]["leakage"]["site"]["chance"] == pytest.approx(1 / 3)
    for groups in transfer["methods"].values():
        assert set(groups) == {"seen", "unseen"} and groups["unseen"]["samples"] > 0
        assert 0.0 <= groups["unseen"]["accuracy"] <= 1.0 and 0.0 <= groups["unseen"]["auroc"] <= 1.0
    metrics = Metrics.from_dict(data)
    assert metrics.to_dict() == data  # metrics.json reads back
    rows = [r for r in check_targets(metrics) if "unseen site" in r.name]
    assert [r.name for r in rows] == [
        "dmm task accuracy on unseen site >= raw + 0.03", "dmm task accuracy on unseen site >= leace",
        "dmm task auroc on unseen site >= raw + 0.03", "dmm task auroc on unseen site >= leace"]
    report = (out / "report.md").read_text()
    assert "Transfer to site [3], never seen in training" in report and "![transfer](transfer.png)" in report
    assert (out / "transfer.png").stat().st_size > 0
    # The training images never show site 3.
    from dmm_wrap.apps.build import build_data
    from dmm_wrap.apps.run_config import load_run_config

    cfg = load_run_config("configs/synthetic_digits.yaml", [("data.num_sites", 4), ("data.train_sites", [0, 1, 2])])
    assert cfg.data.train_sites == [0, 1, 2]
    run = build_data(cfg)
    assert run.train.dataset.sites == (0, 1, 2) and run.test.dataset.sites == (0, 1, 2, 3)


def test_camelyon17_config_scores_the_unseen_hospital(tmp_path: Path) -> None:
    """The shipped configs/camelyon17.yaml protocol on a tiny folder in the WILDS layout: train on hospitals 0, 3
    and 4, test on their held-out patches and on hospital 2."""
    from PIL import Image

    root = tmp_path / "camelyon17_v1.0"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(72):
        center = [0, 3, 4, 2][i % 4]
        split = 0 if center == 2 or i % 3 else 1  # hospitals 0, 3, 4: training (0) and id_val (1) patches
        p, x = 10 + center, i
        tumor = int(rng.random() < 0.5)
        folder = root / "patches" / f"patient_{p:03d}_node_0"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((8, 8, 3)) * 80 + 120 * tumor + 10 * center).astype("uint8")
        Image.fromarray(pixels).save(folder / f"patch_patient_{p:03d}_node_0_x_{x}_y_0.png")
        rows.append(f"{i},{p:03d},0,{x},0,{tumor},{p},{center},{split}")
    (root / "metadata.csv").write_text(",patient,node,x_coord,y_coord,tumor,slide,center,split\n" + "\n".join(rows)
                                       + "\n")
    out = tmp_path / "run"
    args = ["fit", "configs/camelyon17.yaml", "--max-steps", "2", "--output-dir", str(out), "--device", "cpu",
            "--set", f"data.root={tmp_path}", "--set", "data.batch_size=8", "--set", "data.num_workers=0",
            "--set", "data.image_size=16", "--set", "model.backbone=torchvision:resnet18",
            "--set", "model.pretrained=false", "--set", "fit.amp_dtype=null", "--set", "fit.progress=false",
            "--set", "eval.tsne_samples=0", "--set", "fit.stats_batches=2"]
    data, transfer = _fit_run(args, out, "center", [2])
    seen, unseen = transfer["methods"]["raw"]["seen"], transfer["methods"]["raw"]["unseen"]
    assert unseen["samples"] == 18 and seen["samples"] == sum(1 for r in rows if r.endswith(",1"))
    assert "Transfer to center [2], never seen in training" in (out / "report.md").read_text()
    # Leakage is scored on the rows of hospitals a probe could have learnt (0, 3, 4): chance 1/3, not 1/4.
    assert data["methods"]["raw"]["leakage"]["center"]["chance"] == pytest.approx(1 / 3)
