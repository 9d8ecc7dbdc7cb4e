"""Hooks on real architectures (random init): pooled shapes, tuple outputs, early exit, no leftover hooks."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from dmm_wrap import Attribute, DebiasedEncoder, create_backbone
from dmm_wrap.hooks import FeatureExtractor, pool

ATTRS = [Attribute("site", "categorical", 3)]


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_torchvision_resnet18_avgpool_pooled_and_fc_skipped() -> None:
    backbone = create_backbone("torchvision:resnet18")
    fc_calls = _count_calls(backbone.fc)
    enc = DebiasedEncoder(backbone, "avgpool", ATTRS, input_size=(3, 32, 32))
    assert enc.feature_dim == 512
    z = enc.features(torch.randn(4, 3, 32, 32))
    assert z.shape == (4, 512)
    assert fc_calls[0] == 0  # early exit: the classifier after the hooked layer never ran
    assert backbone.avgpool._forward_hooks == {}  # the temporary hook is gone
    full = backbone(torch.randn(2, 3, 32, 32))
    assert full.shape == (2, 1000) and fc_calls[0] == 1  # the control: a plain forward does reach it


def test_resnet_inner_layer_map_is_average_pooled() -> None:
    backbone = create_backbone("torchvision:resnet18")
    layer4_calls = _count_calls(backbone.layer4)
    x = torch.randn(3, 3, 64, 64)
    ext = FeatureExtractor(backbone.eval(), "layer3", "avg")
    with torch.no_grad():
        z = ext(x)
        ref = nn.Sequential(*list(backbone.children())[:7])(x).mean((2, 3))
    assert z.shape == (3, 256)
    assert torch.equal(z, ref)
    assert layer4_calls[0] == 0


@pytest.mark.parametrize("how,dim", [("avg", 64), ("cls", 64)])
def test_timm_vit_token_layer(how: str, dim: int) -> None:
    backbone = timm.create_model("test_vit", pretrained=False)
    head_calls = _count_calls(backbone.head)
    last_block = _count_calls(backbone.blocks[-1])
    enc = DebiasedEncoder(backbone, "blocks.0", ATTRS, pool=how, input_size=(3, 160, 160))
    x = torch.randn(2, 3, 160, 160)
    z = enc.features(x)
    assert z.shape == (2, enc.feature_dim)
    tokens = {}
    handle = backbone.blocks[0].register_forward_hook(lambda m, i, o: tokens.setdefault("t", o))
    with torch.no_grad():
        backbone(x)
    handle.remove()
    assert tokens["t"].dim() == 3
    expected = tokens["t"][:, 0] if how == "cls" else tokens["t"].mean(1)
    assert torch.allclose(z, expected, atol=1e-6)
    assert head_calls[0] == 1 and last_block[0] == 1  # only the control forward reached them


def test_custom_sequential_early_exit() -> None:
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    calls = _count_calls(backbone[2])
    enc = DebiasedEncoder(backbone, "1", ATTRS, input_size=(4,))
    x = torch.randn(5, 4)
    assert enc.feature_dim == 8
    assert torch.equal(enc.features(x), torch.relu(backbone[0](x)).detach())
    assert calls[0] == 0


def test_tuple_output_uses_first_tensor() -> None:
    class TupleOut(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x

    backbone = nn.Sequential(nn.Linear(4, 8), TupleOut())
    enc = DebiasedEncoder(backbone, "1", ATTRS, input_size=(4,))
    x = torch.randn(5, 4)
    assert torch.equal(enc.features(x), backbone[0](x).detach() * 2)


def test_pool_shapes() -> None:
    assert pool(torch.randn(2, 3, 4, 5), "avg").shape == (2, 3)
    assert pool(torch.randn(2, 3, 4, 5), "max").shape == (2, 3)
    assert pool(torch.randn(2, 3, 4, 5), "flatten").shape == (2, 60)
    assert pool(torch.randn(2, 7, 6), "cls").shape == (2, 6)
    with pytest.raises(ValueError, match="token sequence"):
        pool(torch.randn(2, 3, 4, 5), "cls")
