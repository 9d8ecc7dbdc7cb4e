"""Frozen backbones: build timm / torchvision models by name, describe any module so it can be rebuilt, and rebuild the
pinned pretrained backbone of a heads-only save (from the registry of shipped weights, or by download)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

BackboneSource = Literal["timm", "torchvision", "custom"]
_SPEC_ATTR = "_dmm_backbone_spec"


@dataclass(frozen=True)
class BackboneSpec:
    """How to rebuild a backbone's architecture; its weights travel in the safetensors file."""

    source: BackboneSource
    """"timm", "torchvision", or "custom" (the caller passes the module back when loading)."""

    name: str | None = None
    """Architecture name for timm / torchvision (e.g. "resnet18"); the class name for custom modules."""

    pretrained_tag: str | None = None
    """The pretrained weights the backbone started from (timm tag or torchvision weights enum), if known."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments (e.g. img_size for a timm ViT)."""

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (config.json's "backbone")."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        """Read a spec written by `to_dict`."""
        return cls(source=d["source"], name=d.get("name"), pretrained_tag=d.get("pretrained_tag"),
                   kwargs=dict(d.get("kwargs") or {}))


def create_backbone(name: str, pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    """Build a timm or torchvision model from "timm:ARCH" or "torchvision:ARCH" and tag it for rebuilding.

    Args:
        name: "timm:resnet18", "torchvision:resnet18", or a bare name (tried in timm, then torchvision).
        pretrained: False for random init; True or a weights tag to download pretrained weights (needs network).
        **kwargs: passed to `timm.create_model` / `torchvision.models.get_model`; the shape arguments among them
            (`REBUILD_KWARGS`) are recorded so that `from_pretrained` rebuilds the same architecture.

    Example:
        >>> backbone = create_backbone("torchvision:resnet18")
    """
    source, _, arch = name.partition(":") if ":" in name else ("", "", name)
    if source not in ("", "timm", "torchvision"):
        raise ValueError(f"Unknown backbone source {source!r} in {name!r}; use 'timm:ARCH' or 'torchvision:ARCH'.")
    if source in ("", "timm"):
        import timm

        if source == "timm" or timm.is_model(arch):
            if not timm.is_model(arch.split(".")[0]):
                close = timm.list_models(f"*{arch[:6]}*")[:5]
                raise ValueError(f"timm has no architecture {arch!r}. Similar names: {close}.")
            tag = pretrained if isinstance(pretrained, str) else None
            model = timm.create_model(f"{arch}.{tag}" if tag else arch, pretrained=bool(pretrained), **kwargs)
            spec_tag = tag or (model.pretrained_cfg.get("tag") if pretrained else None)
            return tag_backbone(model, _created_spec(model, "timm", arch, spec_tag, kwargs))
    import torchvision

    available = torchvision.models.list_models()
    if arch not in available:
        import difflib

        close = difflib.get_close_matches(arch, available, n=5)
        raise ValueError(f"No timm or torchvision architecture named {arch!r}. Closest torchvision names: {close}.")
    weights = None
    if pretrained:
        weights = pretrained if isinstance(pretrained, str) else "DEFAULT"
    model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    tag = str(torchvision.models.get_model_weights(arch).verify(weights)) if weights else None
    return tag_backbone(model, _created_spec(model, "torchvision", arch, tag, kwargs))


def tag_backbone(module: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Attach a rebuild spec to `module` (used by `describe_backbone`)."""
    object.__setattr__(module, _SPEC_ATTR, spec)
    return module


def describe_backbone(module: nn.Module) -> BackboneSpec:
    """Return the spec that rebuilds `module`'s architecture: its tag, a timm config, a torchvision match, or custom.

    timm and torchvision models are described by their architecture name plus the shape arguments they differ in
    from its defaults (num_classes, in_chans, img_size, ...), checked by rebuilding them on the meta device and
    comparing tensor shapes; a model no such rebuild reproduces is "custom".
    """
    spec = getattr(module, _SPEC_ATTR, None)
    if isinstance(spec, BackboneSpec):
        return spec
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("architecture"), str):
        spec = _inferred_spec(module, "timm", cfg["architecture"])
        if spec is not None:
            return spec
    if type(module).__module__.startswith("torchvision.models"):
        spec = _match_torchvision(module)
        if spec is not None:
            return spec
    return BackboneSpec("custom", type(module).__name__, None, {})


REBUILD_KWARGS: dict[str, frozenset[str]] = {
    "timm": frozenset({"num_classes", "in_chans", "img_size", "global_pool", "patch_size", "window_size",
                       "class_token", "reg_tokens", "no_embed_class", "embed_dim", "depth", "depths", "num_heads",
                       "dims", "dynamic_img_size", "dynamic_img_pad"}),
    "torchvision": frozenset({"num_classes", "image_size", "aux_logits", "transform_input"}),
}
"""The constructor arguments a spec may pass when rebuilding: those that shape the weights or the forward. Others
(checkpoint_path, pretrained, pretrained_cfg_overlay, weights, ...) could read files or reach the network."""
_NAME_CHARS = re.compile(r"^[A-Za-z0-9_.-]+$")
_MISSING = object()


def check_rebuild_spec(spec: BackboneSpec, where: str = "the backbone spec") -> None:
    """Raise a ValueError if `spec` (e.g. read from a config.json) would pass anything but shape arguments."""
    if spec.source not in REBUILD_KWARGS:
        return
    for label, value in (("name", spec.name), ("pretrained_tag", spec.pretrained_tag)):
        if not (value is None and label == "pretrained_tag") and not (
                isinstance(value, str) and _NAME_CHARS.match(value)):
            raise ValueError(f"{where}: backbone {label} must be a plain {spec.source} name (letters, digits, '_', "
                             f"'.', '-'), got {value!r}. Fix config.json, or pass from_pretrained(..., backbone=).")
    allowed = REBUILD_KWARGS[spec.source]
    for key, value in spec.kwargs.items():
        if key not in allowed:
            raise ValueError(
                f"{where}: backbone kwargs {key!r} is refused; only the shape arguments {sorted(allowed)} are passed "
                f"to {spec.source} when rebuilding (others can load files or reach the network). Remove {key!r} "
                "from config.json, or build the backbone yourself and pass it as from_pretrained(..., backbone=)."
            )
        if not _is_plain(value):
            raise ValueError(f"{where}: backbone kwargs {key!r} must be a number, string, bool or a list of numbers, "
                             f"got {value!r}. Fix config.json, or pass from_pretrained(..., backbone=).")


def _is_plain(value: Any) -> bool:
    """Whether `value` is a JSON scalar or a list of numbers: what a shape argument can be."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _plain(value: Any) -> Any:
    """Tuples (timm's img_size) as lists, as config.json stores them, so a loaded spec equals the saved one."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list, torch.Size)) else value


def _created_spec(model: nn.Module, source: str, name: str, tag: str | None, kwargs: dict[str, Any]) -> BackboneSpec:
    """The spec of a model built by `create_backbone`: its shape arguments (given or read back), checked by a
    rebuild; "custom" when a non-shape argument changed the architecture."""
    given = {k: _plain(v) for k, v in kwargs.items() if k in REBUILD_KWARGS[source]}
    spec = _inferred_spec(model, source, name, given)
    if spec is None:
        return BackboneSpec("custom", type(model).__name__, None, {})
    return dataclasses.replace(spec, pretrained_tag=tag)


def _inferred_spec(module: nn.Module, source: str, name: str,
                   given: dict[str, Any] | None = None) -> BackboneSpec | None:
    """`source:name` with the shape arguments in which `module` differs from the default build, or None when that
    rebuild does not reproduce `module` (tensor shapes, pooling, recorded arguments)."""
    default = _empty_build(source, name, {})
    if default is None:
        return None
    kwargs = _non_default(default, source, {**_shape_kwargs(module, source), **(given or {})})
    rebuilt = default if not kwargs else _empty_build(source, name, kwargs)
    if rebuilt is None or _signature(rebuilt, source) != _signature(module, source):
        return None
    return BackboneSpec(source, name, None, kwargs)  # type: ignore[arg-type]


def _non_default(default: nn.Module, source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The items of `kwargs` that differ from the `default` build's shape arguments."""
    defaults = _shape_kwargs(default, source)
    return {k: v for k, v in kwargs.items() if defaults.get(k, _MISSING) != v}


def _shape_kwargs(module: nn.Module, source: str) -> dict[str, Any]:
    """The shape arguments `module` was built with, read from its attributes."""
    out: dict[str, Any] = {}
    if source == "timm":
        if isinstance(getattr(module, "num_classes", None), int):
            out["num_classes"] = module.num_classes
        first = _first_conv(module)
        if first is not None:
            out["in_chans"] = first
        img_size = getattr(module, "img_size", None)
        if img_size is None:
            img_size = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if isinstance(img_size, (int, tuple, list)):
            out["img_size"] = _plain(img_size)
        global_pool = _global_pool(module)
        if global_pool is not None:
            out["global_pool"] = global_pool
        return out
    head = None
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            head = sub
    if head is not None:  # the classifier is the last Linear (Conv2d in SqueezeNet)
        out["num_classes"] = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    if isinstance(getattr(module, "image_size", None), int):
        out["image_size"] = module.image_size
    for key in ("aux_logits", "transform_input"):
        if isinstance(getattr(module, key, None), bool):
            out[key] = getattr(module, key)
    return out


def _first_conv(module: nn.Module) -> int | None:
    """Input channels of a timm model: its pretrained_cfg's first_conv, else the first module with in_channels."""
    cfg = getattr(module, "pretrained_cfg", None)
    name = cfg.get("first_conv") if isinstance(cfg, dict) else None
    if isinstance(name, str):
        try:
            channels = getattr(module.get_submodule(name), "in_channels", None)
        except AttributeError:
            channels = None
        if isinstance(channels, int):
            return channels
    for sub in module.modules():
        if isinstance(getattr(sub, "in_channels", None), int):
            return sub.in_channels
    return None


def _global_pool(module: nn.Module) -> str | None:
    """timm's global_pool: a string on ViT-style models, else the pool_type of the (head's) SelectAdaptivePool2d."""
    pool = getattr(module, "global_pool", None)
    if isinstance(pool, str):
        return pool
    for name, sub in module.named_modules():
        if name.split(".")[-1] == "global_pool" and isinstance(getattr(sub, "pool_type", None), str):
            return sub.pool_type
    return None


def _signature(module: nn.Module, source: str) -> tuple[Any, ...]:
    """What a rebuild must reproduce: the class, every tensor's shape, the pooling types and the shape arguments."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    pools = {n: m.pool_type for n, m in module.named_modules() if isinstance(getattr(m, "pool_type", None), str)}
    return type(module), shapes, pools, _shape_kwargs(module, source)


def _empty_build(source: str, name: str, kwargs: dict[str, Any]) -> nn.Module | None:
    """Build `source:name` with `kwargs` without allocating or initialising weights, or None if that fails."""
    import timm  # imported outside the meta-device context, so no module-level tensor lands on 'meta'
    import torchvision

    def construct() -> nn.Module:
        if source == "timm":
            return timm.create_model(name, pretrained=False, **kwargs)
        return torchvision.models.get_model(name, weights=None, **kwargs)

    for context in (lambda: torch.device("meta"), _parameters_on_meta):
        try:
            with context():
                return construct()
        except Exception:  # noqa: BLE001 - a builder that rejects the arguments simply does not match
            continue
    return None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move parameters and buffers to 'meta' as modules register them, while other tensors stay real: for builders
    that read tensors in __init__ (torchvision's RegNet computes its widths with torch.arange(...).tolist())."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def meta_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def meta_buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(self, name, tensor.to("meta") if tensor is not None else None, persistent)

    nn.Module.register_parameter = meta_parameter  # type: ignore[method-assign]
    nn.Module.register_buffer = meta_buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


def _match_torchvision(module: nn.Module) -> BackboneSpec | None:
    """Find the torchvision builder that, given this module's num_classes (read from its classifier) and other shape
    arguments, rebuilds its class and tensor shapes (built on 'meta')."""
    import torchvision

    found = _shape_kwargs(module, "torchvision")
    target = _signature(module, "torchvision")
    names = [name for name in torchvision.models.list_models(module=torchvision.models)
             if torchvision.models.get_model_builder(name).__module__ == type(module).__module__]
    size = _parameter_count_at_1000_classes(module)
    names.sort(key=lambda name: abs(_published_parameter_count(name) - size))  # likeliest builder first
    for name in names:
        candidate = _empty_build("torchvision", name, found)
        if candidate is not None and _signature(candidate, "torchvision") == target:
            default = _empty_build("torchvision", name, {})
            if default is not None:
                return BackboneSpec("torchvision", name, None, _non_default(default, "torchvision", found))
    return None


def _parameter_count_at_1000_classes(module: nn.Module) -> float:
    """The module's parameter count with its classifier (the last Linear / Conv2d) scaled to 1000 classes."""
    count = float(sum(p.numel() for p in module.parameters()))
    head = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]
    if head:
        out = head[0].out_features if isinstance(head[0], nn.Linear) else head[0].out_channels
        count += sum(p.numel() for p in head[0].parameters()) * (1000 / out - 1)
    return count


def _published_parameter_count(name: str) -> float:
    """num_params of a torchvision builder's weights (an ordering hint only); infinity when none is published."""
    import torchvision

    try:
        return float(next(iter(torchvision.models.get_model_weights(name))).meta["num_params"])
    except (KeyError, StopIteration, ValueError, TypeError, AttributeError):
        return float("inf")


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """Rebuild a timm / torchvision architecture with random weights (they are loaded from the checkpoint)."""
    if spec.source == "custom":
        raise ValueError(
            f"This model was trained on a custom backbone ({spec.name}); rebuild it yourself and pass it "
            "with from_pretrained(..., backbone=module)."
        )
    check_rebuild_spec(spec)
    return create_backbone(f"{spec.source}:{spec.name}", pretrained=False, **spec.kwargs)


@dataclass(frozen=True)
class PretrainedBackbone:
    """A backbone whose weights ship with a package, registered under its pretrained tag by `register_pretrained`."""

    build: Callable[[], nn.Module]
    """Builds the frozen backbone with its weights, without a download."""

    preprocessing: Mapping[str, Any] | None = None
    """The fields of its `Preprocessing` (input_size, mean, std, ...); None when it records none (tensor inputs)."""


_PRETRAINED: dict[str, PretrainedBackbone] = {}


def register_pretrained(tag: str, build: Callable[[], nn.Module],
                        preprocessing: Mapping[str, Any] | None = None) -> None:
    """Register a backbone with shipped weights under its `BackboneSpec.pretrained_tag`.

    A heads-only save whose backbone carries `tag` is then loaded with `build()` (no download), and the model's
    default preprocessing is `preprocessing`. Registering a tag again replaces the entry.

    Example:
        >>> register_pretrained("dmm_wrap-digits", load_digits_encoder)
    """
    _PRETRAINED[tag] = PretrainedBackbone(build, dict(preprocessing) if preprocessing is not None else None)


def registered_pretrained(tag: str | None) -> PretrainedBackbone | None:
    """The backbone registered under `tag` by `register_pretrained`, or None."""
    return _PRETRAINED.get(tag) if tag is not None else None


def pretrained_backbone(spec: BackboneSpec) -> nn.Module:
    """Rebuild the pinned backbone of a heads-only save with its pretrained weights: a registered one as shipped,
    else a timm / torchvision download."""
    if spec.source == "custom":
        raise ValueError(
            f"This save holds only the heads, and its backbone is a custom {spec.name} module: rebuild it with the "
            "weights it was trained with and pass it as from_pretrained(..., backbone=module)."
        )
    registered = registered_pretrained(spec.pretrained_tag)
    if registered is not None:
        return registered.build()  # shipped, nothing to download
    if not spec.pretrained_tag:
        raise ValueError(
            f"This save holds only the heads, but its {spec.source}:{spec.name} backbone has no pretrained tag to "
            "rebuild it from; pass the backbone it was trained with as from_pretrained(..., backbone=module)."
        )
    try:
        return create_backbone(f"{spec.source}:{spec.name}", pretrained=spec.pretrained_tag, **spec.kwargs)
    except Exception as err:  # noqa: BLE001 - download errors come from timm, torch.hub, urllib, huggingface_hub
        raise OSError(
            f"This save holds only the heads; rebuilding its backbone {spec.source}:{spec.name} with the pretrained "
            f"weights {spec.pretrained_tag!r} needs network access (or those weights in the timm / torch cache) and "
            f"failed ({type(err).__name__}: {err}). Pass the backbone yourself: from_pretrained(..., "
            f"backbone=create_backbone('{spec.source}:{spec.name}', pretrained='{spec.pretrained_tag}'))."
        ) from err


def check_pinned(spec: BackboneSpec) -> None:
    """Raise a ValueError unless a heads-only save can rebuild the backbone with the same weights: a custom module
    (passed back when loading) or a timm / torchvision backbone with a pretrained tag."""
    if spec.source != "custom" and not spec.pretrained_tag:
        raise ValueError(
            f"heads_only=True needs a backbone that can be rebuilt with the same weights, but this "
            f"{spec.source}:{spec.name} backbone has no pretrained tag (random init, or weights loaded by hand): "
            "its weights exist only in this model. Save the full weights (heads_only=False), or build the "
            f"backbone with create_backbone('{spec.source}:{spec.name}', pretrained=TAG)."
        )


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and put the module in eval mode."""
    module.requires_grad_(False)
    module.eval()
    return module


__all__ = ["BackboneSpec", "create_backbone", "describe_backbone", "build_backbone", "freeze", "tag_backbone",
           "check_rebuild_spec", "REBUILD_KWARGS", "PretrainedBackbone", "register_pretrained", "registered_pretrained",
           "pretrained_backbone", "check_pinned"]
