"""Frozen backbones: build timm / torchvision models by name and describe any module so it can be rebuilt."""

from __future__ import annotations

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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        return cls(source=d["source"], name=d.get("name"), pretrained_tag=d.get("pretrained_tag"),
                   kwargs=dict(d.get("kwargs") or {}))


def create_backbone(name: str, pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    """Build a timm or torchvision model from "timm:ARCH" or "torchvision:ARCH" and tag it for rebuilding.

    Args:
        name: "timm:resnet18", "torchvision:resnet18", or a bare name (tried in timm, then torchvision).
        pretrained: False for random init; True or a weights tag to download pretrained weights (needs network).
        **kwargs: passed to `timm.create_model` / `torchvision.models.get_model`.

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
            return tag_backbone(model, BackboneSpec("timm", arch, spec_tag, kwargs))
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
    return tag_backbone(model, BackboneSpec("torchvision", arch, tag, kwargs))


def tag_backbone(module: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Attach a rebuild spec to `module` (used by `describe_backbone`)."""
    object.__setattr__(module, _SPEC_ATTR, spec)
    return module


def describe_backbone(module: nn.Module) -> BackboneSpec:
    """Return the spec that rebuilds `module`'s architecture: its tag, a timm config, a torchvision match, or custom."""
    spec = getattr(module, _SPEC_ATTR, None)
    if isinstance(spec, BackboneSpec):
        return spec
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return BackboneSpec("timm", cfg["architecture"], None, {})
    if type(module).__module__.startswith("torchvision.models"):
        name = _match_torchvision(module)
        if name is not None:
            return BackboneSpec("torchvision", name, None, {})
    return BackboneSpec("custom", type(module).__name__, None, {})


def _match_torchvision(module: nn.Module) -> str | None:
    """Find the torchvision builder whose model has this module's class and parameter shapes (built on 'meta')."""
    import torchvision

    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        if builder.__module__ != type(module).__module__:
            continue
        try:
            with torch.device("meta"):
                candidate = builder(weights=None)
        except Exception:  # noqa: BLE001 - builders with required kwargs simply don't match
            continue
        if type(candidate) is type(module) and {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return name
    return None


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """Rebuild a timm / torchvision architecture with random weights (they are loaded from the checkpoint)."""
    if spec.source == "custom":
        raise ValueError(
            f"This model was trained on a custom backbone ({spec.name}); rebuild it yourself and pass it "
            "with from_pretrained(..., backbone=module)."
        )
    return create_backbone(f"{spec.source}:{spec.name}", pretrained=False, **spec.kwargs)


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and put the module in eval mode."""
    module.requires_grad_(False)
    module.eval()
    return module


__all__ = ["BackboneSpec", "create_backbone", "describe_backbone", "build_backbone", "freeze", "tag_backbone"]
