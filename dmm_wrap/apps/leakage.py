"""The leakage audit: can each sensitive attribute still be decoded from a set of features, on held-out data?

For each feature set (raw Z and debiased Z~ of a `DebiasedEncoder`, the output of any callable, or features you
computed yourself) and each attribute, a linear and a freshly trained MLP probe are fitted on one part of the data
and scored on another: balanced accuracy for a categorical attribute (chance 1/K), R^2 for a continuous one. The
verdict is "removed" when the MLP probe does no better than chance + `margin` (or R^2 `max_r2`), "leaks" otherwise.
The probes are those of the evaluation (`dmm_wrap.apps.evaluate`), so an audit and a run report measure the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..config import Attribute, EvalConfig, check_fields
from ..data.batches import attrs_tensor
from ..io.card import card_with_audit
from ..io.serialization import AUDIT_NAME, README_NAME, write_atomically
from ..model import DebiasedEncoder
from ..version import __version__
from .evaluate import Leakage, collect_batches, extract_features, probe_leakage
from .report import markdown_table
from .targets import CHANCE_MARGIN, MAX_R2

Verdict = Literal["removed", "leaks"]
ArrayLike = Union[np.ndarray, Tensor]
Features = Union[ArrayLike, Sequence[ArrayLike], Mapping[str, ArrayLike]]
"""Precomputed features: one array [N, D], a pair (Z, Z~), or {name: array [N, D]}."""

AUDIT_MD = "audit.md"
VIEW_TITLES = {"raw": "raw Z", "debiased": "debiased Z~", "features": "features"}
"""How each feature set is named in tables."""


@dataclass
class AuditConfig:
    """When an attribute counts as removed, and how one loader is split; the probes are set by an `EvalConfig`."""

    margin: float = CHANCE_MARGIN
    """Categorical: removed when the MLP probe's balanced accuracy is at most chance (1/K) + margin."""

    max_r2: float = MAX_R2
    """Continuous: removed when the MLP probe's held-out R^2 is at most this."""

    test_fraction: float = 0.3
    """Without a separate test loader: the share of the samples held out to score the probes."""

    seed: int = 0
    """Seed of that split (a permutation of the samples), so an audit is repeatable."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 <= self.margin < 1:
            raise ValueError(f"AuditConfig.margin must be in [0, 1), got {self.margin!r}.")
        if not self.max_r2 < 1:
            raise ValueError(f"AuditConfig.max_r2 must be below 1, got {self.max_r2!r}.")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"AuditConfig.test_fraction must be in (0, 1), got {self.test_fraction!r}.")


@dataclass(frozen=True)
class AttributeAudit:
    """The audit of one attribute in one feature set."""

    leakage: Leakage
    """Scores of the linear and MLP probes, and the chance level."""
    threshold: float
    """The MLP-probe score at or below which the attribute counts as removed."""
    verdict: Verdict
    """"removed" or "leaks"."""

    def to_dict(self) -> dict[str, Any]:
        """This audit as audit.json holds it: the probe scores, the threshold and the verdict."""
        lk = self.leakage
        return {"metric": lk.metric, "chance": lk.chance, "linear": lk.linear, "mlp": lk.mlp,
                "threshold": self.threshold, "verdict": self.verdict}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttributeAudit:
        """Read back `to_dict()`."""
        return cls(Leakage(d["metric"], d["chance"], d["linear"], d["mlp"]), d["threshold"], d["verdict"])


@dataclass(frozen=True)
class AuditReport:
    """The result of `audit`: per feature set and attribute, the probe scores and the verdict."""

    features: dict[str, dict[str, AttributeAudit]]
    """{feature set: {attribute: its audit}}, e.g. {"raw": {...}, "debiased": {...}}."""
    attributes: tuple[Attribute, ...]
    """The audited attributes, in column order."""
    train_samples: int
    """Samples the probes were trained on."""
    test_samples: int
    """Held-out samples they were scored on."""
    split: str
    """Where the held-out samples came from ("a separate test set", or the random share of one set)."""
    config: AuditConfig = field(default_factory=AuditConfig)
    """The verdict criteria and split settings used."""
    model: dict[str, Any] | None = None
    """The audited saved model ({"source", "weights_sha256"}), when the audit ran on one; None otherwise."""
    wall_seconds: float = 0.0
    """Wall time of the audit."""

    @property
    def main_features(self) -> str:
        """The feature set the headline verdicts are about: "debiased" when audited, else the last one."""
        return "debiased" if "debiased" in self.features else list(self.features)[-1]

    def verdicts(self, features: str | None = None) -> dict[str, Verdict]:
        """{attribute: verdict} for one feature set (default: `main_features`)."""
        return {name: a.verdict for name, a in self.features[features or self.main_features].items()}

    def to_dict(self) -> dict[str, Any]:
        """What audit.json holds (strict JSON)."""
        return {
            "dmm_wrap_version": __version__,
            "model": self.model,
            "attributes": [a.to_dict() for a in self.attributes],
            "samples": {"train": self.train_samples, "test": self.test_samples},
            "split": self.split,
            "criteria": {"margin": self.config.margin, "max_r2": self.config.max_r2},
            "features": {view: {name: a.to_dict() for name, a in attrs.items()}
                         for view, attrs in self.features.items()},
            "verdicts": self.verdicts(),
            "main_features": self.main_features,
            "wall_seconds": self.wall_seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditReport:
        """Read back `to_dict()` (e.g. `json.load` of an audit.json)."""
        features = {view: {name: AttributeAudit.from_dict(a) for name, a in attrs.items()}
                    for view, attrs in d["features"].items()}
        config = AuditConfig(margin=d["criteria"]["margin"], max_r2=d["criteria"]["max_r2"])
        return cls(features, tuple(Attribute(**a) for a in d["attributes"]), d["samples"]["train"],
                   d["samples"]["test"], d["split"], config, d.get("model"), float(d.get("wall_seconds", 0.0)))

    def format_table(self) -> str:
        """A Markdown table: one row per feature set and attribute, the probes' scores, the threshold, the verdict."""
        header = ["features", "attribute", "metric", "chance", "linear probe", "MLP probe", "removed if MLP ≤",
                  "verdict"]
        rows = []
        for view, attrs in self.features.items():
            for name, a in attrs.items():
                lk = a.leakage
                rows.append([VIEW_TITLES.get(view, view), name, lk.metric.replace("_", " "), _fmt(lk.chance),
                             _fmt(lk.linear), _fmt(lk.mlp), _fmt(a.threshold), a.verdict])
        return markdown_table(header, rows)

    def __str__(self) -> str:
        return self.format_table()

    def to_markdown(self, title: str = "Leakage audit") -> str:
        """The text of audit.md: the protocol, the table and one verdict line per attribute."""
        view = self.main_features
        lines = [
            f"# {title}",
            "",
            f"Each attribute is probed by a linear model and a freshly trained MLP, trained on {self.train_samples} "
            f"samples and scored on {self.test_samples} held-out ones ({self.split}). Categorical attributes: "
            f"balanced accuracy, chance 1/K; removed when the MLP probe scores at most chance + "
            f"{self.config.margin:g}. Continuous attributes: R² (0 = the mean); removed when the MLP probe's R² is "
            f"at most {self.config.max_r2:g}.",
            "",
            self.format_table(),
            "",
            f"## Verdicts on {VIEW_TITLES.get(view, view)}",
            "",
        ]
        for name, a in self.features[view].items():
            sign = "≤" if a.verdict == "removed" else ">"
            lines.append(f"- **{name}**: {a.verdict} (MLP probe {a.leakage.mlp:.3f} {sign} {a.threshold:.3f})")
        if self.model is not None:
            lines += ["", f"Model: `{self.model.get('source')}` (weights sha256 {self.model.get('weights_sha256')})."]
        lines += ["", f"Audit time: {self.wall_seconds:.1f} s."]
        return "\n".join(lines) + "\n"

    def write(self, directory: str | os.PathLike) -> Path:
        """Write audit.json and audit.md into `directory`, atomically file by file.

        When `directory` holds a model saved by `save_pretrained` whose card README.md was not edited by hand, the
        card is rewritten to show this audit (unless the audit records other weights than the saved ones).

        Example:
            >>> audit(encoder, loader).write("runs/debiased-resnet18")
        """
        directory = Path(directory)
        data = self.to_dict()
        card = card_with_audit(directory, data)

        def writer(tmp: Path) -> None:
            (tmp / AUDIT_NAME).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
            (tmp / AUDIT_MD).write_text(self.to_markdown(), encoding="utf-8")
            if card is not None:
                (tmp / README_NAME).write_text(card)

        return write_atomically(directory, writer)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------- gathering the features
@dataclass(frozen=True)
class _Part:
    """Features and attributes of one part of the data (before an eventual split)."""

    views: dict[str, np.ndarray]
    """{feature set: [N, D] float32}."""
    attrs: np.ndarray
    """[N, A] float32."""

    def __len__(self) -> int:
        return len(self.attrs)

    def take(self, index: np.ndarray) -> _Part:
        return _Part({name: z[index] for name, z in self.views.items()}, self.attrs[index])


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, Tensor))


def _as_views(features: Features) -> dict[str, np.ndarray]:
    """Precomputed features as {name: float32 array [N, D]}."""
    if _is_array(features):
        named = {"features": features}
    elif isinstance(features, Mapping):
        named = dict(features)
    elif isinstance(features, (tuple, list)) and len(features) == 2 and all(map(_is_array, features)):
        named = {"raw": features[0], "debiased": features[1]}
    else:
        raise TypeError(
            "Precomputed features must be an array [N, D], a pair (Z, Z~) of arrays, or {name: array}; got "
            f"{type(features).__name__}. Pass a DebiasedEncoder or a callable to compute them from a loader instead."
        )
    views = {}
    for name, z in named.items():
        if not _is_array(z):
            raise TypeError(f"Features {name!r} must be a numpy array or a tensor, got {type(z).__name__}.")
        z = z.detach().cpu().numpy() if isinstance(z, Tensor) else np.asarray(z)
        if z.ndim != 2:
            raise ValueError(f"Features {name!r} must have shape [N, D], got {z.shape}.")
        if not np.isfinite(z).all():
            raise ValueError(f"Features {name!r} contain NaN or infinite values.")
        views[str(name)] = z.astype(np.float32)
    if len({len(z) for z in views.values()}) != 1:
        raise ValueError(f"Feature sets have different numbers of rows: { {k: len(z) for k, z in views.items()} }.")
    return views


def _attrs_of(data: Any, attributes: tuple[Attribute, ...], n: int, cap: int | None) -> np.ndarray:
    """The attributes [n, A] of precomputed features: an array, {name: values}, or batches (inputs, attrs, ...)."""
    if _is_array(data) or isinstance(data, Mapping):
        rows = len(next(iter(data.values()))) if isinstance(data, Mapping) and data else len(data)
        attrs = attrs_tensor(data, attributes, rows, 0).numpy()
    elif isinstance(data, Iterable):
        attrs = collect_batches(data, attributes, None, max_samples=cap).attrs
    else:
        raise TypeError(f"The attributes of precomputed features must be an array [N, A], {{name: values}} or "
                        f"batches (inputs, attrs); got {type(data).__name__}.")
    attrs = attrs[:cap] if cap is not None else attrs
    if len(attrs) != n:
        raise ValueError(f"The features have {n} rows but their attributes {len(attrs)}; they must match row by row.")
    return attrs


def _module_device(fn: Any) -> torch.device:
    if isinstance(fn, nn.Module):
        for tensor in (*fn.parameters(), *fn.buffers()):
            return tensor.device
    return torch.device("cpu")


def _is_precomputed(source: Any) -> bool:
    return _is_array(source) or isinstance(source, (Mapping, tuple, list))


PartReader = Callable[[Any, Any], _Part]
"""(loader, precomputed features or None) -> the features and attributes of that part of the data."""


def _reader(source: Any, attributes: Sequence[Attribute] | None, cap: int | None) -> tuple[tuple[Attribute, ...],
                                                                                           PartReader]:
    """The audited attributes, and how to read one part of the data for `source` (an encoder, a callable or
    precomputed features)."""
    if isinstance(source, DebiasedEncoder):
        model = source
        if attributes is not None and [a.name for a in attributes] != [a.name for a in model.attributes]:
            raise ValueError(f"attributes {[a.name for a in attributes]} differ from the encoder's "
                             f"{[a.name for a in model.attributes]}; leave attributes=None for an encoder.")

        def read_encoded(data: Any, _: Any) -> _Part:
            got = extract_features(model, data, cap)
            return _Part({"raw": got.raw, "debiased": got.debiased}, got.attrs)

        return tuple(model.attributes), read_encoded
    if attributes is None:
        raise ValueError("Pass attributes=[Attribute(name, kind, num_classes), ...] to audit features other than a "
                         "DebiasedEncoder's: they say what each column of the attrs is.")
    attrs = tuple(attributes)
    if _is_precomputed(source):

        def read_precomputed(data: Any, features: Any) -> _Part:
            views = _as_views(features)
            views = {k: z[:cap] for k, z in views.items()} if cap is not None else views
            return _Part(views, _attrs_of(data, attrs, len(next(iter(views.values()))), cap))

        return attrs, read_precomputed
    if callable(source):
        return attrs, lambda data, _: _computed_by(source, data, attrs, cap)
    raise TypeError(f"Cannot audit a {type(source).__name__}: pass a DebiasedEncoder, a callable inputs -> features, "
                    "or precomputed features (an array [N, D], a pair (Z, Z~), or {name: array}).")


def _computed_by(fn: Callable[[Tensor], Tensor], loader: Iterable, attributes: tuple[Attribute, ...],
                 cap: int | None) -> _Part:
    """The features `fn` computes from `loader`'s inputs, on the device of its weights (an nn.Module is put in eval
    mode meanwhile)."""
    module = fn if isinstance(fn, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        got = collect_batches(loader, attributes, lambda x: {"features": fn(x)}, _module_device(fn), cap)
    finally:
        if module is not None:
            module.train(was_training)
    return _Part(got.views, got.attrs)


def _split(part: _Part, cfg: AuditConfig) -> tuple[_Part, _Part]:
    n = len(part)
    n_test = int(round(n * cfg.test_fraction))
    if n < 10 or n_test < 2 or n - n_test < 2:
        raise ValueError(f"Splitting {n} samples with test_fraction {cfg.test_fraction} leaves too few on a side; "
                         "give at least 10 samples, or a separate test_loader.")
    order = np.random.default_rng(cfg.seed).permutation(n)
    return part.take(np.sort(order[n_test:])), part.take(np.sort(order[:n_test]))


# --------------------------------------------------------------------------- the audit
def audit(encoder_or_features: DebiasedEncoder | Callable[[Tensor], Tensor] | Features, loader: Any, *,
          test_loader: Any = None, test_features: Features | None = None,
          attributes: Sequence[Attribute] | None = None, config: AuditConfig | None = None,
          probes: EvalConfig | None = None, output_dir: str | os.PathLike | None = None) -> AuditReport:
    """Measure how well each attribute can still be decoded from features, on held-out data, and give a verdict.

    Args:
        encoder_or_features: what to audit.
            - a `DebiasedEncoder`: its raw features Z and debiased features Z~, computed from `loader`'s inputs;
            - any callable (an nn.Module, a function) mapping a batch of inputs to features [N, D]: its output;
            - precomputed features: an array or tensor [N, D], a pair (Z, Z~), or {name: array [N, D]}.
        loader: for an encoder or callable, batches (inputs, attrs) or (inputs, attrs, labels) as `fit` takes.
            For precomputed features, their attributes row by row: an array [N, A], {name: values [N]}, or such
            batches (only the attrs are read).
        test_loader: held-out data of the same kind as `loader`, to score the probes on. None holds out a random
            `config.test_fraction` of `loader`'s samples instead (seeded by `config.seed`).
        test_features: with precomputed features and a `test_loader`, the held-out features (same form).
        attributes: the attributes' declarations (name, kind, classes); an encoder's own are used when None.
        config: verdict criteria (margin over chance, max R^2) and the split.
        probes: probe settings (`EvalConfig`: MLP sizes, iterations, seed, `max_samples` per loader).
        output_dir: when given, audit.json and audit.md are written there (see `AuditReport.write`).

    Returns:
        An AuditReport; `print(report)` shows the table, `report.verdicts()` the verdict of each attribute.

    Example:
        >>> report = audit(encoder, val_loader)
        >>> report.verdicts()
        {'site': 'removed', 'rotation': 'leaks'}
        >>> audit(np.load("z.npy"), np.load("b.npy"), attributes=[Attribute("site", "categorical", 3)])
    """
    start = time.perf_counter()
    cfg = config or AuditConfig()
    probes = probes or EvalConfig(leace=False, tsne_samples=0)
    attrs, read = _reader(encoder_or_features, attributes, probes.max_samples)
    precomputed = _is_precomputed(encoder_or_features)
    if loader is None:
        raise ValueError("loader is required: the batches (or, for precomputed features, the attributes) to audit.")
    if precomputed and (test_loader is None) != (test_features is None):
        raise ValueError("With precomputed features, give test_features and test_loader together (the held-out "
                         "features and their attributes), or neither to split the samples.")
    if not precomputed and test_features is not None:
        raise ValueError("test_features is for precomputed features; an encoder or a callable computes them from "
                         "test_loader.")
    if test_loader is None:
        train, test = _split(read(loader, encoder_or_features), cfg)
        split = f"a random {cfg.test_fraction:g} of the samples held out, seed {cfg.seed}"
    else:
        train, test = read(loader, encoder_or_features), read(test_loader, test_features)
        split = "a separate test set"
    if train.views.keys() != test.views.keys():
        raise ValueError(f"The train and test features name different sets: {sorted(train.views)} vs "
                         f"{sorted(test.views)}.")
    results = {}
    for view in train.views:
        leakage = probe_leakage(train.views[view], train.attrs, test.views[view], test.attrs, attrs, probes)
        results[view] = {name: AttributeAudit(lk, lk.threshold(cfg.margin, cfg.max_r2),
                                              "removed" if lk.removed(cfg.margin, cfg.max_r2) else "leaks")
                         for name, lk in leakage.items()}
    report = AuditReport(results, attrs, len(train), len(test), split, dataclasses.replace(cfg),
                         wall_seconds=time.perf_counter() - start)
    if output_dir is not None:
        report.write(output_dir)
    return report


__all__ = ["audit", "AuditConfig", "AuditReport", "AttributeAudit", "Verdict", "AUDIT_MD", "VIEW_TITLES"]
