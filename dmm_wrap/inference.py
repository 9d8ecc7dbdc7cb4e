"""Inference outside training: image preprocessing, the hook-free graph that compile / export use, ONNX export.

`DebiasedEncoder` hooks its backbone and stops the forward by raising; that is cheap in eager mode but is not one
graph. `InferenceModule` computes the same function without hooks: the backbone truncated at the hooked layer by
torch.fx (so later layers are gone, not skipped), then pooling, standardisation and h_theta. `InferenceMixin` gives
the encoder its inference methods (preprocess, embed, inference_module, export_onnx) and its compile / export path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from .backbones import BackboneSpec, registered_pretrained
from .config import Pooling, check_choice, known_keys
from .core.hooks import first_tensor, pool
from .core.objective import DeepMinMax

Interpolation = Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]
CropMode = Literal["center", "squash", "border"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAPH_OUTPUT = "features"
"""The key under which a truncated backbone (`truncate_backbone`) returns the hooked layer's output."""
_NODE_KEY = GRAPH_OUTPUT


@dataclass(frozen=True)
class Preprocessing:
    """How a PIL image becomes the backbone's input tensor; saved in config.json as "preprocessing".

    Example:
        >>> Preprocessing(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    """

    input_size: tuple[int, int, int]
    """(channels, height, width) of the network input."""

    mean: tuple[float, ...]
    """Per-channel mean subtracted after pixels are scaled to [0, 1]."""

    std: tuple[float, ...]
    """Per-channel standard deviation divided by after the mean is subtracted."""

    interpolation: Interpolation = "bilinear"
    """Resampling filter of the resize."""

    crop_pct: float = 0.875
    """The image is resized to input_size / crop_pct, then cropped to input_size (1.0: no margin)."""

    crop_mode: CropMode = "center"
    """timm's crop mode: "center" (resize the short side, center-crop), "squash" (resize both sides) or "border"."""

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"Preprocessing.input_size must be (channels, height, width), got {self.input_size!r}.")
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != size[0] or len(std) != size[0]:
            raise ValueError(
                f"Preprocessing.mean and .std need one value per channel ({size[0]}), got {len(mean)} and {len(std)}."
            )
        if min(std) <= 0:
            raise ValueError(f"Preprocessing.std must be > 0, got {std}.")
        check_choice("Preprocessing", "interpolation", self.interpolation, get_args(Interpolation))
        check_choice("Preprocessing", "crop_mode", self.crop_mode, get_args(CropMode))
        if not 0 < float(self.crop_pct) <= 1:
            raise ValueError(f"Preprocessing.crop_pct must lie in (0, 1], got {self.crop_pct!r}.")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (config.json's "preprocessing")."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Build from a mapping; unknown keys are dropped with a warning, missing required ones raise."""
        if not isinstance(d, dict):
            raise TypeError(f"preprocessing must be a mapping or a Preprocessing, got {type(d).__name__}.")
        missing = [k for k in ("input_size", "mean", "std") if k not in d]
        if missing:
            raise ValueError(f"preprocessing lacks {missing}; give input_size, mean and std at least.")
        return cls(**known_keys(cls, d, "preprocessing"))

    def transform(self) -> Callable[[Any], Tensor]:
        """The eval transform (resize, crop, to tensor, normalise) built by `timm.data.create_transform`."""
        from timm.data import create_transform

        return create_transform(input_size=self.input_size, is_training=False, interpolation=self.interpolation,
                                mean=self.mean, std=self.std, crop_pct=self.crop_pct, crop_mode=self.crop_mode)


def as_preprocessing(value: Preprocessing | dict[str, Any] | None) -> Preprocessing | None:
    """Accept a Preprocessing, a dict of its fields, or None."""
    if value is None or isinstance(value, Preprocessing):
        return value
    return Preprocessing.from_dict(value)


def default_preprocessing(backbone: nn.Module, spec: BackboneSpec,
                          input_size: Sequence[int] | None) -> Preprocessing | None:
    """The preprocessing a backbone expects, or None when it cannot be known.

    timm: `timm.data.resolve_model_data_config`. torchvision: the transforms of the pretrained weights enum when
    `spec.pretrained_tag` names one, else ImageNet statistics at 224 px with bilinear resize and crop_pct 0.875.
    custom: None (set `DebiasedEncoder.preprocessing` yourself). A backbone registered with `register_pretrained`:
    the preprocessing it was registered with. An `input_size` of (C, H, W) given to the encoder replaces the
    backbone's default resolution, since that is the size the model was built for.
    """
    size = tuple(input_size) if input_size is not None and len(input_size) == 3 else None
    try:
        fields = _backbone_preprocessing(backbone, spec, size)
        return Preprocessing(**fields) if fields is not None else None
    except Exception as err:  # noqa: BLE001 - a convenience: it must never stop the model from being built
        warnings.warn(f"No preprocessing recorded ({type(err).__name__}: {err}); set model.preprocessing to use "
                      "model.preprocess.", stacklevel=3)
        return None


def _backbone_preprocessing(backbone: nn.Module, spec: BackboneSpec,
                            size: tuple[int, ...] | None) -> dict[str, Any] | None:
    registered = registered_pretrained(spec.pretrained_tag)
    if registered is not None:
        fields = registered.preprocessing
        return None if fields is None else {**fields, "input_size": size or fields["input_size"]}
    if spec.source == "timm":
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(backbone)
        return dict(input_size=size or cfg["input_size"], mean=cfg["mean"], std=cfg["std"],
                    interpolation=cfg.get("interpolation", "bicubic"), crop_pct=cfg.get("crop_pct", 0.875),
                    crop_mode=cfg.get("crop_mode") or "center")
    if spec.source == "torchvision":
        fields: dict[str, Any] = dict(input_size=size or (3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                      interpolation="bilinear", crop_pct=0.875)
        fields.update(_torchvision_weights_preprocessing(spec.pretrained_tag, size))
        return fields
    return None


def _torchvision_weights_preprocessing(tag: str | None, size: tuple[int, ...] | None) -> dict[str, Any]:
    if tag is None:
        return {}
    import torchvision

    transforms = torchvision.models.get_weight(tag).transforms()
    crop, resize = getattr(transforms, "crop_size", None), getattr(transforms, "resize_size", None)
    if not crop or not resize or not hasattr(transforms, "mean"):
        return {}  # detection / video weights: not an image-classification transform
    out: dict[str, Any] = dict(mean=tuple(transforms.mean), std=tuple(transforms.std),
                               interpolation=transforms.interpolation.value, crop_pct=crop[0] / resize[0])
    if size is None:
        out["input_size"] = (3, crop[0], crop[0])
    return out


class InferenceModule(nn.Module):
    """`DebiasedEncoder.forward` as one hook-free graph: truncated backbone -> pooling -> standardisation -> h_theta.

    It shares the backbone and h_theta parameters with the encoder it came from and copies the standardisation
    statistics: build a new one after `fit`. It stays in eval mode.
    """

    def __init__(self, trunk: nn.Module, pool: Pooling, heads: DeepMinMax, truncated: bool,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool: Pooling = pool
        self.channels_last = channels_last  # the hooked maps are [N, H, W, C]
        self.truncated = truncated  # trunk returns {"features": hooked output}; else it is the whole backbone
        self.h = heads.h
        self.register_buffer("feature_mean", heads.feature_mean.detach().clone())
        self.register_buffer("feature_std", heads.feature_std.detach().clone())
        self.train(False)

    def forward(self, inputs: Tensor) -> Tensor:
        """Debiased features Z~ [N, out_dim] of a batch of inputs."""
        out = self.trunk(inputs)
        if self.truncated:
            out = out[_NODE_KEY]
        z = pool(first_tensor(out), self.pool, self.channels_last).float()
        return self.h((z - self.feature_mean) / self.feature_std)

    def train(self, mode: bool = True) -> InferenceModule:
        """Stay in eval mode, whatever `mode` says."""
        super().train(False)
        return self


def truncate_backbone(backbone: nn.Module, layer: str | None, spec: BackboneSpec) -> tuple[nn.Module, bool]:
    """The backbone up to `layer` with no hook: an FX GraphModule returning {"features": output of layer}.

    Returns the module and whether it was truncated (layer None keeps the whole backbone). timm models are traced
    with timm's leaf-module rules, others with torchvision's `create_feature_extractor`.
    """
    if layer is None:
        return backbone, False
    if spec.source == "timm" or hasattr(backbone, "pretrained_cfg"):
        from timm.models import create_feature_extractor

        build = lambda: create_feature_extractor(backbone, {layer: _NODE_KEY})  # noqa: E731
    else:
        from torchvision.models.feature_extraction import create_feature_extractor as tv_create

        build = lambda: tv_create(backbone, {layer: _NODE_KEY}, suppress_diff_warning=True)  # noqa: E731
    try:
        return build(), True
    except Exception as err:  # noqa: BLE001 - FX raises many types (TraceError, TypeError, ValueError, ...)
        raise ValueError(
            f"Cannot build a hook-free graph of {type(backbone).__name__} up to layer {layer!r}: torch.fx could not "
            f"trace it ({type(err).__name__}: {err}). The hooked model still works in eager mode and under "
            "torch.compile(model); for export, hook a layer FX can reach or mark the untraceable function with "
            "torch.fx.wrap."
        ) from err


def export_onnx(module: nn.Module, path: str | os.PathLike, example: Tensor, *, dynamic_batch: bool = True,
                opset_version: int | None = None) -> Path:
    """Export `module` to ONNX with the dynamo exporter; input "inputs", output "z_tilde".

    Args:
        module: usually `DebiasedEncoder.inference_module()`.
        path: the .onnx file to write.
        example: an input batch [N, ...]; with `dynamic_batch` the batch dimension stays symbolic.
        opset_version: ONNX opset; None uses the exporter's default.
    """
    if importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnx") is None:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'dmm-wrap[export]'.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["inputs"],
                          output_names=["z_tilde"], dynamic_shapes=dynamic_shapes, opset_version=opset_version,
                          verbose=False)
    return path


def compiling() -> bool:
    """Whether torch.compile (dynamo) or torch.export is tracing the current call."""
    check = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3; it is also True under torch.export
    return bool(check()) if check is not None else bool(torch._dynamo.is_compiling())


class InferenceMixin:
    """The inference methods of `DebiasedEncoder`: preprocessing, batched embedding, the hook-free graph, ONNX.

    The class provides `backbone`, `layer`, `backbone_spec`, `extractor` (its `pool`), `channels_last`, `input_size`,
    `device`, `_require_heads()` (the built `DeepMinMax`) and a forward that gives Z~.
    """

    _preprocessing: Preprocessing | None = None
    _transform: Callable[[Any], Tensor] | None = None

    @property
    def preprocessing(self) -> Preprocessing | None:
        """How PIL images become inputs (saved in config.json); None when unknown. Assign a Preprocessing or a dict."""
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing | dict[str, Any] | None) -> None:
        self._preprocessing = as_preprocessing(value)
        self._transform = None

    @property
    def preprocess(self) -> Callable[[Any], Tensor]:
        """The eval transform of `preprocessing` (resize, crop, to tensor, normalise) for one PIL image.

        Example:
            >>> x = torch.stack([enc.preprocess(img) for img in pil_images])
        """
        if self._transform is None:
            if self._preprocessing is None:
                raise ValueError(
                    "This model records no preprocessing (custom backbone or non-image inputs). Set it, e.g. "
                    "model.preprocessing = dict(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), "
                    "std=(0.229, 0.224, 0.225)), or pass tensors that are already preprocessed."
                )
            self._transform = self._preprocessing.transform()
        return self._transform

    def embed(self, images: Tensor | Iterable[Any], batch_size: int = 64, *,
              device: str | torch.device | None = None) -> Tensor:
        """Debiased features Z~ [N, out_dim] on CPU, computed in batches under torch.inference_mode.

        Args:
            images: a tensor [N, ...] of preprocessed inputs, or an iterable of PIL images (run through
                `preprocess`) and/or preprocessed tensors [C, H, W].
            batch_size: inputs per forward pass.
            device: where to run; None uses the model's device.

        Example:
            >>> z_tilde = enc.embed([Image.open(p).convert("RGB") for p in paths], batch_size=32)
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        heads = self._require_heads()
        if device is None:
            device = self.device
        if isinstance(images, Tensor):
            batches: Iterable[Tensor] = images.split(batch_size)
        else:
            items = iter(images)
            batches = (torch.stack([x if isinstance(x, Tensor) else self.preprocess(x) for x in chunk])
                       for chunk in iter(lambda: list(itertools.islice(items, batch_size)), []))
        out: list[Tensor] = []
        with torch.inference_mode():
            for batch in batches:
                out.append(self(batch.to(device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, heads.out_dim)

    def inference_module(self, *, check: bool = True) -> InferenceModule:
        """`forward` as a plain hook-free nn.Module for torch.compile(fullgraph=True), torch.export and ONNX.

        The backbone is truncated at the hooked layer with torch.fx (later layers are removed), followed by
        pooling, standardisation and h_theta. It shares weights with this model; build a new one after `fit`.

        Args:
            check: when `input_size` is known, compare the module with the hooked forward on a random batch and
                raise if they differ (torch.fx froze a different control-flow path).

        Example:
            >>> program = torch.export.export(enc.inference_module(), (x,))
        """
        heads = self._require_heads()
        trunk, truncated = truncate_backbone(self.backbone, self.layer, self.backbone_spec)
        module = InferenceModule(trunk, self.extractor.pool, heads, truncated, self.channels_last)
        if check and self.input_size is not None:
            param = next(itertools.chain(self.backbone.parameters(), heads.parameters()))
            x = torch.randn(2, *self.input_size, generator=torch.Generator().manual_seed(0))
            x = x.to(param.device, param.dtype if param.is_floating_point() else None)
            with torch.no_grad():
                expected, got = self(x), module(x)
            if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
                raise RuntimeError(
                    f"The hook-free graph of {type(self.backbone).__name__} differs from the hooked forward (max abs "
                    f"diff {(expected - got).abs().max().item():.3g}); torch.fx traced a different path. Use the "
                    "eager model, or hook another layer."
                )
        return module

    def export_onnx(self, path: str | os.PathLike, example: Tensor, *, dynamic_batch: bool = True,
                    opset_version: int | None = None) -> Path:
        """Export the hook-free `inference_module()` to an ONNX file (input "inputs", output "z_tilde").

        Example:
            >>> enc.export_onnx("debiased.onnx", torch.randn(2, 3, 224, 224))
        """
        return export_onnx(self.inference_module(), path, example, dynamic_batch=dynamic_batch,
                           opset_version=opset_version)

    def _prepare_graph(self) -> None:
        """Trace the hook-free graph that compile / export run, now: it cannot be built while dynamo traces forward.

        Kept out of the module tree (not a submodule), so it adds no state_dict keys; its leaf modules are the
        backbone's own, so it follows the backbone's weights and devices. Tracing runs the forward hooks of the
        backbone's traced-through modules once, on torch.fx proxies (so that hooks which change outputs are in the
        graph). A backbone torch.fx cannot trace still works in eager mode; compile / export then raise the reason.
        """
        try:
            with warnings.catch_warnings():  # torch.fx's notes concern inference_module() users, not every model
                warnings.simplefilter("ignore")
                trunk, truncated = truncate_backbone(self.backbone, self.layer, self.backbone_spec)
        except ValueError as err:
            self.__dict__["_graph"] = err
        else:
            self.__dict__["_graph"] = (trunk.eval(), truncated)

    def _graph_features(self, inputs: Tensor) -> Tensor:
        """`features` through the hook-free graph: what torch.compile and torch.export trace."""
        graph = self.__dict__.get("_graph")
        if isinstance(graph, ValueError):
            raise RuntimeError(f"torch.compile / torch.export need a hook-free graph of the backbone. {graph}"
                               ) from graph
        if graph is None:
            raise RuntimeError("The heads are not built yet: call fit(...) first, pass input_size=, or load with "
                               "from_pretrained, then compile or export.")
        trunk, truncated = graph
        with torch.no_grad():
            out = trunk(inputs)
            if truncated:
                out = out[GRAPH_OUTPUT]
            return pool(first_tensor(out), self.extractor.pool, self.channels_last).float()


__all__ = ["GRAPH_OUTPUT", "Preprocessing", "InferenceModule", "InferenceMixin", "as_preprocessing",
           "default_preprocessing", "truncate_backbone", "export_onnx", "compiling", "IMAGENET_MEAN", "IMAGENET_STD"]
