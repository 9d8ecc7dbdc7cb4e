"""Debiasing quality on an entangled problem, measured by a fresh probe trained on samples no debiaser was fitted on
and scored on others (the full suite is benchmarks/leakage.py). The attribute here changes how the content looks,
not where the features sit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

from dmm_wrap import DebiasedEncoder, FitConfig, HeadConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from problems import STYLE_STRENGTH, vector_problem  # noqa: E402


def _fresh_probe(train_x: np.ndarray, train_b: np.ndarray, test_x: np.ndarray, test_b: np.ndarray) -> float:
    probe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(128, 128), max_iter=300,
                                                          early_stopping=True, random_state=0))
    return balanced_accuracy_score(test_b, probe.fit(train_x, train_b).predict(test_x))


@torch.no_grad()
def _features(enc: DebiasedEncoder, x: torch.Tensor, debiased: bool) -> np.ndarray:
    return (enc(x) if debiased else enc.features(x)).numpy()


def _fit(problem, train, head: HeadConfig, cfg: FitConfig) -> DebiasedEncoder:
    torch.manual_seed(0)
    enc = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes, **vars(head))
    loader = DataLoader(TensorDataset(train.inputs, train.attrs), batch_size=256, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    enc.fit(loader, config=cfg)
    return enc


@pytest.fixture(scope="module")
def style_problem():
    """The problem, its train split (what fit sees), its test split and its probe split (what the leakage probes
    train on: on fit's own samples a probe could learn what h_theta did to them)."""
    # strength 1: the suite's style_overlap problem (its groups 0.83-0.87 readable from raw Z)
    problem = vector_problem("style", 0, {"train": 3000, "val": 0, "test": 1500, "probe": 3000})
    return problem, problem.sample("train"), problem.sample("test"), problem.sample("probe")


def test_raw_features_leak_the_entangled_attribute(style_problem) -> None:
    # Negative control: the attribute is readable from the raw features by a fresh probe (chance 0.25).
    problem, _, test, probe = style_problem
    enc = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
    leak = _fresh_probe(_features(enc, probe.inputs, False), probe.attrs[:, 0].numpy(),
                        _features(enc, test.inputs, False), test.attrs[:, 0].numpy())
    assert leak > 0.75


@pytest.mark.xfail(strict=True, reason="Quality target not met yet: after fit with the defaults a fresh MLP probe "
                                       "still reads the entangled attribute far above chance (README, 'What is known "
                                       "not to work yet'). When this passes, drop the xfail.")
def test_debiased_features_hide_the_entangled_attribute(style_problem) -> None:
    problem, train, test, probe = style_problem
    enc = _fit(problem, train, HeadConfig(), FitConfig(epochs=10, progress=False))
    leak = _fresh_probe(_features(enc, probe.inputs, True), probe.attrs[:, 0].numpy(),
                        _features(enc, test.inputs, True), test.attrs[:, 0].numpy())
    assert leak <= 0.25 + 0.05


@pytest.fixture(scope="module")
def aligned_readings(style_problem) -> dict[str, float]:
    """The suite's aligned setting (HeadConfig.aligned(), FitConfig.aligned()) fitted on the style problem: the MLP
    probe's site reading of Z~ and of raw Z, task accuracy, and the within-class detail an MLP given (features, B)
    reads from Z~ and from raw Z (R^2). Every probe trains on the probe split and scores on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor

    problem, train, test, probe = style_problem
    enc = _fit(problem, train, HeadConfig.aligned(), FitConfig.aligned(epochs=250, progress=False))
    raw = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)

    def detail_r2(x_pr: np.ndarray, x_te: np.ndarray) -> float:
        onehot = np.eye(4)
        model = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(128, 128), max_iter=300,
                                                             early_stopping=True, random_state=0))
        model.fit(np.concatenate([x_pr, onehot[probe.attrs[:, 0].long()]], 1), probe.detail.numpy())
        return r2_score(test.detail.numpy(), model.predict(np.concatenate([x_te, onehot[test.attrs[:, 0].long()]], 1)))

    a, c, d = (_features(enc, split.inputs, True) for split in (train, test, probe))
    rc, rd = (_features(raw, split.inputs, False) for split in (test, probe))
    task = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(a, train.labels.numpy())
    return {"leak": _fresh_probe(d, probe.attrs[:, 0].numpy(), c, test.attrs[:, 0].numpy()),
            "raw_leak": _fresh_probe(rd, probe.attrs[:, 0].numpy(), rc, test.attrs[:, 0].numpy()),
            "task": task.score(c, test.labels.numpy()), "detail": detail_r2(d, c), "raw_detail": detail_r2(rd, rc)}


@pytest.mark.slow
def test_aligned_features_lower_the_leak_and_keep_the_task_and_the_detail(aligned_readings) -> None:
    r = aligned_readings
    assert r["raw_leak"] > 0.75  # negative control
    assert r["leak"] < r["raw_leak"] - 0.3, r
    assert r["task"] > 0.98, r
    assert r["detail"] > 0.5 * r["raw_detail"], r


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="Quality target not met: a fresh MLP probe trained on samples fit never saw "
                                       "reads the group at 0.352 (target <= chance + 0.05 = 0.30; raw 0.832). With the "
                                       "probe trained on fit's own samples it read 0.25 or less: that protocol "
                                       "understated the leakage.")
def test_aligned_features_hide_the_entangled_attribute(aligned_readings) -> None:
    assert aligned_readings["leak"] <= 0.25 + 0.05, aligned_readings


def test_matching_term_lowers_the_linear_leak_and_keeps_the_task(style_problem) -> None:
    """What the group-matching term does achieve: the linear trace of the attribute falls far below raw's while the
    task is kept (fresh linear probes: the attribute's trained on the probe split, the task's on train)."""
    from sklearn.linear_model import LogisticRegression

    problem, train, test, probe = style_problem

    def linear(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return balanced_accuracy_score(y_te, clf.fit(x_tr, y_tr).predict(x_te))

    raw = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
    enc = _fit(problem, train, HeadConfig(residual=True), FitConfig(epochs=10, match_weight=10.0, lam=0.0,
                                                                    progress=False))
    b_pr, b_te = probe.attrs[:, 0].numpy().astype(int), test.attrs[:, 0].numpy().astype(int)
    raw_leak = linear(_features(raw, probe.inputs, False), b_pr, _features(raw, test.inputs, False), b_te)
    a, c, d = (_features(enc, split.inputs, True) for split in (train, test, probe))
    assert raw_leak > 0.75
    assert linear(d, b_pr, c, b_te) < raw_leak - 0.25
    assert linear(a, train.labels.numpy(), c, test.labels.numpy()) > 0.98


@pytest.mark.slow
def test_aligned_preset_removes_a_continuous_entangled_attribute_fitted_on_four_times_the_probes_samples() -> None:
    """The continuous problem (an angle rotates the content), the suite's 4x setting: the aligned preset fitted on
    16,000 samples (the suite's 3,200 steps), a fresh MLP probe trained on 4,000 others. The suite measures R^2
    0.085 +- 0.020 over seeds 0-2 (target 0.10; this seed 0.097); the bound here leaves room for float rounding and
    still fails the matched setting (the same preset fitted on 4,000 samples: 0.187 +- 0.029). Negative control: the
    raw features give the angle away."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor

    problem = vector_problem("continuous", 0, {"train": 16000, "val": 0, "test": 2000, "probe": 4000})
    train, test, probe = problem.sample("train"), problem.sample("test"), problem.sample("probe")
    enc = _fit(problem, train, HeadConfig.aligned(), FitConfig.aligned(epochs=50, progress=False))
    raw = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)

    def r2(x_pr: np.ndarray, x_te: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(128, 128), max_iter=300,
                                                             early_stopping=True, random_state=0))
        return r2_score(test.attrs[:, 0].numpy(), model.fit(x_pr, probe.attrs[:, 0].numpy()).predict(x_te))

    def task(x_tr: np.ndarray, x_te: np.ndarray) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_tr, train.labels.numpy())
        return clf.score(x_te, test.labels.numpy())

    a, c, d = (_features(enc, split.inputs, True) for split in (train, test, probe))
    ra, rc, rd = (_features(raw, split.inputs, False) for split in (train, test, probe))
    assert r2(rd, rc) > 0.9  # negative control
    assert r2(d, c) <= 0.15
    assert task(a, c) >= task(ra, rc) - 0.02


@pytest.mark.slow
def test_alignment_head_hides_the_style_group_fitted_on_four_times_the_probes_samples() -> None:
    """The style problem (each group bends the content its own way; the group readable from raw Z), the suite's 4x
    setting: the alignment head fitted on 16,000 samples, a fresh MLP probe trained on 4,000 others. The suite
    measures 0.298 +- 0.006 over seeds 0-2 (target chance + 0.05 = 0.30; this seed 0.297), with each piece's
    covariance shrunk by its own OAS fraction; the fixed fraction 0.1 it used before reads 0.315 here (0.323 +- 0.008
    over the seeds), which the first bound fails. Negative control: the raw features give the group away."""
    from sklearn.linear_model import LogisticRegression

    problem = vector_problem("style", 0, {"train": 16000, "val": 0, "test": 2000, "probe": 4000}, STYLE_STRENGTH)
    train, test, probe = problem.sample("train"), problem.sample("test"), problem.sample("probe")
    raw = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)

    def head(shrinkage: float | str) -> DebiasedEncoder:
        enc = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
        enc.fit_alignment_head(DataLoader(TensorDataset(train.inputs, train.attrs), batch_size=256),
                               samples=len(train.inputs), shrinkage=shrinkage)
        return enc

    def leak(enc: DebiasedEncoder, debiased: bool) -> float:  # the suite's probe, on float64 features as there
        model = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(128, 128), max_iter=300,
                                                              early_stopping=True, random_state=0))
        model.fit(_features(enc, probe.inputs, debiased).astype(np.float64), probe.attrs[:, 0].long().numpy())
        return balanced_accuracy_score(test.attrs[:, 0].long().numpy(),
                                       model.predict(_features(enc, test.inputs, debiased).astype(np.float64)))

    def task(enc: DebiasedEncoder, debiased: bool) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(_features(enc, train.inputs, debiased), train.labels.numpy())
        return clf.score(_features(enc, test.inputs, debiased), test.labels.numpy())

    with torch.no_grad():
        oas, fixed = head("oas"), head(0.1)
        assert leak(raw, False) > 0.95  # negative control
        assert leak(oas, True) <= 0.305  # 0.297; the fixed fraction's 0.315 fails it
        assert leak(fixed, True) > leak(oas, True)
        assert task(oas, True) >= task(raw, False) - 0.02
