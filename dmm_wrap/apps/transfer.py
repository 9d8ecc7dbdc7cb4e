"""Transfer to groups training never saw: the task classifier's accuracy and AUROC on the test rows of attribute
classes present in the training rows ("seen") and on those of classes absent from them ("unseen"): a hospital, or a
site, held out of training (`data.train_sites`, or Camelyon17's test hospital).

The classifier is the evaluation's (a logistic regression on standardised features, fitted on the train split), one
per feature set, so raw Z, LEACE and DeepMinMax are compared on the same rows. AUROC is one-vs-rest, averaged over the
task classes that occur in the rows scored (with both positives and negatives), as scikit-learn's macro average.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score

from ..config import Attribute, EvalConfig
from ..probes import linear_classifier

GROUPS = ("seen", "unseen")
"""The two groups of test rows, in report order."""


@dataclass(frozen=True)
class GroupScores:
    """The task classifier on one group of test rows."""

    accuracy: float
    auroc: float | None
    """One-vs-rest AUROC, macro over the task classes present; None when the rows hold fewer than two classes."""
    samples: int


@dataclass(frozen=True)
class Transfer:
    """Seen against unseen classes of one categorical attribute."""

    attribute: str
    unseen: tuple[int, ...]
    """Class ids of the attribute that occur in the test rows but in no training row."""
    methods: dict[str, dict[str, GroupScores | None]] = field(default_factory=dict)
    """Per feature set ("raw", "leace", "dmm"): the scores of the "seen" and "unseen" rows (None: no such row)."""

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON form, as metrics.json holds it."""
        return {"attribute": self.attribute, "unseen": list(self.unseen),
                "methods": {m: {g: (asdict(s) if s is not None else None) for g, s in groups.items()}
                            for m, groups in self.methods.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Transfer:
        """Read back `to_dict()`."""
        methods = {m: {g: (GroupScores(**s) if s is not None else None) for g, s in groups.items()}
                   for m, groups in d["methods"].items()}
        return cls(d["attribute"], tuple(d["unseen"]), methods)


def unseen_classes(train_attrs: np.ndarray, test_attrs: np.ndarray,
                   attributes: Sequence[Attribute]) -> dict[str, tuple[int, ...]]:
    """Per categorical attribute, the class ids in `test_attrs` that no row of `train_attrs` has (only those with
    some)."""
    out = {}
    for k, a in enumerate(attributes):
        if a.kind != "categorical":
            continue
        seen = set(train_attrs[:, k].astype(np.int64).tolist())
        unseen = sorted(set(test_attrs[:, k].astype(np.int64).tolist()) - seen)
        if unseen:
            out[a.name] = tuple(unseen)
    return out


def macro_auroc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float | None:
    """One-vs-rest AUROC averaged over the classes of `classes` (the columns of `proba`) that `y` holds together
    with other classes; None when there is no such class."""
    scores = [roc_auc_score(y == c, proba[:, j]) for j, c in enumerate(classes) if 0 < np.sum(y == c) < len(y)]
    return float(np.mean(scores)) if scores else None


def group_scores(model: Any, x: np.ndarray, y: np.ndarray) -> GroupScores | None:
    """Accuracy and AUROC of a fitted classifier on rows (x, y); None when there are no rows."""
    if len(y) == 0:
        return None
    proba = model.predict_proba(x)
    classes = model.classes_
    predicted = classes[np.argmax(proba, axis=1)]
    return GroupScores(float(np.mean(predicted == y)), macro_auroc(y, proba, classes), len(y))


def task_classifiers(views: Mapping[str, tuple[np.ndarray, np.ndarray]], train_labels: np.ndarray,
                     cfg: EvalConfig) -> dict[str, Any]:
    """The task's logistic regression (`linear_classifier`) of each method in `views`, fitted on its labelled train
    rows (label >= 0); empty when those rows hold fewer than two classes (nothing to classify)."""
    keep = train_labels >= 0
    if len(np.unique(train_labels[keep])) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # capped by max_iter, still the paper's classifier
        return {method: linear_classifier(cfg).fit(x_train[keep], train_labels[keep])
                for method, (x_train, _) in views.items()}


def transfer_metrics(views: Mapping[str, tuple[np.ndarray, np.ndarray]], train_attrs: np.ndarray,
                     train_labels: np.ndarray, test_attrs: np.ndarray, test_labels: np.ndarray,
                     attributes: Sequence[Attribute], cfg: EvalConfig,
                     models: Mapping[str, Any] | None = None) -> list[Transfer]:
    """Seen / unseen scores of each feature set in `views` ({method: (train features, test features)}), for every
    categorical attribute whose test rows hold classes the training rows do not. Empty without task labels (two
    classes at least in training) or without such an attribute.

    `models`: the methods' `task_classifiers`, when the caller already fitted them (the task accuracy's); by default
    they are fitted here.

    Example:
        >>> [t.methods["dmm"]["unseen"].auroc for t in transfer_metrics(views, ..., attributes, EvalConfig())]
    """
    unseen = unseen_classes(train_attrs, test_attrs, attributes)
    keep_test = test_labels >= 0
    if not unseen or not keep_test.any():
        return []
    models = models if models is not None else task_classifiers(views, train_labels, cfg)
    if not models:
        return []
    column = {a.name: k for k, a in enumerate(attributes)}
    out = []
    for name, classes in unseen.items():
        is_unseen = np.isin(test_attrs[:, column[name]].astype(np.int64), classes)
        rows = {"seen": keep_test & ~is_unseen, "unseen": keep_test & is_unseen}
        methods = {method: {g: group_scores(models[method], x_test[rows[g]], test_labels[rows[g]]) for g in GROUPS}
                   for method, (_, x_test) in views.items()}
        out.append(Transfer(name, classes, methods))
    return out


__all__ = ["GROUPS", "GroupScores", "Transfer", "group_scores", "macro_auroc", "task_classifiers", "transfer_metrics",
           "unseen_classes"]
