"""Bad input raises a clear error and changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import loader_of, make_site_problem
from dmm_wrap import Attribute, DebiasedEncoder, FitConfig, HeadConfig, create_backbone

SITE = [Attribute("site", "categorical", 3)]


def _enc() -> DebiasedEncoder:
    torch.manual_seed(0)
    return DebiasedEncoder(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32)), None, SITE, input_size=(16,))


def _heads_state(enc: DebiasedEncoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in enc.heads.state_dict().items()}


def _assert_unchanged(enc: DebiasedEncoder, before: dict[str, torch.Tensor]) -> None:
    for k, v in enc.heads.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unknown_layer_names_closest() -> None:
    with pytest.raises(ValueError, match=r"'layer3'.*Closest names: \['layer3'|layer3\.0"):
        DebiasedEncoder(create_backbone("torchvision:resnet18"), "layer_3", SITE)


def test_attribute_declarations() -> None:
    with pytest.raises(ValueError, match="num_classes >= 2"):
        Attribute("site", "categorical")
    with pytest.raises(ValueError, match="must be one of"):
        Attribute("site", "ordinal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes must be None"):
        Attribute("rot", "continuous", 3)
    with pytest.raises(ValueError, match="unique"):
        DebiasedEncoder(nn.Linear(4, 4), None, [Attribute("a", "continuous"), Attribute("a", "continuous")])
    with pytest.raises(ValueError, match="at least one attribute"):
        DebiasedEncoder(nn.Linear(4, 4), None, [])


def test_unknown_options_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"head\.h_layer\b.*h_layers"):
        DebiasedEncoder(nn.Linear(4, 4), None, SITE, h_layer=3)
    with pytest.raises(ValueError, match=r"fit\.learning_rate"):
        _enc().fit([], learning_rate=1.0)
    with pytest.raises(ValueError, match="lam must lie in"):
        FitConfig(lam=1.5)
    with pytest.raises(ValueError, match="logvar_min"):
        HeadConfig(logvar_min=3, logvar_max=1)


@pytest.mark.parametrize("attrs,match", [
    (torch.zeros(128, 2), r"shape \[128, 1\]"),
    (torch.full((128, 1), 3.0), r"class ids in 0\.\.2, got 3\.0"),
    (torch.full((128, 1), 0.5), "class ids"),
    (torch.full((128, 1), float("nan")), "NaN"),
])
def test_bad_attrs_change_nothing(attrs: torch.Tensor, match: str) -> None:
    enc = _enc()
    x, _, s = make_site_problem(512, 0)
    good = [(x[:128], s[:128].float()[:, None]), (x[128:256], s[128:256].float()[:, None])]
    before = _heads_state(enc)
    with pytest.raises(ValueError, match=match):
        enc.fit(good + [(x[256:384], attrs)], epochs=1, progress=False, stats_batches=2)
    _assert_unchanged(enc, before)  # the two good batches' updates were rolled back


def test_dict_attrs_with_wrong_keys() -> None:
    x, _, s = make_site_problem(128, 0)
    with pytest.raises(ValueError, match=r"keys \['hospital'\] do not match the declared attributes \['site'\]"):
        _enc().fit([(x, {"hospital": s})], progress=False)


def test_nan_inputs_name_the_batch() -> None:
    enc = _enc()
    x, _, s = make_site_problem(384, 0)
    x[300] = float("nan")
    before = _heads_state(enc)
    with pytest.raises(ValueError, match="Batch 2: the backbone produced NaN"):
        enc.fit(loader_of(x, s.float()[:, None], shuffle=False), epochs=1, progress=False, stats_batches=2)
    _assert_unchanged(enc, before)


def test_empty_loader() -> None:
    with pytest.raises(ValueError, match="loader is empty"):
        _enc().fit([], progress=False)
    lazy = DebiasedEncoder(nn.Linear(16, 8), None, SITE)
    with pytest.raises(ValueError, match="loader is empty"):
        lazy.fit([], progress=False)
    assert lazy.heads is None


def test_bad_batch_structure() -> None:
    with pytest.raises(TypeError, match=r"expected \(inputs, attrs\)"):
        _enc().fit([torch.randn(4, 16)], progress=False)


def test_forward_before_heads_exist() -> None:
    with pytest.raises(RuntimeError, match="call fit"):
        DebiasedEncoder(nn.Linear(16, 8), None, SITE)(torch.randn(2, 16))


def test_load_errors(tmp_path) -> None:
    enc = _enc()
    enc.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="custom backbone"):
        DebiasedEncoder.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"unexpected keys \['extractor\.backbone\.2\.bias'\]"):
        DebiasedEncoder.from_pretrained(tmp_path / "m", backbone=nn.Sequential(nn.Linear(16, 32), nn.ReLU(),
                                                                               nn.Linear(32, 32, bias=False)))
    with pytest.raises(FileNotFoundError):
        DebiasedEncoder.from_pretrained(tmp_path / "nowhere")


def test_weights_from_another_save_are_refused(tmp_path) -> None:
    import shutil

    enc = _enc()
    enc.save_pretrained(tmp_path / "a")
    x, _, s = make_site_problem(256, 0)
    enc.fit(loader_of(x, s.float()[:, None]), epochs=1, progress=False)
    enc.save_pretrained(tmp_path / "b")
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
    DebiasedEncoder.from_pretrained(tmp_path / "b", backbone=backbone)  # control: a matching pair loads
    shutil.copy(tmp_path / "b/model.safetensors", tmp_path / "a/model.safetensors")  # same shapes, other save
    with pytest.raises(ValueError, match="does not belong to the config.json"):
        DebiasedEncoder.from_pretrained(tmp_path / "a", backbone=backbone)
