"""A zoo of timm / torchvision / custom backbones with non-default heads and input sizes, each wrapped at a natural
layer: a short fit, save -> load without backbone= (identical outputs), torch.export of the encoder and of its
hook-free module, no hook left on the user's model, and deterministic eval outputs. Random init only, so nothing is
downloaded."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import timm
import torch
import torchvision
from torch import nn

from conftest import loader_of
from dmm_wrap import Attribute, DebiasedEncoder, create_backbone

SITE = [Attribute("site", "categorical", 3)]


class SmallCNN(nn.Module):
    """A user's own module: rebuilt by the caller (backbone=) when loading."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class Case(NamedTuple):
    """One zoo entry: how a user builds the backbone, where it is hooked, and the input it takes."""

    build: Callable[[], nn.Module]
    """Builds the backbone with random weights, as a user would (timm.create_model, a torchvision builder, ...)."""
    layer: str | None
    """The hooked layer."""
    pool: str
    """How the hooked output becomes [N, D]."""
    input_size: tuple[int, ...]
    """One input without the batch dimension."""
    custom: bool = False
    """A user's module: `from_pretrained` needs it back as backbone=."""


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def _named(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: create_backbone(name, **kwargs)  # records shape arguments timm cannot read back (depth, ...)


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(**kwargs)


ZOO = {
    "timm-resnet": Case(_timm("test_resnet", num_classes=7), "layer3", "avg", (3, 32, 32)),
    "timm-resnet-maxpool-pre-logits": Case(_timm("test_resnet", num_classes=7, global_pool="max"), "global_pool",
                                           "avg", (3, 32, 32)),
    "timm-convnext-1ch": Case(_timm("test_convnext", num_classes=7, in_chans=1), "stages.1", "avg", (1, 32, 32)),
    "timm-efficientnet": Case(_timm("test_efficientnet", num_classes=7), "blocks.3", "max", (3, 32, 32)),
    "timm-nfnet": Case(_timm("test_nfnet", num_classes=7), "stages.1", "avg", (3, 32, 32)),
    "timm-vit-tokens": Case(_timm("test_vit", num_classes=7, img_size=32), "blocks.1", "cls", (3, 32, 32)),
    "timm-vit-avgpool-fc-norm": Case(_timm("test_vit", num_classes=0, img_size=32, global_pool="avg"), "fc_norm",
                                     "avg", (3, 32, 32)),
    "timm-deit-distilled": Case(_named("timm:deit_tiny_distilled_patch16_224", num_classes=7, img_size=32, depth=2),
                                "norm", "cls", (3, 32, 32)),
    "timm-swin-pooled": Case(_named("timm:swin_tiny_patch4_window7_224", num_classes=7, img_size=56, embed_dim=16,
                                    depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2)), "head.global_pool", "avg",
                             (3, 56, 56)),
    "timm-swin-stage-nhwc": Case(_named("timm:swin_tiny_patch4_window7_224", num_classes=7, img_size=56, embed_dim=16,
                                        depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2)), "layers.1", "avg", (3, 56, 56)),
    "timm-maxvit": Case(_timm("test_maxvit", num_classes=7, img_size=32), "stages.1", "avg", (3, 32, 32)),
    "timm-coatnet": Case(_timm("test_coatnet", num_classes=7, img_size=64), "stages.2", "avg", (3, 64, 64)),
    "tv-resnet18": Case(_tv("resnet18", num_classes=2), "layer3", "avg", (3, 32, 32)),
    "tv-efficientnet_b0": Case(_tv("efficientnet_b0", num_classes=5), "features.4", "avg", (3, 32, 32)),
    "tv-mobilenet_v3_small": Case(_tv("mobilenet_v3_small", num_classes=3), "avgpool", "avg", (3, 32, 32)),
    "tv-regnet_y_400mf": Case(_tv("regnet_y_400mf"), "trunk_output.block2", "avg", (3, 32, 32)),
    "tv-densenet121": Case(_tv("densenet121", num_classes=4), "features.transition1", "avg", (3, 32, 32)),
    "custom-cnn": Case(SmallCNN, "block", "avg", (3, 16, 16), custom=True),
}


def _hooks_left(module: nn.Module) -> list[str]:
    """Every hook still registered on `module` or a submodule (none should outlive a fit or a forward)."""
    return [f"{name or '<root>'}.{kind}" for name, m in module.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks") if getattr(m, kind)]


def _output(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc(x)


@pytest.mark.parametrize("case_id", list(ZOO))
def test_zoo_fit_save_load_export(case_id: str, tmp_path) -> None:
    case = ZOO[case_id]
    torch.manual_seed(0)
    backbone = case.build()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, *case.input_size, generator=g)
    site = torch.randint(0, 3, (16,), generator=g)
    x[:, 0] += site.float()[:, None, None]  # the attribute leaks into the input

    enc = DebiasedEncoder(backbone, case.layer, SITE, pool=case.pool, input_size=case.input_size,
                          h_hidden=32, out_dim=16, m_hidden=16, q_hidden=16)
    heads_before = {k: v.clone() for k, v in enc.heads.state_dict().items()}
    history = enc.fit(loader_of(x, site.float()[:, None], batch_size=8), epochs=1, progress=False)
    assert history.steps_done == 2
    assert any(not torch.equal(v, heads_before[k]) for k, v in enc.heads.state_dict().items())  # it trained
    assert _hooks_left(backbone) == []

    enc.eval()
    out = _output(enc, x)
    assert out.shape == (16, 16) and torch.isfinite(out).all()
    assert torch.equal(out, _output(enc, x))  # deterministic in eval
    assert _hooks_left(backbone) == []

    enc.save_pretrained(tmp_path / "m")
    if case.custom:
        with pytest.raises(ValueError, match=r"custom backbone \(SmallCNN\).*backbone=module"):
            DebiasedEncoder.from_pretrained(tmp_path / "m")
        torch.manual_seed(123)
        loaded = DebiasedEncoder.from_pretrained(tmp_path / "m", backbone=SmallCNN())
    else:
        loaded = DebiasedEncoder.from_pretrained(tmp_path / "m")
        assert type(loaded.backbone) is type(backbone)
        assert loaded.backbone_spec == enc.backbone_spec
    assert torch.equal(_output(loaded, x), out)
    assert _hooks_left(loaded.backbone) == []

    program = torch.export.export(enc.inference_module(), (x[:2],))
    assert torch.allclose(program.module()(x[:2]), out[:2], rtol=1e-4, atol=1e-5)
    program = torch.export.export(enc, (x[:2],))  # the encoder itself, as users hold it
    assert torch.allclose(program.module()(x[:2]), out[:2], rtol=1e-4, atol=1e-5)
    assert _hooks_left(backbone) == []
