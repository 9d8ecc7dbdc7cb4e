"""Run config: every error names its key path, values are type-checked, overrides land on the right key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmm_wrap.backbones import describe_backbone
from dmm_wrap.config import Attribute, HeadConfig
from dmm_wrap.apps.run_config import (OPTION_KEYS, ConfigError, RunConfig, apply_overrides, load_run_config,
                                 parse_override, read_yaml, write_run_config)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def error_of(values: dict) -> str:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(values)
    return str(info.value)


@pytest.mark.parametrize("name", ["synthetic_digits.yaml", "image_csv_example.yaml", "camelyon17.yaml",
                                  "hf_dataset_example.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_run_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig)


def test_defaults_and_sections() -> None:
    cfg = RunConfig.from_dict({})
    assert cfg.data.kind == "synthetic_digits" and cfg.data.batch_size == 128 and cfg.model.backbone == "digits"
    assert cfg.model.head == HeadConfig() and cfg.eval.mlp_hidden == (128, 128) and cfg.fit.max_steps is None


@pytest.mark.parametrize("values, message", [
    ({"fit": {"lrr": 0.1}}, "fit.lrr: unknown key; did you mean 'lr'?"),
    ({"fitt": {}}, "fitt: unknown key; did you mean 'fit'?"),
    ({"data": {"batchsize": 4}}, "data.batchsize: unknown key; did you mean 'batch_size'?"),
    ({"model": {"h_layer": 2}}, "model.h_layer: unknown key; did you mean 'h_layers'?"),
    ({"eval": {"tsne": 10}}, "eval.tsne"),
    ({"fit": {"zzz": 1}}, "fit.zzz: unknown key; valid keys: epochs"),
])
def test_unknown_keys_name_the_path(values: dict, message: str) -> None:
    assert message in error_of(values)


@pytest.mark.parametrize("values, message", [
    ({"fit": {"epochs": "ten"}}, "fit.epochs: expected int, got str 'ten'"),
    ({"fit": {"epochs": True}}, "fit.epochs: expected int, got bool True"),
    ({"fit": {"lr": "fast"}}, "fit.lr: expected float, got str 'fast'"),
    ({"fit": {"max_steps": 2.5}}, "fit.max_steps: expected int or None, got float 2.5"),
    ({"fit": {"amp_dtype": "bf16"}}, "fit.amp_dtype: expected one of 'bfloat16', 'float16' or None"),
    ({"model": {"pool": "mean"}}, "model.pool: expected one of 'avg', 'max', 'cls', 'flatten', got str 'mean'"),
    ({"model": {"standardize": "yes"}}, "model.standardize: expected bool, got str 'yes'"),
    ({"eval": {"mlp_hidden": [64, "x"]}}, "eval.mlp_hidden[1]: expected int, got str 'x'"),
    ({"eval": {"mlp_hidden": 64}}, "eval.mlp_hidden: expected a list, got int 64"),
    ({"data": {"kind": "mnist"}}, "data.kind: expected one of"),
    ({"output_dir": 3}, "output_dir: expected str, got int 3"),
    ({"fit": 3}, "fit: expected a mapping"),
])
def test_type_errors_name_the_path(values: dict, message: str) -> None:
    assert message in error_of(values)


@pytest.mark.parametrize("section, cls, key, value", [
    ("fit", "FitConfig", "max_steps", 2.5), ("fit", "FitConfig", "epochs", True), ("fit", "FitConfig", "lr", "fast"),
    ("fit", "FitConfig", "amp_dtype", "bf16"), ("model", "HeadConfig", "h_layers", True),
    ("model", "HeadConfig", "standardize", "yes"), ("fit", "FitConfig", "device", 3),
])
def test_yaml_and_dataclass_type_checks_agree(section: str, cls: str, key: str, value) -> None:
    """The YAML path and the dataclasses' own __post_init__ give the same message, under the key the user wrote."""
    from dmm_wrap import config

    with pytest.raises(ConfigError) as direct:
        getattr(config, cls)(**{key: value})
    assert str(direct.value).startswith(f"{cls}.{key}: expected ")
    assert error_of({section: {key: value}}) == str(direct.value).replace(f"{cls}.", f"{section}.")


def test_run_sections_check_their_own_types() -> None:
    from dmm_wrap.apps.run_config import DataConfig, ModelConfig

    with pytest.raises(ConfigError, match=r"^DataConfig\.batch_size: expected int, got str '8'\.$"):
        DataConfig(batch_size="8")
    with pytest.raises(ConfigError, match=r"^DataConfig\.num_workers: expected int, got bool True\.$"):
        DataConfig(num_workers=True)
    with pytest.raises(ConfigError, match=r"^ModelConfig\.head: expected HeadConfig, got dict"):
        ModelConfig(head={"h_layers": 2})
    with pytest.raises(ConfigError, match=r"^RunConfig\.num_threads: expected int or None, got float 2\.0\.$"):
        RunConfig(num_threads=2.0)


@pytest.mark.parametrize("values, key", [
    ({"fit": {"lam": 1.5}}, "fit.lam"),
    ({"model": {"h_layers": 0}}, "model.h_layers"),
    ({"eval": {"tsne_samples": -1}}, "eval.tsne_samples"),
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ({"data": {"num_val": -1}}, "data.num_val"),
    ({"data": {"kind": "image_csv", "root": "r", "csv": "a.csv", "test_csv": "b.csv"}}, "data.attributes"),
    ({"data": {"kind": "image_csv", "root": "r", "test_csv": "b.csv", "attributes": []}}, "data.csv"),
    ({"data": {"kind": "camelyon17"}}, "data.root"),
    ({"data": {"kind": "hf_dataset", "attributes": [{"name": "s", "kind": "continuous"}]}}, "data.dataset"),
    ({"data": {"kind": "hf_dataset", "dataset": "d"}}, "data.attributes"),
    ({"fit": {"ema_decay": 1.0}}, "fit.ema_decay"),
    ({"data": {"attributes": [{"name": "s", "kind": "continuous"}]}}, "data.attributes"),
    ({"data": {"kind": "image_csv", "root": "r", "csv": "a", "test_csv": "b",
               "attributes": [{"name": "s", "kind": "categorical"}]}}, "data.attributes[0]"),
    ({"model": {"backbone": "resnet18"}}, "model.backbone"),
    ({"model": {"backbone": "timm:resnet18", "weights": "w.safetensors"}}, "model.weights"),
])
def test_value_errors_name_the_key(values: dict, key: str) -> None:
    assert key in error_of(values)


@pytest.mark.parametrize("name", ["digits", "digits_label_free"])
def test_model_backbone_picks_the_shipped_digits_encoder(name: str) -> None:
    from dmm_wrap.apps.build import build_model
    from dmm_wrap.apps.pretrained import DIGITS_ENCODERS, DIGITS_IMAGE_SIZE
    from dmm_wrap.apps.digits import SYNTHETIC_ATTRIBUTES

    cfg = RunConfig.from_dict({"model": {"backbone": name}})
    assert cfg.model.digits_encoder and cfg.input_size() == DIGITS_IMAGE_SIZE
    model = build_model(cfg, SYNTHETIC_ATTRIBUTES)
    assert describe_backbone(model.backbone).pretrained_tag == DIGITS_ENCODERS[name].tag
    assert "'digits' or 'digits_label_free', 'timm:NAME'" in error_of({"model": {"backbone": "digitz"}})


def test_values_are_coerced() -> None:
    cfg = RunConfig.from_dict({
        "fit": {"lr": "1e-3", "lam": 1, "max_steps": None},  # PyYAML reads 1e-3 as a string
        "eval": {"mlp_hidden": [32]},
        "model": {"h_layers": 2, "out_dim": 16, "pretrained": False},
        "data": {"kind": "image_csv", "root": "r", "csv": "a", "test_csv": "b",
                 "attributes": [{"name": "site", "kind": "categorical", "num_classes": 3}]},
    })
    assert cfg.fit.lr == 1e-3 and isinstance(cfg.fit.lam, float) and cfg.eval.mlp_hidden == (32,)
    assert cfg.model.head.h_layers == 2 and cfg.model.head.out_dim == 16
    assert cfg.data.attributes == [Attribute("site", "categorical", 3)]


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("fit.lr=0.001") == ("fit.lr", 0.001)
    assert parse_override("fit.max_steps=null") == ("fit.max_steps", None)
    assert parse_override("eval.mlp_hidden=[64, 64]") == ("eval.mlp_hidden", [64, 64])
    assert parse_override("output_dir=a=b") == ("output_dir", "a=b")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("fit.lr")


def test_overrides_map_to_config_keys(tmp_path: Path) -> None:
    assert OPTION_KEYS == {"output_dir": "output_dir", "max_steps": "fit.max_steps", "device": "fit.device",
                           "resume": "fit.resume", "overwrite": "fit.overwrite_checkpoints"}
    path = tmp_path / "run.yaml"
    path.write_text("fit:\n  epochs: 3\n  lr: 0.01\nmodel:\n  h_layers: 2\n")
    cfg = load_run_config(path, [("output_dir", "out"), ("fit.max_steps", 5), ("fit.device", "cpu"),
                                 parse_override("fit.lr=0.002"), parse_override("model.out_dim=8"),
                                 parse_override("eval.leace=false")])
    assert cfg.output_dir == "out" and cfg.fit.max_steps == 5 and cfg.fit.device == "cpu"
    assert cfg.fit.lr == 0.002 and cfg.fit.epochs == 3 and cfg.model.head.out_dim == 8 and cfg.model.head.h_layers == 2
    assert cfg.eval.leace is False
    assert read_yaml(path)["fit"]["lr"] == 0.01  # the file's mapping is not modified


def test_bad_overrides_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\n")
    with pytest.raises(ConfigError, match=r"^fit\.lrr: unknown key; did you mean 'lr'\?"):
        load_run_config(path, [parse_override("fit.lrr=1")])
    with pytest.raises(ConfigError, match=r"^fit\.epochs: expected int, got str 'ten'"):
        load_run_config(path, [parse_override("fit.epochs=ten")])
    with pytest.raises(ConfigError, match="output_dir: expected a mapping"):
        apply_overrides({"output_dir": "out"}, [("output_dir.x", 1)])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_run_config(bad)
    assert load_run_config(_write(tmp_path / "empty.yaml", "")) == RunConfig()


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_run_config(CONFIGS / "synthetic_digits.yaml", [("fit.max_steps", 7), ("model.out_dim", 12)])
    written = write_run_config(cfg, tmp_path / "config.yaml")
    assert "head" not in read_yaml(written)["model"]  # head keys are written flat, as they are read
    assert load_run_config(written) == cfg


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_alignment_head_section_defaults_are_fit_alignment_heads() -> None:
    """The run file's alignment_head section mirrors fit_alignment_head's keyword arguments: same names, same defaults
    (seed comes from the run's seed), so the CLI and the API fit the same head unless told otherwise."""
    import dataclasses
    import inspect

    from dmm_wrap import DebiasedEncoder
    from dmm_wrap.apps.run_config import AlignHeadConfig

    params = inspect.signature(DebiasedEncoder.fit_alignment_head).parameters
    section = {f.name: f.default for f in dataclasses.fields(AlignHeadConfig)}
    assert set(section) == set(params) - {"self", "loader", "seed"}
    assert all(section[name] == params[name].default for name in section), section
