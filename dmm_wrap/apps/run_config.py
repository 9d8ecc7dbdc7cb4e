"""The YAML run configuration of the CLI: typed sections, strict validation, and `--set KEY=VALUE` overrides.

A run file has the sections `data`, `model`, `fit`, `alignment_head`, `eval`, `audit` and the keys `method` and
`output_dir`. Every value is checked
against the annotation of its dataclass field, and every error names the full key path, e.g.
"fit.lrr: unknown key; did you mean 'lr'?" or "fit.epochs: expected int, got str 'ten'".

Example:
    >>> cfg = load_run_config("configs/synthetic_digits.yaml", [("fit.max_steps", 5)])
    >>> cfg.fit.max_steps
    5
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import (AlignMaps, AlignShrinkage, Attribute, ConfigError, EvalConfig, FitConfig, HeadConfig,
                      MissingFileError, Pooling, check_fields, check_shrinkage, got, validate)
from ..core.gaussian import TargetCovariance
from ..inference import IMAGENET_MEAN, IMAGENET_STD
from ..io.serialization import write_text_atomically
from .leakage import AuditConfig
from .pretrained import DIGITS_ENCODERS

DataKind = Literal["synthetic_digits", "image_csv", "camelyon17", "hf_dataset"]
Method = Literal["deepminmax", "alignment_head"]

OPTION_KEYS: dict[str, str] = {"output_dir": "output_dir", "max_steps": "fit.max_steps", "device": "fit.device",
                               "resume": "fit.resume", "overwrite": "fit.overwrite_checkpoints"}
"""The config key each dedicated CLI option sets (`--output-dir DIR` is `--set output_dir=DIR`)."""


@dataclass
class DataConfig:
    """Where the images and attributes come from, and how they are batched."""

    kind: DataKind = "synthetic_digits"
    """"synthetic_digits" (generated, nothing to download), "image_csv" (your images + a CSV of attributes),
    "camelyon17" (the WILDS layout; attribute: center) or "hf_dataset" (a Hugging Face `datasets` DatasetDict with
    an image column and attribute columns)."""

    num_train: int = 8192
    """synthetic_digits: training images generated."""

    num_test: int = 2048
    """synthetic_digits: test images generated (with a different seed stream)."""

    num_val: int = 0
    """synthetic_digits: validation images generated (the training writers, other draws) for model selection: the
    run keeps the h_theta a fresh probe reads the attributes from least on them (`fit(..., val_loader=)`, checked
    every fit.select_every steps); 0 = no selection, the last step is kept. A smoke run (fit.max_steps below 100)
    generates at most eval.smoke_samples."""

    num_probe: int = 0
    """synthetic_digits: images generated (the training writers, draws of their own) that the evaluation's leakage
    probes are trained on; no part of the run ever fits on them, so a probe cannot be helped by what h_theta learnt
    of its own training samples. 0 = the probes train on the training images (in-sample; report.md says so).
    A smoke run generates at most eval.smoke_samples."""

    train_sites: list[int] | None = None
    """synthetic_digits: the site ids the training and validation images come from, e.g. [0, 1, 2] with num_sites 4;
    the test images come from every site, so the evaluation also scores the task on a site that neither fit nor the
    task classifier ever saw (transfer: seen and unseen sites in report.md and metrics.json). None = every site."""

    image_size: int | None = None
    """Side of the square input images; None = the digits encoder's size for backbone "digits" and for
    synthetic_digits, 224 otherwise."""

    num_sites: int = 3
    """synthetic_digits: number of acquisition sites (the categorical attribute)."""

    seed: int = 0
    """synthetic_digits: generation seed; also seeds the shuffling of map-style training loaders."""

    root: str | None = None
    """image_csv: folder the CSV paths are relative to; camelyon17: the WILDS root. Relative to the working dir."""

    csv: str | None = None
    """image_csv: CSV of the training images (one row per image)."""

    test_csv: str | None = None
    """image_csv: CSV of the held-out images the evaluation scores on."""

    val_csv: str | None = None
    """image_csv: optional CSV of held-out images of the training sites, for model selection (as num_val)."""

    probe_csv: str | None = None
    """image_csv: optional CSV of held-out images the leakage probes are trained on (as num_probe)."""

    dataset: str | None = None
    """hf_dataset: a folder written by `DatasetDict.save_to_disk` (relative to the working dir), or a dataset name
    on the Hub (`datasets.load_dataset`, which needs the network or its cache)."""

    image_column: str = "image"
    """hf_dataset: column of the images (an `Image` feature)."""

    path_column: str = "path"
    """image_csv: column holding each image's path."""

    label_column: str | None = None
    """image_csv / hf_dataset: column of the task label (class ids, string labels or a ClassLabel); None = no task
    accuracy is measured."""

    attributes: list[Attribute] = field(default_factory=list)
    """image_csv / hf_dataset: the attributes to remove, each {name, kind, num_classes}; the name is the column."""

    train_split: str = "train"
    """camelyon17: WILDS split used for training; hf_dataset: the DatasetDict's split. Several splits are joined
    with '+' (their rows together), here and in test_split and val_split."""

    test_split: str | None = None
    """camelyon17: WILDS split(s) used for evaluation (None = "id_val", which shares the training centers, so center
    leakage can be measured; "id_val+test" adds the unseen center 2, which the report scores apart as transfer to
    an unseen site); hf_dataset: the DatasetDict's split(s) (None = "test")."""

    val_split: str | None = None
    """camelyon17 / hf_dataset: optional split(s) for model selection (as num_val), e.g. "id_val" when test_split is
    "test"."""

    probe_split: str | None = None
    """camelyon17 / hf_dataset: optional split(s) the leakage probes are trained on (as num_probe); it must share
    no rows with the training, validation or test splits."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    """image_csv / camelyon17: per-channel mean subtracted after scaling pixels to [0, 1]."""

    std: tuple[float, ...] = IMAGENET_STD
    """image_csv / camelyon17: per-channel standard deviation divided by."""

    batch_size: int = 128
    """Batch size of training and of feature extraction."""

    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        check_fields(self)
        for key in ("num_train", "num_test", "num_sites", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"DataConfig.{key}: must be >= 1, got {getattr(self, key)!r}.")
        if self.train_sites is not None:
            if self.kind != "synthetic_digits":
                raise ConfigError("DataConfig.train_sites: only for DataConfig.kind 'synthetic_digits'; for your own "
                                  "data, leave the held-out sites out of the training CSV / split instead.")
            bad = [s for s in self.train_sites if not 0 <= s < self.num_sites]
            if not self.train_sites or bad or len(set(self.train_sites)) != len(self.train_sites):
                raise ConfigError(f"DataConfig.train_sites: must be distinct site ids in 0..{self.num_sites - 1} "
                                  f"(num_sites {self.num_sites}), got {self.train_sites!r}.")
        if self.num_val < 0:
            raise ConfigError(f"DataConfig.num_val: must be >= 0 (0 = no model selection), got {self.num_val!r}.")
        if self.num_probe < 0:
            raise ConfigError(f"DataConfig.num_probe: must be >= 0 (0 = the probes train on the training images), "
                              f"got {self.num_probe!r}.")
        if self.num_workers < 0:
            raise ConfigError(f"DataConfig.num_workers: must be >= 0, got {self.num_workers!r}.")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"DataConfig.image_size: must be None or >= 8, got {self.image_size!r}.")
        if self.kind == "image_csv":
            for key in ("root", "csv", "test_csv"):
                if getattr(self, key) is None:
                    raise ConfigError(f"DataConfig.{key}: required when DataConfig.kind is 'image_csv'.")
        if self.kind == "hf_dataset" and self.dataset is None:
            raise ConfigError("DataConfig.dataset: required when DataConfig.kind is 'hf_dataset' (a save_to_disk "
                              "folder or a Hub dataset name).")
        if self.kind in ("image_csv", "hf_dataset"):
            if not self.attributes:
                raise ConfigError(f"DataConfig.attributes: required when DataConfig.kind is {self.kind!r}, e.g. "
                                  "[{name: site, kind: categorical, num_classes: 3}].")
        elif self.attributes:
            raise ConfigError(f"DataConfig.attributes: only for DataConfig.kind 'image_csv' or 'hf_dataset'; "
                              f"{self.kind!r} defines its own.")
        if self.kind == "camelyon17" and self.root is None:
            raise ConfigError("DataConfig.root: required when DataConfig.kind is 'camelyon17' (the WILDS data "
                              "folder).")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"DataConfig.std: needs one value per channel of DataConfig.mean ({len(self.mean)}).")


@dataclass
class ModelConfig:
    """The frozen backbone, the hooked layer, and the architecture of the heads (HeadConfig keys sit here too)."""

    backbone: str = "digits"
    """A shipped encoder trained on synthetic digits ("digits", trained with the digit labels, or
    "digits_label_free", an autoencoder that never saw them; `dmm_wrap.apps.pretrained.DIGITS_ENCODERS`),
    "timm:NAME" or "torchvision:NAME"."""

    pretrained: bool | str = False
    """timm / torchvision: start from pretrained weights (true, or a weights tag); needs the network or a cache."""

    weights: str | None = None
    """A digits backbone: path of the encoder weights; None = the file shipped with dmm_wrap."""

    layer: str | None = None
    """Module whose output is debiased; None = the digits encoder's layer, or the backbone's output."""

    pool: Pooling = "avg"
    """How a hooked map or token sequence becomes [N, D]: "avg", "max", "cls" or "flatten"."""

    head: HeadConfig = field(default_factory=HeadConfig)
    """Architecture of the heads; its keys (h_layers, out_dim, standardize, ...) are written directly under model."""

    _flatten = ("head",)

    def __post_init__(self) -> None:
        check_fields(self)
        source = self.backbone.partition(":")[0]
        if not self.digits_encoder and (":" not in self.backbone or source not in ("timm", "torchvision")):
            raise ConfigError(f"ModelConfig.backbone: expected {' or '.join(map(repr, DIGITS_ENCODERS))}, "
                              f"'timm:NAME' or 'torchvision:NAME', got {self.backbone!r}.")
        if self.weights is not None and not self.digits_encoder:
            raise ConfigError(f"ModelConfig.weights: only for the digits backbones {list(DIGITS_ENCODERS)}; use "
                              "ModelConfig.pretrained for timm/torchvision.")

    @property
    def digits_encoder(self) -> bool:
        """Whether the backbone is one of the shipped digits encoders."""
        return self.backbone in DIGITS_ENCODERS


@dataclass
class AlignHeadConfig:
    """With `method: alignment_head`, `dmm-wrap fit` fits the alignment head (`DebiasedEncoder.fit_alignment_head`,
    one pass, no training loop) on the training loader instead of training DeepMinMax; these are its options."""

    samples: int = 8192
    """Rows the pieces, their matching and the group predictor are fitted on (held in memory: samples x feature
    width floats); with `stream`, the maps are then re-estimated from every training row."""

    clusters: int | None = None
    """Pieces per group; None: the silhouette score's most common count over up to 5 groups."""

    bins: int = 4
    """Quantile bins of each continuous attribute in the joint groups."""

    joint: bool | None = None
    """Align every combination of the attributes' classes and bins as one group; None: when one is continuous."""

    maps: AlignMaps | None = None
    """Per-piece maps, "full", "diagonal" or "shift"; None: full up to 256 features."""

    shrinkage: AlignShrinkage = "oas"
    """Covariance shrinkage of each piece: "oas" or a fraction in [0, 1]."""

    stream: bool = True
    """Re-estimate the maps from every training row (one pass) after fitting the pieces on `samples`."""

    outliers: float | None = None
    """A row farther from its piece's centroid than this quantile of the sample's distances keeps its features
    (a site never seen in training is not moved by a seen one's maps); None: every row is mapped."""

    target: TargetCovariance = "geometric"
    """The covariance each group's piece is mapped onto: "geometric" or "harmonic" (that mean of the groups'
    covariances plus the spread of their means) or "pooled" (the pooled piece's)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.samples < 2 or (self.clusters is not None and self.clusters < 1) or self.bins < 2:
            raise ConfigError(f"samples must be >= 2, clusters None or >= 1 and bins >= 2, got "
                              f"samples={self.samples!r}, clusters={self.clusters!r}, bins={self.bins!r}.")
        check_shrinkage(self.shrinkage, "shrinkage")
        if self.outliers is not None and not 0 < self.outliers <= 1:
            raise ConfigError(f"outliers must be None or a quantile in (0, 1] such as 0.99, got {self.outliers!r}.")


@dataclass
class RunConfig:
    """One CLI run: data, model, training, evaluation, and where the outputs go."""

    data: DataConfig = field(default_factory=DataConfig)
    """Images, attributes and loaders."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone, layer, pooling and heads."""

    method: Method = "deepminmax"
    """What `dmm-wrap fit` fits: "deepminmax" (`DebiasedEncoder.fit`, the `fit` section) or "alignment_head"
    (`DebiasedEncoder.fit_alignment_head`, the `alignment_head` section; `fit.device` still applies)."""

    fit: FitConfig = field(default_factory=FitConfig)
    """Options of `DebiasedEncoder.fit` (epochs, max_steps, lr, lam, device, ...)."""

    alignment_head: AlignHeadConfig = field(default_factory=AlignHeadConfig)
    """Options of the alignment head, read with `method: alignment_head`."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Probe settings of the evaluation (and of `dmm-wrap audit`)."""

    audit: AuditConfig = field(default_factory=AuditConfig)
    """Verdict criteria of `dmm-wrap audit` (margin over chance, max R^2)."""

    output_dir: str = "runs/dmm_wrap"
    """Folder of metrics.json, report.md, the figures, history.json, config.yaml and model/."""

    seed: int | None = 0
    """torch.manual_seed before the model is built, so the heads' initialisation (and so the run) is reproducible;
    None leaves torch's global RNG alone."""

    num_threads: int | None = None
    """CPU threads of torch and of the OpenMP / BLAS pools (scikit-learn probes, t-SNE) during the run; None keeps the
    libraries' defaults. On a shared, oversubscribed CPU, 1 thread is many times faster: the spinning barriers of
    threads that the scheduler has descheduled dominate small workloads."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"RunConfig.num_threads: must be None or >= 1, got {self.num_threads!r}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build and validate a run config from a plain mapping (as read from YAML)."""
        return validate(cls, values, "", coerce=True)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-friendly data (head keys flattened into model)."""
        return to_plain(self)

    def input_size(self) -> int:
        """The image side the loaders produce (see DataConfig.image_size)."""
        if self.data.image_size is not None:
            return self.data.image_size
        if self.model.digits_encoder or self.data.kind == "synthetic_digits":
            from .pretrained import DIGITS_IMAGE_SIZE

            return DIGITS_IMAGE_SIZE
        return 224


def to_plain(obj: Any) -> Any:
    """Dataclasses as dicts (flattened fields merged into their parent), tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        flat = getattr(type(obj), "_flatten", ())
        for f in dataclasses.fields(obj):
            value = to_plain(getattr(obj, f.name))
            if f.name in flat:
                out.update(value)
            else:
                out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """Split "fit.lr=0.001" into ("fit.lr", 0.001); the value is read as YAML (null, true, [64, 64], ...)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. fit.lr=0.001), got {text!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot read the value {raw!r} as YAML.") from err
    return key, value


def apply_overrides(values: Mapping[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of `values` with each dotted key set ("fit.lr" sets values["fit"]["lr"])."""
    out = copy.deepcopy(dict(values))
    for key, value in overrides:
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: expected a mapping to set {key!r}, got {got(child)}.")
            node = child
        node[parts[-1]] = value
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run file as a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Config file {str(path)!r} not found.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]}).") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, fit, eval, audit), "
                          f"got {got(values)}.")
    return values


def load_run_config(path: str | os.PathLike, overrides: Iterable[tuple[str, Any]] = ()) -> RunConfig:
    """Read a YAML run file, apply dotted-key overrides, and validate the result.

    Example:
        >>> load_run_config("configs/synthetic_digits.yaml", [parse_override("fit.lr=0.001")])
    """
    return RunConfig.from_dict(apply_overrides(read_yaml(path), overrides))


def write_run_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically; loading it back gives the same RunConfig."""
    return write_text_atomically(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = ["RunConfig", "DataConfig", "ModelConfig", "AlignHeadConfig", "ConfigError", "OPTION_KEYS", "load_run_config",
           "parse_override", "apply_overrides", "read_yaml", "write_run_config", "to_plain"]
