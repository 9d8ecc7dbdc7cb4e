"""Inference in pipelines: preprocessing, batched embedding, and compile / torch.export / ONNX parity with eager."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from dmm_wrap import Attribute, DebiasedEncoder, create_backbone
from dmm_wrap.inference import InferenceModule, Preprocessing

SITE = [Attribute("site", "categorical", 3)]


def _eager(enc: DebiasedEncoder | nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc(x)


def _with_trained_stats(enc: DebiasedEncoder) -> DebiasedEncoder:
    """Give the heads non-trivial standardisation statistics, as a fit would, so parity covers them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        enc.heads.feature_mean.copy_(torch.randn(enc.feature_dim, generator=g))
        enc.heads.feature_std.copy_(torch.rand(enc.feature_dim, generator=g) + 0.5)
    return enc.eval()


@pytest.fixture(scope="module", params=["avgpool", "layer3"])
def resnet(request) -> DebiasedEncoder:
    torch.manual_seed(0)
    return _with_trained_stats(DebiasedEncoder(create_backbone("torchvision:resnet18"), request.param, SITE,
                                               input_size=(3, 32, 32)))


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# --------------------------------------------------------------------------- hook-free graph
def test_inference_module_is_hook_free_truncated_and_equal(resnet: DebiasedEncoder) -> None:
    x = torch.randn(3, 3, 32, 32)
    module = resnet.inference_module()
    assert isinstance(module, InferenceModule) and not module.training
    fc_calls = _count_calls(resnet.backbone.fc)
    out = _eager(module, x)
    assert torch.equal(out, _eager(resnet, x))
    assert fc_calls[0] == 0 and not hasattr(module.trunk, "fc")  # layers after the hooked one are gone
    assert all(not m._forward_hooks for name, m in module.trunk.named_modules() if name != "")


def test_torch_export_matches_eager(resnet: DebiasedEncoder) -> None:
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(resnet.inference_module(), (x,))
    x_new = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(program.module()(x_new), _eager(resnet, x_new), rtol=0, atol=1e-5)


def test_timm_vit_block_exports(tmp_path) -> None:
    torch.manual_seed(0)
    enc = _with_trained_stats(DebiasedEncoder(timm.create_model("test_vit", pretrained=False), "blocks.0", SITE,
                                              pool="cls", input_size=(3, 160, 160)))
    x = torch.randn(2, 3, 160, 160)
    module = enc.inference_module()
    assert not hasattr(module.trunk.blocks, "1") and not hasattr(module.trunk, "head")  # truncated after blocks.0
    blocks_after = _count_calls(enc.backbone.blocks[-1])
    torch.testing.assert_close(_eager(module, x), _eager(enc, x), rtol=0, atol=1e-5)
    program = torch.export.export(module, (x,))
    torch.testing.assert_close(program.module()(x), _eager(enc, x), rtol=0, atol=1e-5)
    assert blocks_after[0] == 0


def test_onnx_export_matches_eager_with_dynamic_batch(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort  # in the test extra: the parity check must run, not skip
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    enc = _with_trained_stats(DebiasedEncoder(create_backbone("torchvision:resnet18"), "layer2", SITE,
                                              input_size=(3, 32, 32)))
    path = enc.export_onnx(tmp_path / "enc.onnx", torch.randn(2, 3, 32, 32))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    reference = ReferenceEvaluator(model)
    runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in runtime.get_inputs()] == ["inputs"] and runtime.get_outputs()[0].name == "z_tilde"
    for n in (1, 3):  # the batch size is symbolic
        x = torch.randn(n, 3, 32, 32)
        expected = _eager(enc, x)
        (out,) = reference.run(None, {"inputs": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=0, atol=1e-5)
        (out,) = runtime.run(None, {"inputs": x.numpy()})  # the runtime deployments use, not only the spec
        assert out.shape == (n, enc.heads.out_dim)
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=0, atol=1e-5)


def _vit() -> DebiasedEncoder:
    torch.manual_seed(0)
    return _with_trained_stats(DebiasedEncoder(timm.create_model("test_vit", pretrained=False), "blocks.0", SITE,
                                               pool="cls", input_size=(3, 160, 160)))


def _resnet64() -> DebiasedEncoder:
    torch.manual_seed(0)
    return _with_trained_stats(DebiasedEncoder(create_backbone("torchvision:resnet18"), "layer3", SITE,
                                               input_size=(3, 64, 64)))


@pytest.mark.parametrize("build,size", [(_resnet64, 64), (_vit, 160)], ids=["resnet18", "timm_vit"])
def test_encoder_itself_exports_and_compiles_as_one_graph(build, size: int) -> None:
    enc = build()
    x, x_new = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
    program = torch.export.export(enc, (x,))
    torch.testing.assert_close(program.module()(x_new), _eager(enc, x_new), rtol=0, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(_eager(compiled, x_new), _eager(enc, x_new), rtol=0, atol=1e-5)
    assert not enc.heads.training and all(not m._forward_hooks for m in enc.backbone.modules())


def test_untraceable_layer_gives_a_clear_error() -> None:
    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x  # data-dependent control flow: torch.fx cannot trace it

    enc = DebiasedEncoder(nn.Sequential(nn.Linear(8, 8), Gate(), nn.Linear(8, 8)), "2", SITE, input_size=(8,))
    with pytest.raises(ValueError, match=r"up to layer '2': torch\.fx could not trace it"):
        enc.inference_module()
    assert _eager(enc, torch.randn(2, 8)).shape == (2, 8)  # the hooked eager path is unaffected


# --------------------------------------------------------------------------- torch.compile
def test_torch_compile_matches_eager() -> None:
    torch.manual_seed(0)
    enc = _with_trained_stats(DebiasedEncoder(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)), "1",
                                              SITE, input_size=(8,)))
    x = torch.randn(5, 8)
    expected = _eager(enc, x)
    torch._dynamo.reset()
    # Under compile the encoder takes its hook-free path, so it is one graph too.
    torch.testing.assert_close(_eager(torch.compile(enc, fullgraph=True), x), expected, rtol=0, atol=1e-5)
    full = torch.compile(enc.inference_module(), fullgraph=True)
    torch.testing.assert_close(_eager(full, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("resnet", ["layer3"], indirect=True)
def test_resnet_inference_module_compiles_as_one_graph(resnet: DebiasedEncoder) -> None:
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(resnet.inference_module(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(_eager(compiled, x), _eager(resnet, x), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- preprocessing and embed
def _images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for w, h in sizes]


def test_preprocess_and_embed_pil_images() -> None:
    from timm.data import create_transform

    torch.manual_seed(0)
    enc = _with_trained_stats(DebiasedEncoder(create_backbone("torchvision:resnet18"), "layer2", SITE,
                                              input_size=(3, 32, 32)))
    images = _images([(40, 50), (64, 64), (33, 80), (32, 32), (90, 45)])
    reference = create_transform(input_size=(3, 32, 32), interpolation="bilinear", crop_pct=0.875,
                                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = torch.stack([enc.preprocess(img) for img in images])
    assert pixels.shape == (5, 3, 32, 32)
    assert torch.equal(pixels, torch.stack([reference(img) for img in images]))
    z = enc.embed(images, batch_size=2)
    assert z.shape == (5, enc.heads.out_dim) and z.device.type == "cpu" and not z.requires_grad
    torch.testing.assert_close(z, _eager(enc, pixels), rtol=0, atol=1e-5)
    torch.testing.assert_close(enc.embed(pixels, batch_size=5), z, rtol=0, atol=1e-5)
    assert enc.embed(iter([])).shape == (0, enc.heads.out_dim)


def test_custom_backbone_preprocessing_is_set_by_the_user() -> None:
    def backbone() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 8))

    enc = DebiasedEncoder(backbone(), None, SITE, input_size=(3, 4, 4))
    with pytest.raises(ValueError, match="records no preprocessing"):
        enc.embed(_images([(4, 4)]))
    enc.preprocessing = {"input_size": (3, 4, 4), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    assert enc.embed(_images([(4, 4), (8, 6)])).shape == (2, 8)
    own = Preprocessing((3, 4, 4), (0.2, 0.3, 0.4), (2.0, 2.0, 2.0), "nearest", 1.0, "squash")
    enc = DebiasedEncoder(backbone(), None, SITE, input_size=(3, 4, 4), preprocessing=own)
    pixels = enc.preprocess(_images([(8, 6)])[0])
    assert enc.preprocessing == own and pixels.shape == (3, 4, 4)
