"""`DebiasedEncoder`: a frozen backbone, a hooked layer, and the DeepMinMax heads, as one nn.Module."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .version import __version__
from .backbones import (BackboneSpec, build_backbone, check_pinned, check_rebuild_spec, create_backbone,
                        describe_backbone, freeze, pretrained_backbone)
from .config import Attribute, FitConfig, HeadConfig, Pooling, known_keys, validate
from .core.hooks import FeatureExtractor
from .core.objective import DeepMinMax
from .inference import InferenceMixin, Preprocessing, compiling, default_preprocessing
from .io.hub_mixin import HubMixin
from .io.serialization import CONFIG_NAME, FORMAT_VERSION, MODEL_TYPE, require_keys
from .train.alignment_head import AlignmentHeadMixin
from .train.loop import FitHistory, PrePass, TrainingInterrupted, train

_CONFIG_KEYS = ("model_type", "format_version", "dmm_wrap_version", "weights_sha256", "backbone", "layer", "pool", "input_size",
                "feature_dim", "out_dim", "attributes", "head", "weights", "preprocessing", "vocabulary",
                "channels_last")
_REQUIRED_KEYS = ("backbone", "layer", "feature_dim", "attributes")


def _as_attributes(attributes: Sequence[Attribute | dict[str, Any]]) -> tuple[Attribute, ...]:
    if isinstance(attributes, (Attribute, dict, str)) or not isinstance(attributes, Sequence):
        raise TypeError("attributes must be a list of Attribute(name, kind, num_classes=None).")
    out = tuple(a if isinstance(a, Attribute) else Attribute(**a) for a in attributes)
    if not out:
        raise ValueError("Declare at least one attribute to remove, e.g. [Attribute('site', 'categorical', 3)].")
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValueError(f"Attribute names must be unique, got {names}.")
    return out


class DebiasedEncoder(HubMixin, InferenceMixin, AlignmentHeadMixin, nn.Module):
    """A frozen backbone whose features at `layer` are debiased by DeepMinMax.

    Args:
        backbone: any nn.Module, or a name "timm:ARCH" / "torchvision:ARCH" built with random weights.
        layer: a name from `backbone.named_modules()` whose output is hooked; None uses the backbone's output.
        attributes: the sensitive attributes B to remove, in the column order of the attribute tensors.
        pool: how a hooked 4-D map or 3-D token sequence becomes [N, D]: "avg" (default: mean over space or
            tokens), "max", "cls" (token 0) or "flatten".
        input_size: shape of one input without batch, e.g. (3, 224, 224). When given, one dummy forward infers the
            feature width now; otherwise the heads are built on the first batch `fit` sees.
        preprocessing: how PIL images become inputs (`Preprocessing` or a dict of its fields), saved in config.json
            and used by `preprocess` / `embed`. "auto" derives it from the backbone (timm data config, torchvision
            weights transforms, ImageNet defaults for an untagged torchvision model, None for a custom module).
        channels_last: whether the hooked layer gives channels-last maps [N, H, W, C] (timm's Swin stages), so that
            pooling averages over H and W rather than over W and C. None (default) detects it from the hooked module
            and the backbone (timm's `output_fmt` "NHWC"); saved in config.json.
        **head_options: fields of `HeadConfig` (h_layers, h_hidden, out_dim, m_layers, ...).

    Saving, loading and pushing come from `HubMixin`; preprocess, embed, inference_module and export_onnx from
    `InferenceMixin`. Under torch.compile and torch.export the forward runs a hook-free graph of the backbone truncated at `layer`
    (see `inference_module`), so `torch.export.export(enc, (x,))` and `torch.compile(enc, fullgraph=True)` work.

    Example:
        >>> enc = DebiasedEncoder("torchvision:resnet18", "avgpool", [Attribute("site", "categorical", 3)])
        >>> history = enc.fit(loader, epochs=5)
        >>> z_tilde = enc(images)
    """

    _trained_prefix = "heads."
    _dropped_prefixes = ("extractor._target.",)  # full saves of earlier versions held the hooked layer's tensors twice
    _defaulted_suffixes = (".radius",)  # alignment heads saved before pieces had a radius map every row (inf)

    def __init__(self, backbone: nn.Module | str, layer: str | None, attributes: Sequence[Attribute | dict[str, Any]],
                 *, pool: Pooling = "avg", input_size: Sequence[int] | None = None,
                 preprocessing: Preprocessing | dict[str, Any] | None | Literal["auto"] = "auto",
                 channels_last: bool | None = None, **head_options: Any) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = create_backbone(backbone)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module or a 'timm:ARCH' / 'torchvision:ARCH' name, got {type(backbone).__name__}.")
        if pool not in ("avg", "max", "cls", "flatten"):
            raise ValueError(f"pool must be one of ['avg', 'max', 'cls', 'flatten'], got {pool!r}.")
        feature_dim = head_options.pop("_feature_dim", None)
        self.backbone_spec: BackboneSpec = describe_backbone(backbone)
        self.attributes = _as_attributes(attributes)
        self.head_config = validate(HeadConfig, head_options, "head")
        self.extractor = FeatureExtractor(freeze(backbone), layer, pool, channels_last)
        self.input_size = tuple(input_size) if input_size is not None else None
        self.heads: DeepMinMax | None = None
        self.vocabulary: dict[str, list[str]] | None = None
        """String labels of the training data's text columns ({column: labels}, class id k = labels[k]; see
        `ImageCSVDataset.vocabulary`), saved in config.json so that held-out data is read with the same ids; None
        when unknown."""
        self.preprocessing = (default_preprocessing(backbone, self.backbone_spec, self.input_size)
                              if isinstance(preprocessing, str) and preprocessing == "auto" else preprocessing)
        if feature_dim is None and self.input_size is not None:
            feature_dim = self._infer_feature_dim(torch.zeros(2, *self.input_size))
        if feature_dim is not None:
            self._build_heads(feature_dim)

    # ----------------------------------------------------------------- structure
    @property
    def backbone(self) -> nn.Module:
        """The frozen backbone."""
        return self.extractor.backbone

    @property
    def layer(self) -> str | None:
        """Name of the hooked module in `backbone`; None hooks the backbone's output."""
        return self.extractor.layer

    @property
    def channels_last(self) -> bool:
        """Whether the hooked layer's maps are [N, H, W, C] (pooled over axes 1 and 2); saved in config.json."""
        return self.extractor.channels_last

    @property
    def feature_dim(self) -> int | None:
        """Width D of the hooked, pooled features (None until inferred)."""
        return self.heads.feature_dim if self.heads is not None else None

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter or buffer (CPU for a model that has none)."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _infer_feature_dim(self, example: Tensor) -> int:
        param = next(self.backbone.parameters(), None)
        if param is not None:
            example = example.to(param.device, param.dtype)
        with torch.no_grad():
            return int(self.extractor(example).shape[1])

    def _build_heads(self, feature_dim: int) -> None:
        device = self.device
        self.heads = DeepMinMax(feature_dim, self.attributes, self.head_config).to(device)
        self._prepare_graph()

    def train(self, mode: bool = True) -> DebiasedEncoder:
        """Set the heads' training mode; the backbone stays in eval mode."""
        super().train(mode)
        self.extractor.train(False)  # the backbone stays in eval mode
        return self

    # ----------------------------------------------------------------- inference
    def _require_heads(self) -> DeepMinMax:
        if self.heads is None:
            raise RuntimeError("The heads are not built yet: call fit(...) first, pass input_size=, or load with from_pretrained.")
        return self.heads

    def features(self, inputs: Tensor) -> Tensor:
        """Raw hooked, pooled features Z [N, D] (float32), computed without gradients.

        Under torch.compile / torch.export they come from the hook-free graph instead of the hook (same values).
        """
        if compiling():
            return self._graph_features(inputs)
        with torch.no_grad():
            return self.extractor(inputs).float()

    def debias(self, features: Tensor) -> Tensor:
        """Map raw features Z [N, D] (from `features`) to debiased features Z~."""
        return self._require_heads().debias(features.float())

    def forward(self, inputs: Tensor) -> Tensor:
        """Debiased features Z~ [N, out_dim] of a batch of inputs."""
        return self.debias(self.features(inputs))

    # ----------------------------------------------------------------- training
    def fit(self, loader: Iterable, epochs: int | None = None, *, config: FitConfig | None = None,
            val_loader: Iterable | None = None, **options: Any) -> FitHistory:
        """Train the heads on a stream of `(inputs, attrs)` batches; the backbone is never updated.

        Args:
            loader: an iterable of batches (inputs [N, ...], attrs [N, num_attributes] float with class ids in
                categorical columns) or (inputs, {name: tensor}). Re-iterated once per epoch; a one-pass
                iterator (a generator) trains one epoch, and is refused up front when fit would read it twice
                (epochs > 1, stats_batches=None, resume). Each batch goes through the backbone once: the first
                `stats_batches` give the standardisation statistics and are kept for training (see PrePass).
            epochs: passes over the loader; overrides `config.epochs`.
            val_loader: held-out `(inputs, attrs)` batches: its first `select_samples` are read once, and the run
                ends with the h_theta that a fresh probe, checked every `select_every` steps, read them least from.
            config: a FitConfig; **options override its fields (lr, lam, max_steps, device, amp_dtype,
                checkpoint_dir, checkpoint_every, resume, ...).

        Inside an initialised torch.distributed process group, call it on every rank with a loader of that rank's
        shard (e.g. a DistributedSampler): the heads train data-parallel (see `dmm_wrap.train.loop.train`).

        Returns:
            The FitHistory of the loss terms. If fit raises, the heads are restored to their state before the call,
            except on SIGINT / SIGTERM (Ctrl-C): training then stops at a step boundary and raises
            TrainingInterrupted, whose `.history` and `.step` describe the steps taken; the model keeps the heads
            of the last complete step (save them with save_pretrained), and with checkpoint_dir a checkpoint of
            that step is written, which `resume=True` continues from.
        """
        base = dataclasses.asdict(config) if config is not None else {}
        base.update(options)
        if epochs is not None:
            base["epochs"] = epochs
        cfg = validate(FitConfig, base, "fit")
        if self.head_config.align_head_pieces is not None:
            raise ValueError("This model's h_theta is a fitted alignment (fit_alignment_head); fit trains the MLP "
                             "h_theta. Build a new DebiasedEncoder to train one.")
        device = torch.device(cfg.device) if cfg.device is not None else self.device
        if cfg.align_weight > 0 and not self.head_config.residual:
            warnings.warn("align_weight > 0 with a non-residual h_theta: the alignment target starts from h_theta's "
                          "random initial output rather than from Z. Use HeadConfig(residual=True) (see "
                          "HeadConfig.aligned()).", stacklevel=2)
        prepass = PrePass(loader, self.attributes, self.extractor, cfg, device, self.head_config.standardize)
        if cfg.device is not None:
            self.to(cfg.device)
        if self.heads is not None:
            self.heads.to(device)
        snapshot = copy.deepcopy(self.heads.state_dict()) if self.heads is not None else None
        try:
            if self.heads is None:
                self._build_heads_from(prepass)
            assert self.heads is not None
            self.heads.train()
            return train(self.heads, loader, self.extractor, cfg, device, prepass, val_loader)
        except TrainingInterrupted:
            raise  # stopped between two steps: the heads of the steps taken are kept
        except BaseException:
            if snapshot is None:
                self.heads = None
            else:
                self.heads.load_state_dict(snapshot)
            raise
        finally:
            prepass.close()
            if self.heads is not None:
                self.heads.eval()

    def _build_heads_from(self, prepass: PrePass) -> None:
        width = prepass.feature_dim()  # epoch 0's first batch, kept: the statistics and training reuse its features
        with torch.random.fork_rng(devices=[]):  # initialising the heads must not shift the data's random draws,
            self._build_heads(width)  # which a run resumed in epoch 0 replays without it

    # ----------------------------------------------------------------- saving
    def config_dict(self, *, heads_only: bool = False) -> dict[str, Any]:
        """Everything needed to rebuild this model, as saved in config.json.

        "weights" says what model.safetensors holds: "full" (backbone and heads) or "heads_only" (the backbone is
        rebuilt from "backbone", whose pretrained_tag pins its weights). "preprocessing" is null when unknown.
        """
        heads = self._require_heads()
        return {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "dmm_wrap_version": __version__,
            "backbone": self.backbone_spec.to_dict(),
            "layer": self.layer,
            "pool": self.extractor.pool,
            "channels_last": self.channels_last,
            "input_size": list(self.input_size) if self.input_size is not None else None,
            "feature_dim": heads.feature_dim,
            "out_dim": heads.out_dim,
            "attributes": [a.to_dict() for a in self.attributes],
            "head": dataclasses.asdict(self.head_config),
            "weights": "heads_only" if heads_only else "full",
            "preprocessing": self.preprocessing.to_dict() if self.preprocessing is not None else None,
            "vocabulary": self.vocabulary,
        }

    def _check_heads_only(self) -> None:
        check_pinned(self.backbone_spec)

    @classmethod
    def _from_config(cls, config: dict[str, Any], backbone: nn.Module | None,
                     path: Path = Path(CONFIG_NAME)) -> DebiasedEncoder:
        """The model `config` (a config.json at `path`) describes, untrained; `backbone` None rebuilds it."""
        spec, weights = _check_config(config, path)
        if backbone is None:
            check_rebuild_spec(spec, str(path))  # before anything reaches timm / torchvision
            backbone = build_backbone(spec) if weights == "full" else pretrained_backbone(spec)
        elif weights == "heads_only":
            _warn_if_other_backbone(backbone, spec)
        head = known_keys(HeadConfig, config.get("head", {}), "head config")
        model = cls(backbone, config["layer"], [Attribute.from_dict(a) for a in config["attributes"]],
                    pool=config.get("pool", "avg"), input_size=None, preprocessing=config.get("preprocessing", "auto"),
                    channels_last=config.get("channels_last"),
                    _feature_dim=int(config["feature_dim"]), **head)
        model.input_size = tuple(config["input_size"]) if config.get("input_size") else None
        model.vocabulary = _vocabulary(config.get("vocabulary"), path)
        if spec.source != "custom":
            model.backbone_spec = spec
        return model


def _check_config(config: dict[str, Any], path: Path) -> tuple[BackboneSpec, str]:
    """The backbone spec and the "weights" ("full" or "heads_only") of a config.json; warn about unknown keys."""
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        warnings.warn(f"Ignoring unknown config keys {unknown} (written by a newer dmm_wrap?).", stacklevel=4)
    require_keys(config, _REQUIRED_KEYS, path)
    weights = config.get("weights", "full")
    if weights not in ("full", "heads_only"):
        raise ValueError(f"{path}: 'weights' must be 'full' or 'heads_only', got {weights!r}.")
    try:
        spec = BackboneSpec.from_dict(config["backbone"])
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: 'backbone' must be a mapping with 'source' and 'name', got "
                         f"{config['backbone']!r}.") from err
    return spec, weights


def _vocabulary(value: Any, path: Path) -> dict[str, list[str]] | None:
    """The "vocabulary" of a config.json: None, or {column: [label, ...]}."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, list)
                                              and all(isinstance(x, str) for x in v) for k, v in value.items()):
        raise ValueError(f"{path}: 'vocabulary' must be null or a mapping of column names to lists of labels, got "
                         f"{value!r}.")
    return {k: list(v) for k, v in value.items()}


def _warn_if_other_backbone(backbone: nn.Module, spec: BackboneSpec) -> None:
    found = describe_backbone(backbone)
    if spec.source != "custom" and found.source != "custom" and (found.source, found.name) != (spec.source, spec.name):
        warnings.warn(
            f"The heads were trained on {spec.source}:{spec.name} ({spec.pretrained_tag}) but backbone= is "
            f"{found.source}:{found.name}; the debiased features are only meaningful on the original backbone.",
            stacklevel=4,
        )


__all__ = ["DebiasedEncoder"]
