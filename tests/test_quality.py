"""Debiasing quality on an entangled problem, measured by a fresh probe that never saw training (the full suite is
benchmarks/leakage.py). The attribute here changes how the content looks, not where the features sit."""

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
from problems import vector_problem  # noqa: E402


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
    problem = vector_problem("style", 0, {"train": 3000, "val": 0, "test": 1500})
    return problem, problem.sample("train"), problem.sample("test")


def test_raw_features_leak_the_entangled_attribute(style_problem) -> None:
    # Negative control: the attribute is readable from the raw features by a fresh probe (chance 0.25).
    problem, train, test = style_problem
    enc = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
    leak = _fresh_probe(_features(enc, train.inputs, False), train.attrs[:, 0].numpy(),
                        _features(enc, test.inputs, False), test.attrs[:, 0].numpy())
    assert leak > 0.75


@pytest.mark.xfail(strict=True, reason="Quality target not met yet: after fit with the defaults a fresh MLP probe "
                                       "still reads the entangled attribute far above chance (README, 'What is known "
                                       "not to work yet'). When this passes, drop the xfail.")
def test_debiased_features_hide_the_entangled_attribute(style_problem) -> None:
    problem, train, test = style_problem
    enc = _fit(problem, train, HeadConfig(), FitConfig(epochs=10, progress=False))
    leak = _fresh_probe(_features(enc, train.inputs, True), train.attrs[:, 0].numpy(),
                        _features(enc, test.inputs, True), test.attrs[:, 0].numpy())
    assert leak <= 0.25 + 0.05


@pytest.mark.slow
def test_aligned_features_hide_the_entangled_attribute_and_keep_the_task(style_problem) -> None:
    """The suite's aligned setting (HeadConfig.aligned(), FitConfig.aligned()) on the style problem: a fresh MLP
    probe on held-out Z~ is near chance (0.25) while raw reads > 0.75 (the control above), the task is kept, and the
    within-class detail stays readable given B."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor

    problem, train, test = style_problem
    enc = _fit(problem, train, HeadConfig.aligned(), FitConfig.aligned(epochs=250, progress=False))
    a, c = _features(enc, train.inputs, True), _features(enc, test.inputs, True)
    assert _fresh_probe(a, train.attrs[:, 0].numpy(), c, test.attrs[:, 0].numpy()) <= 0.25 + 0.05
    task = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(a, train.labels.numpy())
    assert task.score(c, test.labels.numpy()) > 0.98

    def detail_r2(x_tr: np.ndarray, x_te: np.ndarray) -> float:
        onehot = np.eye(4)
        probe = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(128, 128), max_iter=300,
                                                             early_stopping=True, random_state=0))
        probe.fit(np.concatenate([x_tr, onehot[train.attrs[:, 0].long()]], 1), train.detail.numpy())
        return r2_score(test.detail.numpy(), probe.predict(np.concatenate([x_te, onehot[test.attrs[:, 0].long()]], 1)))

    raw = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
    assert detail_r2(a, c) > 0.5 * detail_r2(_features(raw, train.inputs, False), _features(raw, test.inputs, False))


def test_matching_term_lowers_the_linear_leak_and_keeps_the_task(style_problem) -> None:
    """What the group-matching term does achieve: the linear trace of the attribute falls far below raw's while the
    task is kept (a fresh linear probe, trained on held-out features)."""
    from sklearn.linear_model import LogisticRegression

    problem, train, test = style_problem

    def linear(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return balanced_accuracy_score(y_te, clf.fit(x_tr, y_tr).predict(x_te))

    raw = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
    enc = _fit(problem, train, HeadConfig(residual=True), FitConfig(epochs=10, match_weight=10.0, lam=0.0,
                                                                    progress=False))
    b_tr, b_te = train.attrs[:, 0].numpy().astype(int), test.attrs[:, 0].numpy().astype(int)
    raw_leak = linear(_features(raw, train.inputs, False), b_tr, _features(raw, test.inputs, False), b_te)
    a, c = _features(enc, train.inputs, True), _features(enc, test.inputs, True)
    assert raw_leak > 0.75
    assert linear(a, b_tr, c, b_te) < raw_leak - 0.25
    assert linear(a, train.labels.numpy(), c, test.labels.numpy()) > 0.98
