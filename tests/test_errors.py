"""Bad input raises a clear error and changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import loader_of, make_site_problem
from dmm_wrap import Attribute, DebiasedEncoder, FitConfig, HeadConfig, create_backbone
from dmm_wrap.config import ConfigError

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
    with pytest.raises(ValueError, match=r"^Layer 'layer_3' is not a module of ResNet\. Closest names: \['layer3', "):
        DebiasedEncoder(create_backbone("torchvision:resnet18"), "layer_3", SITE)


def test_attribute_declarations() -> None:
    with pytest.raises(ValueError, match="num_classes >= 2"):
        Attribute("site", "categorical")
    with pytest.raises(ValueError, match=r"Attribute\.kind: expected one of 'categorical', 'continuous', got str"):
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


def test_config_types_are_checked_naming_field_type_and_value() -> None:
    with pytest.raises(ConfigError, match=r"^FitConfig\.lr: expected float, got str '1e-3'\.$"):
        FitConfig(lr="1e-3")
    with pytest.raises(ConfigError, match=r"^HeadConfig\.h_layers: expected int, got bool True\.$"):
        HeadConfig(h_layers=True)
    with pytest.raises(ConfigError, match=r"^FitConfig\.max_steps: expected int or None, got float 2\.0\.$"):
        FitConfig(max_steps=2.0)
    with pytest.raises(ConfigError, match=r"^FitConfig\.lam: expected float, got bool False\.$"):
        FitConfig(lam=False)
    with pytest.raises(ConfigError, match=r"^FitConfig\.amp_dtype: expected one of 'bfloat16', 'float16' or None, "
                                          r"got str 'fp16'\.$"):
        FitConfig(amp_dtype="fp16")
    with pytest.raises(ConfigError, match=r"^Attribute\.num_classes: expected int or None, got float 3\.0\.$"):
        Attribute("site", "categorical", 3.0)
    with pytest.raises(ConfigError, match=r"^HeadConfig\.residual: expected bool, got int 1\.$"):
        HeadConfig(residual=1)
    with pytest.raises(ConfigError, match=r"^fit\.lr: expected float, got str '1e-3'"):  # fit(**options) says so too
        _enc().fit([], lr="1e-3")
    # Control: ints are numbers, None fills Optional fields, and the checked values still build.
    assert FitConfig(lr=1, lam=0, max_steps=None, grad_clip=None).lr == 1
    assert HeadConfig(logvar_min=-5, h_hidden=None).logvar_min == -5


@pytest.mark.parametrize("cls, required", [(FitConfig, {}), (HeadConfig, {}),
                                           (Attribute, {"name": "site", "kind": "categorical", "num_classes": 3})])
def test_every_config_field_is_type_checked(cls, required: dict) -> None:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{f.name}: expected .*, got bytes b'x'"):
            cls(**{**required, f.name: b"x"})
        if int in typing.get_args(hints[f.name]) + (hints[f.name],) or float in typing.get_args(hints[f.name]) + (
                hints[f.name],):  # numbers: a bool is refused, though Python counts it as an int
            with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{f.name}: expected .*, got bool True"):
                cls(**{**required, f.name: True})


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
