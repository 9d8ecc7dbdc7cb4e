"""`DebiasedEncoder`: a frozen backbone, a hooked layer, and the DeepMinMax heads, as one nn.Module."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .backbones import BackboneSpec, build_backbone, create_backbone, describe_backbone, freeze
from .config import Attribute, FitConfig, HeadConfig, Pooling, _known_keys, build_dataclass
from .hooks import FeatureExtractor
from .objective import DeepMinMax
from .serialization import (CONFIG_NAME, FORMAT_VERSION, MODEL_TYPE, WEIGHTS_NAME, check_keys, load_weights,
                            read_config, save_weights, write_atomically, write_config)
from .trainer import FitHistory, train


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


class DebiasedEncoder(nn.Module):
    """A frozen backbone whose features at `layer` are debiased by DeepMinMax.

    Args:
        backbone: any nn.Module, or a name "timm:ARCH" / "torchvision:ARCH" built with random weights.
        layer: a name from `backbone.named_modules()` whose output is hooked; None uses the backbone's output.
        attributes: the sensitive attributes B to remove, in the column order of the attribute tensors.
        pool: how a hooked 4-D map or 3-D token sequence becomes [N, D]: "avg" (default: mean over space or
            tokens), "max", "cls" (token 0) or "flatten".
        input_size: shape of one input without batch, e.g. (3, 224, 224). When given, one dummy forward infers the
            feature width now; otherwise the heads are built on the first batch `fit` sees.
        **head_options: fields of `HeadConfig` (h_layers, h_hidden, out_dim, m_layers, ...).

    Example:
        >>> enc = DebiasedEncoder("torchvision:resnet18", "avgpool", [Attribute("site", "categorical", 3)])
        >>> history = enc.fit(loader, epochs=5)
        >>> z_tilde = enc(images)
    """

    def __init__(self, backbone: nn.Module | str, layer: str | None, attributes: Sequence[Attribute | dict[str, Any]],
                 *, pool: Pooling = "avg", input_size: Sequence[int] | None = None, **head_options: Any) -> None:
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
        self.head_config = build_dataclass(HeadConfig, head_options, "head")
        self.extractor = FeatureExtractor(freeze(backbone), layer, pool)
        self.input_size = tuple(input_size) if input_size is not None else None
        self.heads: DeepMinMax | None = None
        if feature_dim is None and self.input_size is not None:
            feature_dim = self._infer_feature_dim(torch.zeros(2, *self.input_size))
        if feature_dim is not None:
            self._build_heads(feature_dim)

    # ----------------------------------------------------------------- structure
    @property
    def backbone(self) -> nn.Module:
        return self.extractor.backbone

    @property
    def layer(self) -> str | None:
        return self.extractor.layer

    @property
    def feature_dim(self) -> int | None:
        """Width D of the hooked, pooled features (None until inferred)."""
        return self.heads.feature_dim if self.heads is not None else None

    def _infer_feature_dim(self, example: Tensor) -> int:
        param = next(self.backbone.parameters(), None)
        if param is not None:
            example = example.to(param.device, param.dtype)
        with torch.no_grad():
            return int(self.extractor(example).shape[1])

    def _build_heads(self, feature_dim: int) -> None:
        param = next(self.backbone.parameters(), None)
        self.heads = DeepMinMax(feature_dim, self.attributes, self.head_config)
        if param is not None:
            self.heads.to(param.device)

    def train(self, mode: bool = True) -> DebiasedEncoder:
        super().train(mode)
        self.extractor.train(False)  # the backbone stays in eval mode
        return self

    # ----------------------------------------------------------------- inference
    def _require_heads(self) -> DeepMinMax:
        if self.heads is None:
            raise RuntimeError("The heads are not built yet: call fit(...) first, pass input_size=, or load with from_pretrained.")
        return self.heads

    def features(self, inputs: Tensor) -> Tensor:
        """Raw hooked, pooled features Z [N, D] (float32), computed without gradients."""
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
            **options: Any) -> FitHistory:
        """Train the heads on a stream of `(inputs, attrs)` batches; the backbone is never updated.

        Args:
            loader: an iterable of batches (inputs [N, ...], attrs [N, num_attributes] float with class ids in
                categorical columns) or (inputs, {name: tensor}). Re-iterated once per epoch.
            epochs: passes over the loader; overrides `config.epochs`.
            config: a FitConfig; **options override its fields (lr, lam, max_steps, device, amp_dtype, ...).

        Returns:
            The FitHistory of the loss terms. If fit raises, the heads are restored to their state before the call.
        """
        base = dataclasses.asdict(config) if config is not None else {}
        base.update(options)
        if epochs is not None:
            base["epochs"] = epochs
        cfg = build_dataclass(FitConfig, base, "fit")
        if cfg.device is not None:
            self.to(cfg.device)
        device = next(self.backbone.parameters(), torch.empty(0)).device
        if self.heads is not None:
            self.heads.to(device)
        snapshot = copy.deepcopy(self.heads.state_dict()) if self.heads is not None else None
        try:
            if self.heads is None:
                self._build_heads_from(loader, device, cfg)
            assert self.heads is not None
            self.heads.train()
            return train(self.heads, loader, self.extractor, cfg, device)
        except BaseException:
            if snapshot is None:
                self.heads = None
            else:
                self.heads.load_state_dict(snapshot)
            raise
        finally:
            if self.heads is not None:
                self.heads.eval()

    def _build_heads_from(self, loader: Iterable, device: torch.device, cfg: FitConfig) -> None:
        from .trainer import iterate_batches

        for z, _ in iterate_batches(loader, self.attributes, self.extractor, device, cfg.amp_dtype):
            self._build_heads(int(z.shape[1]))
            return
        raise ValueError("The loader is empty: it produced no batch. Check the dataset and drop_last.")

    # ----------------------------------------------------------------- saving
    def config_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this model, as saved in config.json."""
        heads = self._require_heads()
        return {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "dmm_wrap_version": __version__,
            "backbone": self.backbone_spec.to_dict(),
            "layer": self.layer,
            "pool": self.extractor.pool,
            "input_size": list(self.input_size) if self.input_size is not None else None,
            "feature_dim": heads.feature_dim,
            "out_dim": heads.out_dim,
            "attributes": [a.to_dict() for a in self.attributes],
            "head": dataclasses.asdict(self.head_config),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors (backbone and heads) to `save_directory`, atomically.

        Example:
            >>> enc.save_pretrained("runs/debiased-resnet18")
        """
        config = self.config_dict()
        state = self.state_dict()

        def writer(tmp: Path) -> None:
            save_weights(state, tmp / WEIGHTS_NAME)
            write_config(config, tmp / CONFIG_NAME)

        return write_atomically(save_directory, writer)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backbone: nn.Module | None = None,
                        map_location: str | torch.device = "cpu") -> DebiasedEncoder:
        """Load a model written by `save_pretrained`.

        timm and torchvision backbones are rebuilt by name; a custom backbone must be passed as `backbone=`.
        Weights are read from safetensors only, with strict key and shape checks.

        Example:
            >>> enc = DebiasedEncoder.from_pretrained("runs/debiased-resnet18")
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a folder written by save_pretrained.")
        config = read_config(directory / CONFIG_NAME)
        model = cls._from_config(config, backbone)
        state = load_weights(directory / WEIGHTS_NAME)
        expected = model.state_dict()
        check_keys(expected, state, directory / WEIGHTS_NAME)
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()

    @classmethod
    def _from_config(cls, config: dict[str, Any], backbone: nn.Module | None) -> DebiasedEncoder:
        known = {"model_type", "format_version", "dmm_wrap_version", "backbone", "layer", "pool", "input_size",
                 "feature_dim", "out_dim", "attributes", "head"}
        unknown = sorted(set(config) - known)
        if unknown:
            warnings.warn(f"Ignoring unknown config keys {unknown} (written by a newer dmm_wrap?).", stacklevel=3)
        spec = BackboneSpec.from_dict(config["backbone"])
        if backbone is None:
            backbone = build_backbone(spec)
        head = _known_keys(HeadConfig, config.get("head", {}), "head config")
        model = cls(backbone, config["layer"], [Attribute.from_dict(a) for a in config["attributes"]],
                    pool=config.get("pool", "avg"), input_size=None, _feature_dim=int(config["feature_dim"]), **head)
        model.input_size = tuple(config["input_size"]) if config.get("input_size") else None
        if backbone is not None and spec.source != "custom":
            model.backbone_spec = spec
        return model


__all__ = ["DebiasedEncoder"]
