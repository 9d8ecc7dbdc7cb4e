"""Side-by-side evaluation of raw Z, LEACE-erased Z and DeepMinMax Z~: task accuracy and attribute leakage.

Features are extracted batch by batch and only the evaluation sets are held in memory. Every probe is scored on
held-out test features, so leakage means "B can be decoded from features the probe never saw", not "the probe can
memorise B". The task classifier and LEACE are fitted on the train features (the paper's protocol). The leakage
probes are trained on a probe split when one is given: samples neither `fit` nor model selection saw, so that a
debiaser that hides B only on its own training samples is caught (on the training samples themselves a probe learns
what h_theta did to them, and reads the held-out ones worse than a probe of fresh samples would). Without one, they
train on the train features and `Metrics.leakage_probes` says "train". Categorical leakage is balanced accuracy
(chance 1/K whatever the class frequencies), continuous leakage R^2 (0 for the mean). The probes and the verdict
rule here are shared with the user-facing leakage audit (`dmm_wrap.apps.leakage`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..config import Attribute, EvalConfig
from ..data.batches import attrs_tensor, split_batch
from ..io.serialization import WEIGHTS_SHA_KEY, write_text_atomically
from ..model import DebiasedEncoder
from ..probes import accuracy, balanced_accuracy, classifier_score, linear_classifier, mlp_leakage
from .targets import CHANCE_MARGIN, MAX_R2
from .transfer import Transfer, task_classifiers, transfer_metrics

Method = Literal["raw", "leace", "dmm"]
LeakageMetric = Literal["balanced_accuracy", "r2"]

METHODS: tuple[Method, ...] = ("raw", "leace", "dmm")
"""Evaluated feature sets, in report order: raw Z, LEACE-erased Z, DeepMinMax Z~."""


class FeatureSet(NamedTuple):
    """Features of one evaluation split, held in memory as numpy arrays."""

    raw: np.ndarray
    """Raw hooked features Z [N, D] (float32)."""
    debiased: np.ndarray
    """DeepMinMax features Z~ [N, D~] (float32)."""
    attrs: np.ndarray
    """Attributes [N, A] (float32; class ids in categorical columns)."""
    labels: np.ndarray
    """Task labels [N] (int64); -1 where the dataset has none."""


@dataclass(frozen=True)
class Leakage:
    """How well one attribute can be decoded from held-out features."""

    metric: LeakageMetric
    """"balanced_accuracy" for a categorical attribute, "r2" for a continuous one."""
    chance: float | None
    """1/K for K classes in the test labels (categorical: the balanced accuracy of any prediction made without
    looking at the features); None for continuous (R^2 of the mean is 0)."""
    linear: float
    """Score of a linear probe (logistic regression / ridge)."""
    mlp: float
    """Score of a freshly trained MLP probe."""

    def threshold(self, margin: float = CHANCE_MARGIN, max_r2: float = MAX_R2) -> float:
        """The MLP-probe score at or below which the attribute counts as removed: chance + `margin`, or `max_r2`."""
        if self.metric == "r2":
            return max_r2
        assert self.chance is not None
        return self.chance + margin

    def removed(self, margin: float = CHANCE_MARGIN, max_r2: float = MAX_R2) -> bool:
        """Whether a freshly trained MLP probe reads the attribute no better than `threshold(margin, max_r2)`."""
        return self.mlp <= self.threshold(margin, max_r2)


@dataclass(frozen=True)
class MethodMetrics:
    """Metrics of one feature set."""

    task_accuracy: float | None
    """Test accuracy of a standardised logistic regression on the task label; None when the data has no labels."""
    leakage: dict[str, Leakage]
    """Leakage of each attribute, by name."""


@dataclass
class Metrics:
    """Everything written to metrics.json."""

    methods: dict[str, MethodMetrics] = field(default_factory=dict)
    """Metrics of each evaluated method ("raw", "leace", "dmm")."""
    wall_seconds: float = 0.0
    """Wall time of the whole run that produced them."""
    weights_sha256: str | None = None
    """sha256 of the model.safetensors evaluated, so that metrics.json is tied to those weights (None: unknown)."""
    transfer: list[Transfer] = field(default_factory=list)
    """Task accuracy and AUROC on the test rows of attribute classes training saw and of those it never saw (a
    held-out site); empty when every test class was seen (`dmm_wrap.apps.transfer`)."""
    leakage_probes: Literal["probe", "train"] = "train"
    """What the leakage probes were trained on: "probe", a split nothing was fitted on, or "train", the samples
    h_theta was fitted on (in-sample: it can understate the leakage)."""

    def to_dict(self) -> dict[str, Any]:
        """What metrics.json holds (strict JSON)."""
        out = {
            "methods": {
                name: {
                    "task_accuracy": m.task_accuracy,
                    "leakage": {attr: {"metric": lk.metric, "chance": lk.chance, "linear": lk.linear, "mlp": lk.mlp}
                                for attr, lk in m.leakage.items()},
                }
                for name, m in self.methods.items()
            },
            "wall_seconds": self.wall_seconds,
            "leakage_probes": self.leakage_probes,
        }
        if self.weights_sha256 is not None:
            out[WEIGHTS_SHA_KEY] = self.weights_sha256
        if self.transfer:
            out["transfer"] = [t.to_dict() for t in self.transfer]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        """Read back `to_dict()` (e.g. `json.load` of a metrics.json)."""
        methods = {
            name: MethodMetrics(m["task_accuracy"], {attr: Leakage(**lk) for attr, lk in m["leakage"].items()})
            for name, m in d["methods"].items()
        }
        return cls(methods, float(d["wall_seconds"]), d.get(WEIGHTS_SHA_KEY),
                   [Transfer.from_dict(t) for t in d.get("transfer", [])], d.get("leakage_probes", "train"))

    def write(self, path: str | os.PathLike) -> Path:
        """Write metrics.json (strict JSON: no NaN), atomically."""
        return write_text_atomically(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")


class Collected(NamedTuple):
    """What `collect_batches` read from a loader, as numpy arrays."""

    views: dict[str, np.ndarray]
    """Each named feature set [N, D] (float32); empty when no features were computed."""
    attrs: np.ndarray
    """Attributes [N, A] (float32; class ids in categorical columns)."""
    labels: np.ndarray
    """Task labels [N] (int64); -1 where the batches carry none."""


# --------------------------------------------------------------------------- features
def collect_batches(loader: Iterable, attributes: Sequence[Attribute],
                    encode: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None,
                    device: torch.device | str = "cpu", max_samples: int | None = None) -> Collected:
    """Run `encode` on the inputs of (up to `max_samples` of) the batches of `loader`, under no_grad, and gather
    its named outputs with the batches' validated attributes and task labels.

    Batches are `(inputs, attrs)` or `(inputs, attrs, labels, ...)`; without labels, labels are -1. With
    `encode=None` only attributes and labels are read (the inputs are not touched).
    """
    views: dict[str, list[torch.Tensor]] = {}
    attrs, labels = [], []
    count = 0
    with torch.no_grad():
        for batch_idx, batch in enumerate(loader):
            if max_samples is not None and count >= max_samples:
                break
            inputs, b = split_batch(batch, batch_idx)
            n = len(inputs)
            take = n if max_samples is None else min(n, max_samples - count)
            attrs.append(attrs_tensor(b, tuple(attributes), n, batch_idx)[:take])
            y = batch[2] if isinstance(batch, (tuple, list)) and len(batch) > 2 else None
            labels.append((torch.full((take,), -1) if y is None else torch.as_tensor(y).reshape(-1)[:take]).long())
            if encode is not None:
                for name, z in encode(inputs[:take].to(device)).items():
                    z = z.reshape(take, -1).float()
                    if not torch.isfinite(z).all():
                        raise ValueError(f"Batch {batch_idx}: the {name} features contain NaN or infinite values.")
                    views.setdefault(name, []).append(z.cpu())
            count += take
    if count == 0:
        raise ValueError("The evaluation loader produced no batch. Check the dataset and drop_last.")
    return Collected({name: torch.cat(zs).numpy() for name, zs in views.items()}, torch.cat(attrs).numpy(),
                     torch.cat(labels).numpy())


def extract_features(model: DebiasedEncoder, loader: Iterable, max_samples: int | None = None) -> FeatureSet:
    """Raw Z and debiased Z~ of (up to `max_samples` of) the batches of `loader`, with their attributes and labels.

    Batches are `(inputs, attrs)` or `(inputs, attrs, labels, ...)`; without labels, labels are -1.

    Example:
        >>> test = extract_features(encoder, test_loader, max_samples=2000)
    """

    def encode(x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = model.features(x)
        return {"raw": z, "debiased": model.debias(z)}

    was_training = model.training
    model.eval()
    try:
        got = collect_batches(loader, model.attributes, encode, model.device, max_samples)
    finally:
        model.train(was_training)
    return FeatureSet(got.views["raw"], got.views["debiased"], got.attrs, got.labels)


def encode_attributes(attrs: np.ndarray, attributes: Sequence[Attribute]) -> np.ndarray:
    """The concept matrix LEACE erases: one-hot columns per categorical attribute, the value of a continuous one."""
    cols = []
    for k, a in enumerate(attributes):
        if a.kind == "categorical":
            cols.append(np.eye(a.num_classes, dtype=np.float64)[attrs[:, k].astype(np.int64)])
        else:
            cols.append(attrs[:, k : k + 1].astype(np.float64))
    return np.concatenate(cols, axis=1)


def fit_leace(features: np.ndarray, attrs: np.ndarray, attributes: Sequence[Attribute]) -> Any:
    """A `concept_erasure.LeaceEraser` fitted on `features` to erase all `attributes` at once (in float64)."""
    try:
        from concept_erasure import LeaceEraser
    except ImportError as err:
        raise ImportError("LEACE needs the concept-erasure package: pip install 'dmm-wrap[eval]', "
                          "or set eval.leace: false.") from err
    x = torch.from_numpy(np.asarray(features, dtype=np.float64))
    z = torch.from_numpy(encode_attributes(attrs, attributes))
    return LeaceEraser.fit(x, z)


def apply_eraser(eraser: Any, features: np.ndarray) -> np.ndarray:
    """Erase with a float64 eraser and return float32 features."""
    return eraser(torch.from_numpy(np.asarray(features, dtype=np.float64))).numpy().astype(np.float32)


def task_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  cfg: EvalConfig, model: Any | None = None) -> float | None:
    """Test accuracy of a logistic regression on standardised features (the paper's protocol); None without labels.

    `model`: that regression already fitted on the labelled train rows (`transfer.task_classifiers`), to score
    instead of fitting another.
    """
    keep_train, keep_test = train_y >= 0, test_y >= 0
    if not keep_train.any() or not keep_test.any():
        return None
    if model is not None:
        return accuracy(test_y[keep_test], model.predict(test_x[keep_test]))
    return classifier_score(linear_classifier(cfg), train_x[keep_train], train_y[keep_train],
                            test_x[keep_test], test_y[keep_test])


def attribute_leakage(train_x: np.ndarray, train_b: np.ndarray, test_x: np.ndarray, test_b: np.ndarray,
                      attribute: Attribute, cfg: EvalConfig) -> Leakage:
    """Linear and MLP probes of one attribute, trained on the train features and scored on the test features.

    Categorical: balanced accuracy (the mean recall over the classes of the test labels), chance 1/K; test rows of
    classes that no train row has are left out (no probe can name a class it never saw: such rows are what the
    transfer evaluation scores, `dmm_wrap.apps.transfer`). Continuous: R^2 (0 for the mean, negative when worse).
    """
    if attribute.kind == "categorical":
        seen = np.isin(test_b.astype(np.int64), np.unique(train_b.astype(np.int64)))
        test_x, test_b = test_x[seen], test_b[seen]
    mlp = mlp_leakage(train_x, train_b, test_x, test_b, attribute, cfg)
    if attribute.kind == "categorical":
        y_train, y_test = train_b.astype(np.int64), test_b.astype(np.int64)
        chance = 1.0 / len(np.unique(y_test))
        linear = classifier_score(linear_classifier(cfg), train_x, y_train, test_x, y_test, balanced_accuracy)
        return Leakage("balanced_accuracy", chance, linear, mlp)
    y_train, y_test = train_b.astype(np.float64), test_b.astype(np.float64)
    ridge = make_pipeline(StandardScaler(), Ridge(alpha=cfg.ridge_alpha))
    linear = float(r2_score(y_test, ridge.fit(train_x, y_train).predict(test_x)))
    return Leakage("r2", None, linear, mlp)


def probe_leakage(train_x: np.ndarray, train_attrs: np.ndarray, test_x: np.ndarray, test_attrs: np.ndarray,
                  attributes: Sequence[Attribute], cfg: EvalConfig) -> dict[str, Leakage]:
    """`attribute_leakage` of every attribute (columns of the attribute arrays, in order), by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe capped by max_iter still measures leakage
        return {a.name: attribute_leakage(train_x, train_attrs[:, k], test_x, test_attrs[:, k], a, cfg)
                for k, a in enumerate(attributes)}


def probe_method(train_x: np.ndarray, test_x: np.ndarray, train: FeatureSet, test: FeatureSet,
                 attributes: Sequence[Attribute], cfg: EvalConfig, task_model: Any | None = None,
                 probe: tuple[np.ndarray, FeatureSet] | None = None) -> MethodMetrics:
    """Task accuracy (of `task_model` when given, see `task_accuracy`) and the leakage of every attribute for one
    feature set; the leakage probes train on `probe` (this method's features of the probe split, and that split)
    when given, else on the train features."""
    probe_x, probe_set = probe if probe is not None else (train_x, train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        acc = task_accuracy(train_x, train.labels, test_x, test.labels, cfg, task_model)
    return MethodMetrics(acc, probe_leakage(probe_x, probe_set.attrs, test_x, test.attrs, attributes, cfg))


def method_features(train: FeatureSet, splits: Sequence[FeatureSet], attributes: Sequence[Attribute],
                    cfg: EvalConfig) -> dict[str, list[np.ndarray]]:
    """The features of each evaluated method on each of `splits`: raw Z, LEACE-erased Z (one eraser, fitted on the
    train raw features; with `cfg.leace`) and DeepMinMax Z~."""
    views = {"raw": [s.raw for s in splits]}
    if cfg.leace:
        eraser = fit_leace(train.raw, train.attrs, attributes)
        views["leace"] = [apply_eraser(eraser, s.raw) for s in splits]
    views["dmm"] = [s.debiased for s in splits]
    return views


def method_views(train: FeatureSet, test: FeatureSet, attributes: Sequence[Attribute],
                 cfg: EvalConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(train, test) features of each evaluated method (`method_features` of the two splits)."""
    return {name: (a, b) for name, (a, b) in method_features(train, [train, test], attributes, cfg).items()}


def compare_methods(train: FeatureSet, test: FeatureSet, attributes: Sequence[Attribute],
                    cfg: EvalConfig | None = None,
                    views: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                    models: Mapping[str, Any] | None = None, probe: FeatureSet | None = None,
                    probe_features: Mapping[str, np.ndarray] | None = None) -> dict[str, MethodMetrics]:
    """Probe raw Z, LEACE-erased Z (fitted on the train raw features) and DeepMinMax Z~ with the same protocol
    (`views`: those features, when `method_views` already computed them; `models`: their task classifiers, when
    `transfer.task_classifiers` already fitted them). With `probe` (features of a split nothing was fitted on), the
    leakage probes train on it (`probe_features`: each method's features of it, when already computed).

    Example:
        >>> methods = compare_methods(train, test, encoder.attributes, probe=probe)
        >>> methods["dmm"].leakage["site"].mlp
    """
    cfg = cfg or EvalConfig()
    if views is None or (probe is not None and probe_features is None):
        feats = method_features(train, [train, test] + ([] if probe is None else [probe]), attributes, cfg)
        views = views if views is not None else {name: (f[0], f[1]) for name, f in feats.items()}
        if probe is not None and probe_features is None:
            probe_features = {name: f[2] for name, f in feats.items()}
    models = models or {}
    return {name: probe_method(x_train, x_test, train, test, attributes, cfg, models.get(name),
                               None if probe is None or probe_features is None else (probe_features[name], probe))
            for name, (x_train, x_test) in views.items()}


def compare_transfer(train: FeatureSet, test: FeatureSet, attributes: Sequence[Attribute], cfg: EvalConfig,
                     views: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     models: Mapping[str, Any] | None = None) -> list[Transfer]:
    """`transfer_metrics` of the methods' `views` (and task classifiers, when fitted): seen against unseen classes
    of each categorical attribute."""
    return transfer_metrics(views, train.attrs, train.labels, test.attrs, test.labels, attributes, cfg, models)


def compare_all(train: FeatureSet, test: FeatureSet, attributes: Sequence[Attribute],
                cfg: EvalConfig, probe: FeatureSet | None = None) -> tuple[dict[str, MethodMetrics], list[Transfer]]:
    """`compare_methods` and `compare_transfer` on one set of method views (LEACE fitted once, on train) and one task
    classifier per method (the accuracy and the seen / unseen scores are the same regression's); the leakage probes
    train on `probe` when given."""
    feats = method_features(train, [train, test] + ([] if probe is None else [probe]), attributes, cfg)
    views = {name: (f[0], f[1]) for name, f in feats.items()}
    probe_features = None if probe is None else {name: f[2] for name, f in feats.items()}
    models = task_classifiers(views, train.labels, cfg)
    return (compare_methods(train, test, attributes, cfg, views, models, probe, probe_features),
            compare_transfer(train, test, attributes, cfg, views, models))


def evaluate(model: DebiasedEncoder, train_loader: Iterable, test_loader: Iterable,
             cfg: EvalConfig | None = None, probe_loader: Iterable | None = None) -> Metrics:
    """Extract features from both loaders and compare raw, LEACE and DeepMinMax features.

    Args:
        model: a fitted DebiasedEncoder.
        train_loader: batches (inputs, attrs, labels) the task classifier and LEACE are fitted on (and the leakage
            probes, without `probe_loader`).
        test_loader: held-out batches they are scored on.
        cfg: probe settings; `cfg.max_samples` caps each split.
        probe_loader: held-out batches, of samples the model was not fitted on, that the leakage probes are trained
            on (recommended: on the samples h_theta was fitted on, a probe can understate the leakage).

    Returns:
        Metrics whose wall_seconds is the time this evaluation took.

    Example:
        >>> metrics = evaluate(encoder, train_loader, test_loader)
        >>> metrics.write("runs/x/metrics.json")
    """
    cfg = cfg or EvalConfig()
    start = time.perf_counter()
    train = extract_features(model, train_loader, cfg.max_samples)
    test = extract_features(model, test_loader, cfg.max_samples)
    probe = None if probe_loader is None else extract_features(model, probe_loader, cfg.max_samples)
    methods, transfer = compare_all(train, test, model.attributes, cfg, probe)
    return Metrics(methods, time.perf_counter() - start, transfer=transfer,
                   leakage_probes="train" if probe is None else "probe")


__all__ = ["EvalConfig", "FeatureSet", "Collected", "Leakage", "MethodMetrics", "Metrics", "METHODS", "collect_batches",
           "extract_features", "encode_attributes", "fit_leace", "apply_eraser", "task_accuracy", "attribute_leakage",
           "probe_leakage", "method_features", "method_views", "compare_methods", "compare_transfer", "compare_all",
           "evaluate"]
