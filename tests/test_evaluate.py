"""Evaluation: metrics.json schema, LEACE agrees with concept-erasure and removes linear leakage, probes detect B."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_site_problem
from dmm_wrap import Attribute, DebiasedEncoder
from dmm_wrap.apps.evaluate import (FeatureSet, Leakage, MethodMetrics, Metrics, compare_methods, evaluate,
                                    extract_features, fit_leace)
from dmm_wrap.apps.report import format_table, render_report
from dmm_wrap.apps.targets import check_targets
from dmm_wrap.config import EvalConfig

ATTRS = [Attribute("site", "categorical", 3), Attribute("tilt", "continuous")]
FAST = EvalConfig(mlp_hidden=(32,), mlp_max_iter=100, tsne_samples=0)


def linear_problem(n: int, seed: int) -> FeatureSet:
    """Features [n, 12]: a 4-class task (dims 0-3), and B linearly encoded (site one-hot and tilt in dims 4-7)."""
    rng = np.random.default_rng(seed)
    site, tilt, label = rng.integers(0, 3, n), rng.normal(size=n), rng.integers(0, 4, n)
    mix = np.random.default_rng(99).normal(size=(4, 12))  # B is spread over all dims, not only its own
    b = np.concatenate([np.eye(3)[site], tilt[:, None]], axis=1)
    x = rng.normal(size=(n, 12)) * 0.5 + 2.0 * b @ mix
    x[:, :4] += 2.0 * np.eye(4)[label]
    attrs = np.stack([site, tilt], axis=1).astype(np.float32)
    x = x.astype(np.float32)
    return FeatureSet(x, x.copy(), attrs, label.astype(np.int64))


@pytest.fixture(scope="module")
def linear_metrics() -> dict[str, MethodMetrics]:
    return compare_methods(linear_problem(2000, 0), linear_problem(1000, 1), ATTRS, FAST)


def test_probes_detect_b_on_raw_features(linear_metrics: dict[str, MethodMetrics]) -> None:
    """Negative control: without erasure both probes decode B far above chance."""
    raw = linear_metrics["raw"]
    site, tilt = raw.leakage["site"], raw.leakage["tilt"]
    assert site.metric == "balanced_accuracy" and site.chance == pytest.approx(1 / 3)  # chance 1/K, K = 3 sites
    assert site.linear > site.chance + 0.4 and site.mlp > site.chance + 0.4
    assert tilt.metric == "r2" and tilt.chance is None and tilt.linear > 0.8 and tilt.mlp > 0.7
    assert raw.task_accuracy is not None and raw.task_accuracy > 0.5


def test_leace_removes_linear_leakage(linear_metrics: dict[str, MethodMetrics]) -> None:
    leace = linear_metrics["leace"]
    site, tilt = leace.leakage["site"], leace.leakage["tilt"]
    assert site.linear <= site.chance + 0.04
    assert tilt.linear < 0.03
    assert leace.task_accuracy is not None and leace.task_accuracy > 0.4  # the task survives erasure


def test_leace_matches_concept_erasure() -> None:
    from concept_erasure import LeaceEraser

    train = linear_problem(500, 0)
    ours = fit_leace(train.raw, train.attrs, ATTRS)
    site, tilt = train.attrs[:, 0].astype(int), train.attrs[:, 1]
    z = torch.cat([torch.nn.functional.one_hot(torch.from_numpy(site), 3).double(),
                   torch.from_numpy(tilt).double()[:, None]], dim=1)
    x = torch.from_numpy(train.raw).double()
    reference = LeaceEraser.fit(x, z)
    torch.testing.assert_close(ours(x), reference(x))
    erased = ours(x)
    # Erasure makes the features exactly uncorrelated with every concept column.
    cov = (erased - erased.mean(0)).T @ (z - z.mean(0)) / len(x)
    assert cov.abs().max() < 1e-8


def test_metrics_json_schema(tmp_path: Path, mlp_backbone: nn.Module) -> None:
    x, y, s = make_site_problem(768, 0)
    tilt = x[:, 8] + 0.1 * torch.randn(768)
    attrs = torch.stack([s.float(), tilt], 1)
    enc = DebiasedEncoder(mlp_backbone, None, ATTRS, input_size=(16,))
    enc.fit(DataLoader(TensorDataset(x[:512], attrs[:512]), batch_size=128), max_steps=3, progress=False)
    train = DataLoader(TensorDataset(x[:512], attrs[:512], y[:512]), batch_size=100)
    test = DataLoader(TensorDataset(x[512:], attrs[512:], y[512:]), batch_size=100)
    metrics = evaluate(enc, train, test, FAST)
    data = json.loads(metrics.write(tmp_path / "metrics.json").read_text())

    assert set(data) == {"methods", "wall_seconds", "leakage_probes"} and isinstance(data["wall_seconds"], float)
    assert data["leakage_probes"] == "train"  # no probe loader: in-sample, and metrics.json says so
    assert Metrics.from_dict(data).leakage_probes == "train"
    assert list(data["methods"]) == ["raw", "leace", "dmm"]
    for method in data["methods"].values():
        assert set(method) == {"task_accuracy", "leakage"} and isinstance(method["task_accuracy"], float)
        assert list(method["leakage"]) == ["site", "tilt"]
        site, tilt = method["leakage"]["site"], method["leakage"]["tilt"]
        for entry in (site, tilt):
            assert set(entry) == {"metric", "chance", "linear", "mlp"}
            assert isinstance(entry["linear"], float) and isinstance(entry["mlp"], float)
        assert site["metric"] == "balanced_accuracy" and site["chance"] == pytest.approx(1 / 3)
        assert tilt["metric"] == "r2" and tilt["chance"] is None
    assert Metrics.from_dict(data) == metrics


def test_probe_split_catches_a_debiaser_that_hides_b_on_its_training_rows_only() -> None:
    """On its training rows Z~ carries the attributes of other rows (what a debiaser that memorised them could
    output: B looks independent of Z~ there) and is Z elsewhere: probes trained on the train features read chance
    (in-sample, fooled); probes trained on a probe split read B as well as from raw Z. The task classifier still
    trains on train either way."""
    from dmm_wrap.apps.evaluate import compare_all

    train, test, probe = linear_problem(1500, 0), linear_problem(1000, 1), linear_problem(1500, 2)
    rng, mix = np.random.default_rng(5), np.random.default_rng(99).normal(size=(4, 12))  # linear_problem's mix

    def encoded(site: np.ndarray, tilt: np.ndarray) -> np.ndarray:
        return 2.0 * np.concatenate([np.eye(3)[site.astype(int)], tilt[:, None]], axis=1) @ mix

    shuffled = rng.permutation(len(train.attrs))
    swapped = train.raw - encoded(*train.attrs.T) + encoded(*train.attrs[shuffled].T)
    train = train._replace(debiased=swapped.astype(np.float32))
    fooled, _ = compare_all(train, test, ATTRS, FAST)
    caught, _ = compare_all(train, test, ATTRS, FAST, probe)
    site, tilt = fooled["dmm"].leakage["site"], fooled["dmm"].leakage["tilt"]
    # In sample the linear probes read chance (1/3, R^2 0); the MLP, trained where B is noise, responds to the test
    # rows' B only through its random initial weights.
    assert site.linear < 0.4 and tilt.linear < 0.05
    assert caught["dmm"].leakage["site"].mlp > 0.9 and caught["dmm"].leakage["tilt"].mlp > 0.8
    assert site.mlp < caught["dmm"].leakage["site"].mlp - 0.1 and tilt.mlp < caught["dmm"].leakage["tilt"].mlp - 0.3
    assert caught["raw"].leakage["site"].mlp == pytest.approx(caught["dmm"].leakage["site"].mlp, abs=0.02)
    assert caught["dmm"].task_accuracy == fooled["dmm"].task_accuracy  # the same train-fitted classifier


def test_extract_features_caps_samples_and_fills_missing_labels(mlp_backbone: nn.Module) -> None:
    x, _, s = make_site_problem(300, 0)
    enc = DebiasedEncoder(mlp_backbone, None, ATTRS[:1], input_size=(16,))
    feats = extract_features(enc, DataLoader(TensorDataset(x, s.float()[:, None]), batch_size=64), max_samples=150)
    assert feats.raw.shape == (150, 32) and feats.debiased.shape == (150, 32) and feats.attrs.shape == (150, 1)
    assert (feats.labels == -1).all()
    np.testing.assert_allclose(feats.raw, enc.features(x[:150]).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats.debiased, enc(x[:150]).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert compare_methods(feats, feats, ATTRS[:1], FAST)["raw"].task_accuracy is None  # no labels, no task


def test_sample_cap_for_smoke_runs() -> None:
    cfg = EvalConfig(max_samples=None, smoke_samples=256)
    assert cfg.sample_cap(None) is None and cfg.sample_cap(500) is None and cfg.sample_cap(5) == 256
    assert EvalConfig(max_samples=100, smoke_samples=256).sample_cap(5) == 100


def _metrics(dmm_task: float, site_mlp: float, tilt_mlp: float) -> Metrics:
    def method(task: float, site: float, tilt: float) -> MethodMetrics:
        return MethodMetrics(task, {"site": Leakage("balanced_accuracy", 0.34, site, site),
                                    "tilt": Leakage("r2", None, tilt, tilt)})

    methods = {"raw": method(0.80, 0.9, 0.9), "leace": method(0.81, 0.34, 0.0),
               "dmm": method(dmm_task, site_mlp, tilt_mlp)}
    return Metrics(methods, 1.0)


def test_check_targets() -> None:
    rows = check_targets(_metrics(0.84, 0.38, 0.05))
    assert [r.met for r in rows] == [True, True, True, True]
    names = [r.name for r in rows]
    assert names[0] == "dmm task accuracy >= raw + 0.03" and rows[0].target == pytest.approx(0.83)
    assert rows[1].target == 0.81 and rows[2].target == pytest.approx(0.39) and rows[3].target == 0.10

    rows = check_targets(_metrics(0.815, 0.40, 0.2))
    assert [r.met for r in rows] == [False, True, False, False]
    assert rows[3].measured == 0.2 and not math.isnan(rows[0].measured)


def test_report_says_met_and_not_met() -> None:
    metrics = _metrics(0.815, 0.40, 0.05)
    text = render_report(metrics, check_targets(metrics), ["tsne.png"])
    assert "**NOT MET**: dmm task accuracy >= raw + 0.03 — measured 0.815, target 0.830" in text
    assert "**MET**: dmm MLP-probe R2 of tilt <= 0.1 — measured 0.050, target 0.100" in text
    assert "![tsne](tsne.png)" in text
    table = format_table(metrics)
    assert "site bal. acc MLP" in table and "tilt R² linear" in table and "debiased Z~" in table


def test_probe_survives_a_class_seen_once() -> None:
    from dmm_wrap.apps.evaluate import attribute_leakage

    rng = np.random.default_rng(0)
    b = np.r_[np.zeros(60), np.ones(59), 2.0]  # class 2 has a single training sample
    x = rng.normal(size=(120, 4)) + b[:, None]
    leak = attribute_leakage(x, b, x, b, Attribute("site", "categorical", 3), FAST)
    # Balanced accuracy averages the recalls of the 3 classes; the lone sample of class 2 gets recall 0 or 1, so the
    # two separable classes alone give about (0.85 + 0.85 + 0) / 3 = 0.57 (measured 0.566), against chance 1/3.
    assert leak.metric == "balanced_accuracy" and leak.chance == pytest.approx(1 / 3)
    assert leak.mlp > 0.5 and leak.linear > 0.5


def test_regression_probe_on_ten_rows_reads_a_planted_value() -> None:
    """Early stopping holds out a tenth of the rows, which needs at least 2: on 10 rows the probe trains without it."""
    from dmm_wrap.probes import mlp_leakage

    rng = np.random.default_rng(0)
    b = rng.normal(size=40)
    x = np.c_[b, rng.normal(size=(40, 3))]
    r2 = mlp_leakage(x[:10], b[:10], x[10:], b[10:], Attribute("dose", "continuous"), FAST)
    assert r2 > 0.5  # a value written into the features, read back from 10 training rows
    noise = mlp_leakage(x[:10, 1:], b[:10], x[10:, 1:], b[10:], Attribute("dose", "continuous"), FAST)
    assert noise < 0.2  # negative control: features that do not hold it
