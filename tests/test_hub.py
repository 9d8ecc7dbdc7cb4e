"""Hub IO offline: save -> load through a folder and a populated HF cache, push with a fake HfApi, bad files."""

from __future__ import annotations

import copy
import fnmatch
import io
import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import loader_of
from dmm_wrap import Attribute, DebiasedEncoder, create_backbone
from dmm_wrap.backbones import BackboneSpec, build_backbone, describe_backbone, tag_backbone
from dmm_wrap.io.hub import push_folder_to_hub
from dmm_wrap.inference import Preprocessing

SITE = [Attribute("site", "categorical", 3)]
SHA = "0123456789abcdef0123456789abcdef01234567"
SECRET = "hf_secretTOKEN0123456789abcdef"
MODEL_FILES = {"config.json", "model.safetensors", "README.md"}


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))


@pytest.fixture(scope="module")
def trained() -> tuple[DebiasedEncoder, torch.Tensor, torch.Tensor]:
    """A tiny encoder after a short fit, the probe inputs, and its outputs before the fit (the control)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    site = torch.randint(0, 3, (256,), generator=g)
    x[:, 0] += site.float()
    enc = DebiasedEncoder(_mlp(), None, SITE, input_size=(8,))
    before = enc(x).detach()
    enc.fit(loader_of(x, site.float()[:, None], batch_size=128), epochs=2, progress=False)
    return enc, x, before


def _output(enc: DebiasedEncoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc(x)


def _populate_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay out a Hugging Face cache entry as snapshot_download leaves it (refs/main -> snapshots/<sha>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / SHA).mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy(folder / name, repo / "snapshots" / SHA / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)


# --------------------------------------------------------------------------- round trips
def test_local_round_trip_identical_after_fit(trained, tmp_path) -> None:
    enc, x, before = trained
    after = _output(enc, x)
    assert not torch.allclose(before, after)  # control: the fit changed the outputs
    enc.save_pretrained(tmp_path / "m")
    assert MODEL_FILES <= {p.name for p in (tmp_path / "m").iterdir()}
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "m", backbone=_mlp(seed=1))
    assert torch.equal(_output(loaded, x), after)
    assert loaded.attributes == enc.attributes and not loaded.training


@pytest.mark.parametrize("offline", ["env", "local_files_only"])
def test_repo_id_loads_from_offline_cache(trained, tmp_path, monkeypatch, offline: str) -> None:
    enc, x, _ = trained
    enc.save_pretrained(tmp_path / "m")
    _populate_cache(tmp_path / "cache", "org/debiased-mlp", tmp_path / "m")

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(HfApi, "repo_info", no_network)
    monkeypatch.setattr(HfApi, "list_repo_tree", no_network)
    if offline == "env":  # set after import: huggingface_hub read it at import time, dmm_wrap reads it again
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs = {"local_files_only": True} if offline == "local_files_only" else {}
    loaded = DebiasedEncoder.from_pretrained("org/debiased-mlp", cache_dir=tmp_path / "cache", backbone=_mlp(1),
                                             **kwargs)
    assert torch.equal(_output(loaded, x), _output(enc, x))
    by_sha = DebiasedEncoder.from_pretrained("org/debiased-mlp", revision=SHA, cache_dir=tmp_path / "cache",
                                             backbone=_mlp(1), **kwargs)
    assert torch.equal(_output(by_sha, x), _output(enc, x))
    with pytest.raises(FileNotFoundError, match=r"'org/missing' is not a local folder.*not in the cache.*offline"):
        DebiasedEncoder.from_pretrained("org/missing", cache_dir=tmp_path / "cache", **kwargs)


def test_hub_constant_offline_is_honoured(trained, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        DebiasedEncoder.from_pretrained("org/never-downloaded", cache_dir=tmp_path / "cache")


def test_paths_are_never_repo_ids(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder written by save_pretrained"):
        DebiasedEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a valid Hub repo id"):
        DebiasedEncoder.from_pretrained("runs//not a repo")


# --------------------------------------------------------------------------- config and card
def test_config_records_backbone_layer_heads_and_preprocessing(tmp_path) -> None:
    backbone = tag_backbone(create_backbone("torchvision:resnet18"),
                            BackboneSpec("torchvision", "resnet18", "ResNet18_Weights.IMAGENET1K_V1", {}))
    enc = DebiasedEncoder(backbone, "layer3", SITE, input_size=(3, 32, 32), out_dim=32)
    enc.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    assert config["model_type"] == "dmm_wrap.DebiasedEncoder" and config["format_version"] == 1
    assert config["backbone"] == {"source": "torchvision", "name": "resnet18",
                                  "pretrained_tag": "ResNet18_Weights.IMAGENET1K_V1", "kwargs": {}}
    assert (config["layer"], config["pool"], config["feature_dim"], config["out_dim"]) == ("layer3", "avg", 256, 32)
    assert config["attributes"] == [{"name": "site", "kind": "categorical", "num_classes": 3}]
    assert config["weights"] == "full"
    # the weights enum's eval transform (resize 256, crop 224) at the encoder's input size
    assert config["preprocessing"] == {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406],
                                       "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
                                       "crop_pct": 0.875, "crop_mode": "center"}
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "m")
    assert loaded.preprocessing == enc.preprocessing and loaded.backbone_spec == enc.backbone_spec


def test_preprocessing_defaults_per_source() -> None:
    import timm

    vit = DebiasedEncoder(timm.create_model("test_vit", pretrained=False), "blocks.0", SITE)
    assert vit.preprocessing == Preprocessing((3, 160, 160), (0.5,) * 3, (0.5,) * 3, "bicubic", 0.95, "center")
    plain = DebiasedEncoder(create_backbone("torchvision:resnet18"), "avgpool", SITE)
    assert plain.preprocessing.input_size == (3, 224, 224) and plain.preprocessing.crop_pct == 0.875
    assert DebiasedEncoder(_mlp(), None, SITE).preprocessing is None  # custom: unknown


def test_explicit_preprocessing_is_validated_and_saved(trained, tmp_path) -> None:
    enc = copy.deepcopy(trained[0])
    enc.preprocessing = {"input_size": (1, 8, 8), "mean": [0.1], "std": [0.2], "interpolation": "nearest"}
    enc.save_pretrained(tmp_path / "m")
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "m", backbone=_mlp())
    assert loaded.preprocessing == Preprocessing((1, 8, 8), (0.1,), (0.2,), "nearest")
    with pytest.raises(ValueError, match=r"one value per channel \(3\), got 1 and 1"):
        enc.preprocessing = {"input_size": (3, 8, 8), "mean": [0.1], "std": [0.2]}
    with pytest.raises(ValueError, match=r"Preprocessing.interpolation must be one of \['nearest', 'bilinear'"):
        enc.preprocessing = {"input_size": (1, 8, 8), "mean": [0.1], "std": [0.2], "interpolation": "cubic"}


def test_model_card_metadata_metrics_and_snippet_runs(trained, tmp_path) -> None:
    enc, x, _ = trained
    (tmp_path / "m").mkdir()
    (tmp_path / "m/metrics.json").write_text(json.dumps({"site_probe_accuracy": 0.3456789, "club": {"site": 0.01}}))
    enc.save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m/README.md")
    assert card.data.library_name == "dmm_wrap"
    assert {"dmm_wrap", "debiasing", "deepminmax"} <= set(card.data.tags)
    assert card.data.base_model is None  # a custom backbone has no Hub base model
    assert "| `site` | categorical | 3 |" in card.text
    assert "| site_probe_accuracy | 0.3457 |" in card.text and "| club.site | 0.01 |" in card.text
    snippet = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)[0]
    namespace = {"my_backbone": _mlp(1), "images": x[:5]}
    exec(snippet.replace("REPO_ID_OR_FOLDER", str(tmp_path / "m")), namespace)
    assert torch.equal(namespace["z_tilde"], _output(enc, x[:5]))

    enc.save_pretrained(tmp_path / "m2", metrics={"site_probe_accuracy": torch.tensor(0.5)})
    sha = json.loads((tmp_path / "m2/config.json").read_text())["weights_sha256"]  # metrics.json records the weights
    assert json.loads((tmp_path / "m2/metrics.json").read_text()) == {"site_probe_accuracy": 0.5, "weights_sha256": sha}
    assert "| site_probe_accuracy | 0.5 |" in (tmp_path / "m2/README.md").read_text()


def test_model_card_names_timm_base_model_and_license(tmp_path) -> None:
    import timm

    backbone = tag_backbone(timm.create_model("test_vit", pretrained=False),
                            BackboneSpec("timm", "test_vit", "r160_in1k", {}))
    DebiasedEncoder(backbone, "blocks.0", SITE, input_size=(3, 160, 160)).save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m/README.md")
    assert card.data.base_model == "timm/test_vit.r160_in1k" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "image-feature-extraction"


# --------------------------------------------------------------------------- heads only
def test_heads_only_saves_only_heads_and_reloads_on_pinned_backbone(trained, tmp_path) -> None:
    enc, x, _ = trained
    enc.save_pretrained(tmp_path / "h", heads_only=True)
    with safe_open(str(tmp_path / "h/model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {k for k in enc.state_dict() if k.startswith("heads.")} and keys
    assert json.loads((tmp_path / "h/config.json").read_text())["weights"] == "heads_only"
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "h", backbone=copy.deepcopy(enc.backbone))
    assert torch.equal(_output(loaded, x), _output(enc, x))
    with pytest.raises(ValueError, match=r"custom Sequential module.*backbone=module"):
        DebiasedEncoder.from_pretrained(tmp_path / "h")


def test_heads_only_torchvision_needs_a_tag_and_says_network(tmp_path, monkeypatch) -> None:
    untagged = DebiasedEncoder(create_backbone("torchvision:resnet18"), "layer2", SITE, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="no pretrained tag"):
        untagged.save_pretrained(tmp_path / "u", heads_only=True)
    assert not (tmp_path / "u").exists()

    spec = BackboneSpec("torchvision", "resnet18", "ResNet18_Weights.IMAGENET1K_V1", {})
    backbone = tag_backbone(untagged.backbone, spec)
    enc = DebiasedEncoder(backbone, "layer2", SITE, input_size=(3, 32, 32))
    enc.save_pretrained(tmp_path / "h", heads_only=True)
    x = torch.randn(2, 3, 32, 32)
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "h", backbone=copy.deepcopy(backbone))
    assert torch.equal(_output(loaded, x), _output(enc, x))
    assert loaded.backbone_spec.pretrained_tag == "ResNet18_Weights.IMAGENET1K_V1"

    calls = []

    def offline_create_backbone(name: str, pretrained: Any = False, **kwargs: Any) -> nn.Module:
        calls.append((name, pretrained))
        raise OSError("no network")

    monkeypatch.setattr("dmm_wrap.backbones.create_backbone", offline_create_backbone)
    with pytest.raises(OSError, match=r"needs network access.*Pass the backbone yourself"):
        DebiasedEncoder.from_pretrained(tmp_path / "h")
    assert calls == [("torchvision:resnet18", "ResNet18_Weights.IMAGENET1K_V1")]


# --------------------------------------------------------------------------- push
class FakeApi:
    """Records HfApi calls and keeps a copy of what upload_folder would have sent."""

    def __init__(self, store: Path) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.store = store

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def file_exists(self, repo_id: str, filename: str, **kwargs: Any) -> bool:
        """A new repo: no README.md yet (not recorded: a read, not a change)."""
        return False

    def upload_folder(self, **kwargs: Any) -> Any:
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.store.mkdir(parents=True)
        for p in folder.iterdir():
            if any(fnmatch.fnmatch(p.name, pat) for pat in kwargs["allow_patterns"]):
                shutil.copy(p, self.store / p.name)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc", pr_url=None)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def test_push_to_hub_is_one_create_and_one_commit(trained, tmp_path, monkeypatch) -> None:
    enc, x, _ = trained
    fake = FakeApi(tmp_path / "uploaded")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: fake.create_repo(repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: fake.upload_folder(**kw))
    monkeypatch.setattr(HfApi, "file_exists", lambda self, repo_id, filename, **kw: fake.file_exists(repo_id, filename))
    commit = enc.push_to_hub("org/debiased-mlp", private=True, metrics={"acc": 0.9})
    assert fake.names() == ["create_repo", "upload_folder"]
    assert fake.calls[0][1]["exist_ok"] is True and fake.calls[0][1]["private"] is True
    assert {p.name for p in (tmp_path / "uploaded").iterdir()} == MODEL_FILES | {"metrics.json"}
    assert commit.commit_url.endswith("/commit/abc")
    assert 'from_pretrained("org/debiased-mlp", backbone=my_backbone)' in (tmp_path / "uploaded/README.md").read_text()
    # what was uploaded is a loadable model with the same outputs
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "uploaded", backbone=_mlp(1))
    assert torch.equal(_output(loaded, x), _output(enc, x))


def test_push_to_a_branch_or_as_a_pull_request(trained, tmp_path) -> None:
    fake = FakeApi(tmp_path / "a")
    trained[0].push_to_hub("org/m", revision="v1", api=fake)
    assert fake.names() == ["create_repo", "create_branch", "upload_folder"]
    assert fake.calls[2][1]["revision"] == "v1"
    fake = FakeApi(tmp_path / "b")
    trained[0].push_to_hub("org/m", create_pr=True, api=fake, commit_message="New heads")
    assert fake.names() == ["create_repo", "upload_folder"]  # a PR against main needs no branch
    assert fake.calls[1][1]["create_pr"] is True and fake.calls[1][1]["commit_message"] == "New heads"


def test_nothing_created_when_saving_fails(trained, tmp_path, monkeypatch) -> None:
    enc = trained[0]
    fake = FakeApi(tmp_path / "uploaded")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        enc.push_to_hub("org/m", metrics={"bad": object()}, api=fake)
    untagged = DebiasedEncoder(create_backbone("torchvision:resnet18"), "layer1", SITE, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="no pretrained tag"):
        untagged.push_to_hub("org/m", heads_only=True, api=fake)

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr("dmm_wrap.io.hub_mixin.save_weights", disk_full)
    with pytest.raises(OSError, match="No space left"):
        enc.push_to_hub("org/m", api=fake)
    monkeypatch.setattr(DebiasedEncoder, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        enc.push_to_hub("org/m", api=fake)
    assert fake.calls == [] and not (tmp_path / "uploaded").exists()


def test_push_folder_uploads_the_model_files_only(trained, tmp_path) -> None:
    fake = FakeApi(tmp_path / "uploaded")
    trained[0].save_pretrained(tmp_path / "run")
    (tmp_path / "run/history.json").write_text("{}")  # training leftovers stay local
    (tmp_path / "run/pytorch_model.bin").write_bytes(b"pickle")
    push_folder_to_hub(tmp_path / "run", "org/m", api=fake)
    assert fake.names() == ["create_repo", "upload_folder"]
    assert {p.name for p in (tmp_path / "uploaded").iterdir()} == MODEL_FILES
    assert (tmp_path / "uploaded/model.safetensors").read_bytes() == (tmp_path / "run/model.safetensors").read_bytes()
    # the untouched card gets the repo id in its snippet; the local folder is not modified
    assert 'from_pretrained("org/m", backbone=my_backbone)' in (tmp_path / "uploaded/README.md").read_text()
    assert "REPO_ID_OR_FOLDER" in (tmp_path / "run/README.md").read_text()
    (tmp_path / "run/README.md").write_text("# My own card\n")
    fake = FakeApi(tmp_path / "edited")
    push_folder_to_hub(tmp_path / "run", "org/m", api=fake)
    assert (tmp_path / "edited/README.md").read_text() == "# My own card\n"


def test_push_folder_with_run_metrics(trained, tmp_path) -> None:
    """The CLI layout: the model in OUTPUT/model, the evaluation in OUTPUT/metrics.json."""
    trained[0].save_pretrained(tmp_path / "out/model")
    (tmp_path / "out/metrics.json").write_text(json.dumps({"debiased": {"site_auc": 0.51}}))
    fake = FakeApi(tmp_path / "uploaded")
    push_folder_to_hub(tmp_path / "out/model", "org/m", api=fake,
                       metrics=json.loads((tmp_path / "out/metrics.json").read_text()))
    assert {p.name for p in (tmp_path / "uploaded").iterdir()} == MODEL_FILES | {"metrics.json"}
    assert json.loads((tmp_path / "uploaded/metrics.json").read_text()) == {"debiased": {"site_auc": 0.51}}
    assert "| debiased.site_auc | 0.51 |" in (tmp_path / "uploaded/README.md").read_text()
    assert not (tmp_path / "out/model/metrics.json").exists()  # the local folder is left as it was


def test_push_folder_checks_the_folder_first(trained, tmp_path) -> None:
    trained[0].save_pretrained(tmp_path / "run")
    fake = FakeApi(tmp_path / "again")
    (tmp_path / "run/model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        push_folder_to_hub(tmp_path / "run", "org/m", api=fake)
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        push_folder_to_hub(tmp_path / "run", "org/m/extra", api=fake)
    assert fake.calls == []


def test_token_is_never_written(trained, tmp_path, caplog, capsys) -> None:
    fake = FakeApi(tmp_path / "uploaded")
    with caplog.at_level(logging.DEBUG):
        trained[0].push_to_hub("org/m", token=SECRET, heads_only=True, api=fake)
    assert [kw["token"] for _, kw in fake.calls] == [SECRET, SECRET]  # handed to huggingface_hub
    files = list((tmp_path / "uploaded").iterdir())
    assert {p.name for p in files} == MODEL_FILES
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p.name
    out = capsys.readouterr()
    assert SECRET not in caplog.text + out.out + out.err
    assert "Pushed" in caplog.text  # control: the log was captured


# --------------------------------------------------------------------------- bad files
@pytest.fixture
def saved(trained, tmp_path) -> Path:
    trained[0].save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _load(folder: Path) -> DebiasedEncoder:
    return DebiasedEncoder.from_pretrained(folder, backbone=_mlp(1))


def test_missing_and_unexpected_keys_are_named(saved) -> None:
    state = load_file(str(saved / "model.safetensors"))
    del state["heads.h.0.bias"]
    state["heads.extra"] = torch.zeros(1)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['heads\.h\.0\.bias'\], unexpected keys \['heads\.extra'\]"):
        _load(saved)


def test_wrong_shape_is_named(saved) -> None:
    state = load_file(str(saved / "model.safetensors"))
    state["heads.h.0.bias"] = torch.zeros(3)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ValueError, match=r"heads\.h\.0\.bias: file \(3,\) vs model \(16,\)"):
        _load(saved)


def test_pickle_checkpoint_is_refused_without_unpickling(saved, monkeypatch) -> None:
    state = load_file(str(saved / "model.safetensors"))
    (saved / "model.safetensors").unlink()
    torch.save(state, saved / "pytorch_model.bin")

    def no_unpickling(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=r"\['pytorch_model\.bin'\] but no model\.safetensors.*never unpickles"):
        _load(saved)
    (saved / "config.json").unlink()  # a bare pickle folder gives the same answer
    with pytest.raises(ValueError, match="never unpickles"):
        _load(saved)


def test_unknown_config_keys_warn_and_load(saved, trained) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["future_option"] = {"x": 1}
    config["preprocessing"] = {"input_size": [1, 8, 8], "mean": [0.0], "std": [1.0], "future_field": 3}
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning) as record:
        loaded = _load(saved)
    messages = " ".join(str(w.message) for w in record)
    assert "['future_option']" in messages and "['future_field']" in messages
    assert torch.equal(_output(loaded, trained[1]), _output(trained[0], trained[1]))


@pytest.mark.parametrize("edit,match", [
    ({"model_type": "bert"}, r"not a dmm_wrap config \(model_type 'bert'"),
    ({"format_version": 99}, r"format_version 99; this dmm_wrap reads up to 1\. Upgrade"),
    ({"weights": "lora"}, r"'weights' must be 'full' or 'heads_only', got 'lora'"),
    ({"feature_dim": None}, r"lacks the keys \['feature_dim'\]"),
])
def test_foreign_newer_or_broken_configs_are_rejected(saved, edit: dict[str, Any], match: str) -> None:
    config = json.loads((saved / "config.json").read_text())
    for key, value in edit.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        _load(saved)


def test_invalid_json_names_the_file(saved) -> None:
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        _load(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_name_the_file(saved, damage: str) -> None:
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * len(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is truncated or corrupt"):
        _load(saved)


def test_cli_push_uploads_the_run_model_with_its_metrics(trained, tmp_path, monkeypatch, capsys) -> None:
    from dmm_wrap.apps.cli import main

    enc, _, _ = trained
    run = tmp_path / "run"
    enc.save_pretrained(run / "model")
    (run / "metrics.json").write_text('{"methods": {"dmm": {"task_accuracy": 0.97}}}')
    fake = FakeApi(tmp_path / "uploaded")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: fake.create_repo(repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: fake.upload_folder(**kw))
    monkeypatch.setattr(HfApi, "file_exists", lambda self, repo_id, filename, **kw: fake.file_exists(repo_id, filename))
    # A token on the command line would show in `ps` and the shell history: refused, before anything is sent.
    for argv in (["--token", "hf_cli_secret_123"], ["--token=hf_cli_secret_123"]):
        assert main(["push", str(run), "org/run", *argv]) == 2
        err = capsys.readouterr().err
        assert "HF_TOKEN" in err and "--token-stdin" in err and "hf_cli_secret_123" not in err
    assert fake.calls == []
    monkeypatch.setattr("sys.stdin", io.StringIO("hf_cli_secret_123\n"))
    assert main(["push", str(run), "org/run", "--private", "--token-stdin"]) == 0
    assert fake.names() == ["create_repo", "upload_folder"] and fake.calls[0][1]["private"] is True
    assert {call[1]["token"] for call in fake.calls} == {"hf_cli_secret_123"}  # read from stdin, handed to the Hub
    assert {p.name for p in (tmp_path / "uploaded").iterdir()} == MODEL_FILES | {"metrics.json"}
    assert "0.97" in (tmp_path / "uploaded/README.md").read_text()
    for p in [*(tmp_path / "uploaded").iterdir(), *(run / "model").iterdir()]:
        assert "hf_cli_secret_123" not in p.read_bytes().decode("latin-1")
    assert "hf_cli_secret_123" not in capsys.readouterr().out
    assert main(["push", str(tmp_path / "missing"), "org/run"]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["push", str(run), "org/run", "--token-stdin"]) == 2 and "empty" in capsys.readouterr().err
    # Without --token-stdin the token is left to huggingface_hub (HF_TOKEN or the stored login): None is passed.
    fake.calls.clear()
    shutil.rmtree(tmp_path / "uploaded")
    assert main(["push", str(run), "org/run"]) == 0
    assert {call[1]["token"] for call in fake.calls} == {None}


def test_push_folder_uploads_the_audit_of_these_weights_only(trained, tmp_path) -> None:
    enc, x, _ = trained
    enc.save_pretrained(tmp_path / "m")
    sha = json.loads((tmp_path / "m/config.json").read_text())["weights_sha256"]
    site = {"metric": "balanced_accuracy", "chance": 1 / 3, "linear": 0.34, "mlp": 0.36, "threshold": 0.3833,
            "verdict": "removed"}
    audit = {"model": {"source": "m", "weights_sha256": sha}, "samples": {"train": 70, "test": 30},
             "split": "a separate test set", "criteria": {"margin": 0.05, "max_r2": 0.1},
             "features": {"raw": {"site": {**site, "mlp": 0.9, "verdict": "leaks"}}, "debiased": {"site": site}}}
    (tmp_path / "m/audit.json").write_text(json.dumps(audit))
    fake = FakeApi(tmp_path / "uploaded")
    push_folder_to_hub(tmp_path / "m", "org/m", api=fake)
    assert {p.name for p in (tmp_path / "uploaded").iterdir()} == MODEL_FILES | {"audit.json"}
    card = (tmp_path / "uploaded/README.md").read_text()
    assert "## Leakage audit" in card
    assert "| `site` | balanced accuracy | 0.3333 | 0.3833 | 0.9 (leaks) | 0.36 (removed) |" in card
    assert 'from_pretrained("org/m", backbone=my_backbone)' in card

    audit["model"]["weights_sha256"] = "0" * 64  # an audit of other weights
    (tmp_path / "m/audit.json").write_text(json.dumps(audit))
    fake = FakeApi(tmp_path / "stale")
    push_folder_to_hub(tmp_path / "m", "org/m", api=fake)
    assert {p.name for p in (tmp_path / "stale").iterdir()} == MODEL_FILES
    assert "## Leakage audit" not in (tmp_path / "stale/README.md").read_text()


# --------------------------------------------------------------------------- rebuilding the backbone from its spec
def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("build,expected", [
    (lambda tv: tv.resnet18(num_classes=2), ("resnet18", {"num_classes": 2})),
    (lambda tv: tv.efficientnet_b0(num_classes=5), ("efficientnet_b0", {"num_classes": 5})),
    (lambda tv: tv.regnet_y_400mf(), ("regnet_y_400mf", {})),
    (lambda tv: tv.squeezenet1_1(num_classes=3), ("squeezenet1_1", {"num_classes": 3})),
    (lambda tv: tv.googlenet(aux_logits=False, transform_input=True, init_weights=False),
     ("googlenet", {"aux_logits": False, "transform_input": True})),
])
def test_torchvision_spec_names_the_builder_and_its_shape_arguments(build, expected) -> None:
    import torchvision

    backbone = build(torchvision.models)
    spec = describe_backbone(backbone)
    assert (spec.source, spec.name, spec.kwargs) == ("torchvision", *expected)
    rebuilt = build_backbone(spec)
    assert type(rebuilt) is type(backbone) and _shapes(rebuilt) == _shapes(backbone)
    assert getattr(rebuilt, "transform_input", None) == getattr(backbone, "transform_input", None)


def test_torchvision_vit_records_its_image_size() -> None:
    import torchvision

    with torch.device("meta"):  # ViT-B/16 has 86M parameters: describe it without allocating them
        vit = torchvision.models.vit_b_16(image_size=64, num_classes=10)
    spec = describe_backbone(vit)
    assert (spec.source, spec.name, spec.kwargs) == ("torchvision", "vit_b_16", {"image_size": 64, "num_classes": 10})
    with torch.device("meta"):
        assert _shapes(torchvision.models.get_model(spec.name, **spec.kwargs)) == _shapes(vit)


@pytest.mark.parametrize("kwargs,recorded", [
    ({"num_classes": 7}, {"num_classes": 7}),
    ({"num_classes": 0, "global_pool": "max"}, {"num_classes": 0, "global_pool": "max"}),
    ({"in_chans": 1, "num_classes": 7}, {"in_chans": 1, "num_classes": 7}),
    ({}, {}),
])
def test_timm_spec_records_the_shape_arguments(kwargs, recorded) -> None:
    import timm

    backbone = timm.create_model("test_resnet", pretrained=False, **kwargs)
    spec = describe_backbone(backbone)
    assert (spec.source, spec.name, spec.kwargs) == ("timm", "test_resnet", recorded)
    rebuilt = build_backbone(spec)
    assert _shapes(rebuilt) == _shapes(backbone) and rebuilt.global_pool.pool_type == backbone.global_pool.pool_type


def test_timm_vit_records_img_size_and_pooling(tmp_path) -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=7, img_size=32, global_pool="avg")
    enc = DebiasedEncoder(vit, "fc_norm", SITE, input_size=(3, 32, 32))
    assert enc.backbone_spec == BackboneSpec("timm", "test_vit", None,
                                             {"num_classes": 7, "img_size": [32, 32], "global_pool": "avg"})
    enc.save_pretrained(tmp_path / "m")
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "m")
    x = torch.randn(4, 3, 32, 32)
    assert loaded.backbone.global_pool == "avg" and torch.equal(_output(loaded, x), _output(enc, x))


def test_a_backbone_no_rebuild_reproduces_is_custom_and_loading_says_so(tmp_path) -> None:
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 2))  # a head no builder makes
    enc = DebiasedEncoder(resnet, "layer2", SITE, input_size=(3, 32, 32))
    assert enc.backbone_spec == BackboneSpec("custom", "ResNet", None, {})
    enc.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"custom backbone \(ResNet\).*from_pretrained\(\.\.\., backbone=module\)"):
        DebiasedEncoder.from_pretrained(tmp_path / "m")
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "m", backbone=copy.deepcopy(resnet))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_output(loaded, x), _output(enc, x))


def test_create_backbone_records_the_shape_arguments_only() -> None:
    backbone = create_backbone("timm:test_vit", num_classes=3, img_size=32, drop_path_rate=0.1, depth=2)
    spec = describe_backbone(backbone)
    assert spec == BackboneSpec("timm", "test_vit", None, {"num_classes": 3, "img_size": 32, "depth": 2})
    assert _shapes(build_backbone(spec)) == _shapes(backbone)


# --------------------------------------------------------------------------- a crafted config.json
@pytest.fixture(scope="module")
def timm_save(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("timm") / "m"
    DebiasedEncoder(timm.create_model("test_resnet", pretrained=False, num_classes=7), "layer2", SITE,
                    input_size=(3, 32, 32)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("backbone,match", [
    ({"kwargs": {"checkpoint_path": "PICKLE"}}, r"backbone kwargs 'checkpoint_path' is refused; only the shape "
                                                r"arguments \['class_token', .*'num_classes'"),
    ({"kwargs": {"pretrained": True}}, r"backbone kwargs 'pretrained' is refused"),
    ({"kwargs": {"pretrained_cfg_overlay": {"file": "PICKLE"}}},
     r"backbone kwargs 'pretrained_cfg_overlay' is refused"),
    ({"kwargs": {"img_size": {"file": "PICKLE"}}}, r"backbone kwargs 'img_size' must be a number, string, bool"),
    ({"name": "hf-hub:org/evil"}, r"backbone name must be a plain timm name.*'hf-hub:org/evil'"),
    ({"source": "torchvision", "name": "resnet18", "kwargs": {"weights": "DEFAULT"}},
     r"backbone kwargs 'weights' is refused; only the shape arguments \['aux_logits', 'image_size'"),
])
@pytest.mark.parametrize("weights", ["full", "heads_only"])
def test_crafted_backbone_kwargs_are_refused_before_any_build(timm_save, tmp_path, monkeypatch, backbone, match,
                                                              weights) -> None:
    import timm
    import torchvision

    folder = tmp_path / "crafted"
    shutil.copytree(timm_save, folder)
    pickle_path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, pickle_path)  # what a Hub config would point timm at
    config = json.loads((folder / "config.json").read_text())
    config["backbone"] = json.loads(json.dumps({**config["backbone"], "pretrained_tag": "a1_in1k", **backbone})
                                    .replace("PICKLE", str(pickle_path)))
    config["weights"] = weights
    (folder / "config.json").write_text(json.dumps(config))
    builds: list[Any] = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: builds.append((a, k)))
    monkeypatch.setattr(torchvision.models, "get_model", lambda *a, **k: builds.append((a, k)))
    with pytest.raises(ValueError, match=match):
        DebiasedEncoder.from_pretrained(folder)
    assert builds == []  # refused before timm / torchvision saw the arguments


def test_shape_arguments_in_a_config_still_rebuild(timm_save) -> None:
    config = json.loads((timm_save / "config.json").read_text())
    assert config["backbone"] == {"source": "timm", "name": "test_resnet", "pretrained_tag": None,
                                  "kwargs": {"num_classes": 7}}
    loaded = DebiasedEncoder.from_pretrained(timm_save)
    assert loaded.backbone.num_classes == 7
