"""A sweep over the values of one config key: what `dmm-wrap sweep` runs, records and draws.

Each value is one complete `dmm-wrap fit` run (training, evaluation, report) in its own folder; the sweep writes
sweep.json (every run's metrics) and sweep.png (task accuracy against the MLP-probe leakage of each attribute, with
raw Z and LEACE as reference points) beside them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from ..config import ConfigError
from ..io.serialization import write_atomically
from .evaluate import Metrics
from .report import METHOD_TITLES, markdown_table, plot_tradeoff

SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
FORBIDDEN_KEYS = ("output_dir",)
"""Keys a sweep cannot vary: each run's output_dir is a folder of the sweep's."""


class SweepSpec(NamedTuple):
    """One config key and the values it takes, in order."""

    key: str
    """A dotted config key, e.g. "fit.lam"."""
    values: tuple[Any, ...]
    """Its values, each as YAML reads it (numbers, booleans, strings, lists)."""


def parse_sweep(text: str) -> SweepSpec:
    """Read "fit.lam=0.2,0.5,0.8" (or "fit.lam=[0.2, 0.5, 0.8]") into a SweepSpec.

    Values are separated by commas and each is read as YAML; a value that itself holds commas (a list, such as
    eval.mlp_hidden) is written as a YAML list of values: "eval.mlp_hidden=[[64], [128, 128]]". A sweep needs at
    least two distinct values: one value is a plain run (`dmm-wrap fit --set KEY=VALUE`).

    Example:
        >>> parse_sweep("fit.lam=0.2,0.5,0.8")
        SweepSpec(key='fit.lam', values=(0.2, 0.5, 0.8))
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"A sweep is KEY=VALUE1,VALUE2,... (e.g. fit.lam=0.2,0.5,0.8), got {text!r}.")
    if key in FORBIDDEN_KEYS:
        raise ConfigError(f"{key}: cannot be swept; each run writes into OUTPUT_DIR/KEY=VALUE. Set the sweep's "
                          "folder with --output-dir.")
    items = None if raw.strip().startswith("[") else raw.split(",")
    if items is not None and any(not item.strip() for item in items):
        raise ConfigError(f"{key}: empty value in the sweep {raw!r}; separate the values with single commas.")
    try:
        values = yaml.safe_load(raw) if items is None else [yaml.safe_load(item) for item in items]
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot read the sweep values {raw!r} as YAML.") from err
    if not isinstance(values, list):
        raise ConfigError(f"{key}: expected a list of sweep values, got {raw!r}.")
    if len(values) < 2:
        raise ConfigError(f"{key}: a sweep needs at least 2 values, got {values!r}. For one value run "
                          f"`dmm-wrap fit CONFIG --set {key}={raw.strip()}`.")
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise ConfigError(f"{key}: the sweep values {values!r} repeat a value.")
    return SweepSpec(key, tuple(values))


def value_text(value: Any) -> str:
    """A value as it is written on the command line (0.2, true, [64, 64], timm:resnet18)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def run_label(key: str, value: Any) -> str:
    """The label of a run in tables and in the figure: the last part of the key and the value, e.g. "lam=0.2"."""
    return f"{key.split('.')[-1]}={value_text(value)}"


def run_folders(spec: SweepSpec) -> list[str]:
    """The folder name of each run, e.g. "fit.lam=0.2" (characters other than letters, digits, '.=+-' become '_')."""
    names = [re.sub(r"[^A-Za-z0-9.=+\-]", "_", f"{spec.key}={value_text(v)}") for v in spec.values]
    if len(set(names)) != len(names):  # values that differ only in characters replaced above
        names = [f"{i}_{name}" for i, name in enumerate(names)]
    return names


@dataclass(frozen=True)
class SweepRun:
    """One finished run of the sweep."""

    value: Any
    """The swept key's value."""
    output_dir: str
    """The run's folder (its metrics.json, report.md, model/, ...)."""
    metrics: Metrics
    """Its evaluation."""


@dataclass
class Sweep:
    """The runs of a sweep so far."""

    key: str
    """The swept config key."""
    values: tuple[Any, ...]
    """Every value the sweep was asked for (runs may be fewer while it runs)."""
    runs: list[SweepRun] = field(default_factory=list)
    """The finished runs, in order."""
    wall_seconds: float = 0.0
    """Wall time of the sweep so far."""

    def points(self) -> list[tuple[str, Metrics]]:
        """(label, metrics) of each run, as `plot_tradeoff` draws them."""
        return [(run_label(self.key, r.value), r.metrics) for r in self.runs]

    def to_dict(self) -> dict[str, Any]:
        """What sweep.json holds (strict JSON)."""
        return {
            "key": self.key,
            "values": list(self.values),
            "runs": [{"value": r.value, "label": run_label(self.key, r.value), "output_dir": r.output_dir,
                      **r.metrics.to_dict()} for r in self.runs],
            "complete": len(self.runs) == len(self.values),
            "wall_seconds": self.wall_seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sweep:
        """Read back `to_dict()` (e.g. `json.load` of a sweep.json)."""
        runs = [SweepRun(r["value"], r["output_dir"], Metrics.from_dict(r)) for r in d["runs"]]
        return cls(d["key"], tuple(d["values"]), runs, float(d["wall_seconds"]))

    def format_table(self) -> str:
        """A Markdown table: one row per run (then raw Z and LEACE of the first run), task accuracy and the
        MLP-probe leakage of each attribute."""
        if not self.runs:
            return "(no finished run)"
        attrs = list(self.runs[0].metrics.methods["dmm"].leakage)
        header = ["run", "task acc", *(f"{a} MLP" for a in attrs)]
        rows = []

        def row(name: str, method: Any) -> list[str]:
            acc = "—" if method.task_accuracy is None else f"{method.task_accuracy:.3f}"
            return [name, acc, *(f"{method.leakage[a].mlp:.3f}" for a in attrs)]

        for label, metrics in self.points():
            rows.append(row(label, metrics.methods["dmm"]))
        for method in ("raw", "leace"):
            if method in self.runs[0].metrics.methods:
                rows.append(row(METHOD_TITLES[method], self.runs[0].metrics.methods[method]))
        return markdown_table(header, rows)

    def write(self, directory: str | os.PathLike) -> Path:
        """Write sweep.json and sweep.png (the runs so far) into `directory`, atomically file by file."""
        data = self.to_dict()

        def writer(tmp: Path) -> None:
            (tmp / SWEEP_JSON).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
            plot_tradeoff(self.points(), tmp / SWEEP_PNG, title=f"Sweep of {self.key}")

        return write_atomically(directory, writer)


__all__ = ["SweepSpec", "SweepRun", "Sweep", "parse_sweep", "run_label", "run_folders", "value_text", "SWEEP_JSON",
           "SWEEP_PNG"]
