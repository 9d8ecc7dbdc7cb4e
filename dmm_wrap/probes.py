"""Held-out probes, shared by the evaluation, the leakage audit and model selection: a logistic regression for the
task, and a fresh MLP probe per attribute (balanced accuracy for a categorical one, R^2 for a continuous one).

scikit-learn is imported here, so import this module only where a probe is trained: `import dmm_wrap` does not load
scikit-learn.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from .config import Attribute, EvalConfig


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The share of predictions equal to the labels."""
    return float(np.mean(y_pred == y_true))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The mean recall over the classes of `y_true` (chance 1/K whatever the class frequencies)."""
    with warnings.catch_warnings():  # predicting a class absent from y_true is allowed (it scores 0 recall)
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def classifier_score(model: Any, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                     score: Callable[[np.ndarray, np.ndarray], float] = accuracy) -> float:
    """`score` of `model` fitted on the train rows and predicting the test rows; copes with one or rare classes."""
    classes = np.unique(y_train)
    if len(classes) < 2:  # nothing to learn: the probe can only predict the one class it saw
        return score(y_test, np.full_like(y_test, classes[0]))
    counts = np.unique(y_train, return_counts=True)[1]
    key = "mlpclassifier__early_stopping"
    if key in model.get_params() and (counts.min() < 2 or 0.1 * len(y_train) < len(classes)):
        model.set_params(**{key: False})  # its stratified validation split needs >= 2 samples of every class
    model.fit(x_train, y_train)
    return score(y_test, model.predict(x_test))


def linear_classifier(cfg: EvalConfig) -> Pipeline:
    """A logistic regression on standardised features (the paper's downstream model)."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=cfg.linear_max_iter))


def mlp_probe(cfg: EvalConfig, regression: bool) -> Any:
    """A fresh MLP probe on standardised features, with early stopping; a regressor also standardises its target."""
    kind = MLPRegressor if regression else MLPClassifier
    net = make_pipeline(StandardScaler(), kind(hidden_layer_sizes=cfg.mlp_hidden, early_stopping=True,
                                               max_iter=cfg.mlp_max_iter, random_state=cfg.seed))
    # A standardised target gives the regressor the same well-scaled problem for any attribute's units.
    return TransformedTargetRegressor(net, transformer=StandardScaler()) if regression else net


def mlp_leakage(train_x: np.ndarray, train_b: np.ndarray, test_x: np.ndarray, test_b: np.ndarray,
                attribute: Attribute, cfg: EvalConfig) -> float:
    """The MLP probe's reading of one attribute on the test rows: balanced accuracy (categorical) or R^2."""
    if attribute.kind == "categorical":
        return classifier_score(mlp_probe(cfg, regression=False), train_x, train_b.astype(np.int64), test_x,
                                test_b.astype(np.int64), balanced_accuracy)
    model = mlp_probe(cfg, regression=True)
    if math.ceil(0.1 * len(train_b)) < 2:  # early stopping's validation split (a tenth) needs >= 2 rows
        model.set_params(regressor__mlpregressor__early_stopping=False)
    model.fit(train_x, train_b.astype(np.float64))
    return float(r2_score(test_b.astype(np.float64), model.predict(test_x)))


__all__ = ["accuracy", "balanced_accuracy", "classifier_score", "linear_classifier", "mlp_leakage", "mlp_probe"]
