"""CLI: a smoke run of the default config writes every output quickly; errors exit 2 with the key in one line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmm_wrap import DebiasedEncoder
from dmm_wrap.cli import COMMANDS, Command, build_parser, main
from dmm_wrap.evaluate import Metrics
from dmm_wrap.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "synthetic_digits.yaml")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("smoke")
    start = time.perf_counter()
    status = main(["fit", DEFAULT, "--max-steps", "5", "--output-dir", str(out), "--set", "fit.progress=false"])
    assert status == 0
    return out, time.perf_counter() - start


def test_smoke_run_writes_every_output(smoke_run: tuple[Path, float], capsys: pytest.CaptureFixture) -> None:
    out, seconds = smoke_run
    assert seconds < 60
    for name in ("metrics.json", "report.md", "tsne.png", "training_curves.png", "history.json", "config.yaml",
                 "model/config.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    for png in ("tsne.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((out / "metrics.json").read_text())
    assert set(data) == {"methods", "wall_seconds"} and 0 < data["wall_seconds"] < 60
    assert list(data["methods"]) == ["raw", "leace", "dmm"]
    for method in data["methods"].values():
        assert set(method) == {"task_accuracy", "leakage"} and isinstance(method["task_accuracy"], float)
        assert set(method["leakage"]) == {"rotation", "width", "site"}
        for entry in method["leakage"].values():
            assert set(entry) == {"metric", "chance", "linear", "mlp"}
        assert method["leakage"]["site"]["metric"] == "balanced_accuracy"
        assert method["leakage"]["site"]["chance"] == pytest.approx(1 / 3)  # 3 sites
        assert method["leakage"]["rotation"]["metric"] == "r2"
    Metrics.from_dict(data)

    report = (out / "report.md").read_text()
    assert "## Targets" in report and ("MET" in report) and "![tsne](tsne.png)" in report
    assert json.loads((out / "history.json").read_text())["steps_done"] == 5
    resolved = load_run_config(out / "config.yaml")
    assert resolved.fit.max_steps == 5 and resolved.output_dir == str(out)


def test_smoke_model_loads_and_matches(smoke_run: tuple[Path, float]) -> None:
    out, _ = smoke_run
    model = DebiasedEncoder.from_pretrained(out / "model")
    x = torch.rand(4, 3, 32, 32)
    assert model(x).shape[0] == 4 and torch.isfinite(model(x)).all()
    assert [a.name for a in model.attributes] == ["rotation", "width", "site"]


def test_eval_command_on_saved_model(smoke_run: tuple[Path, float], tmp_path: Path) -> None:
    out, _ = smoke_run
    status = main(["eval", str(out / "model"), DEFAULT, "--output-dir", str(tmp_path),
                   "--set", "eval.max_samples=200", "--set", "eval.tsne_samples=0"])
    assert status == 0
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert list(data["methods"]) == ["raw", "leace", "dmm"]
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "tsne.png").exists()


@pytest.mark.parametrize("yaml_text, key", [
    ("fit:\n  lrr: 0.1\n", "fit.lrr"),
    ("fit:\n  epochs: ten\n", "fit.epochs"),
    ("data:\n  kind: mnist\n", "data.kind"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture, yaml_text: str,
                                           key: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    assert main(["fit", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmm-wrap: error: ") and key in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bad_override_and_missing_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", DEFAULT, "--set", "fit.lam=2", "--output-dir", str(tmp_path)]) == 2
    assert "fit.lam" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no_model"), DEFAULT, "--output-dir", str(tmp_path)]) == 2
    assert "no_model" in capsys.readouterr().err


def test_options_map_to_config_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(args: argparse.Namespace) -> int:
        from dmm_wrap.cli import _overrides

        seen["cfg"] = load_run_config(args.config, _overrides(args))
        return 0

    parser = build_parser([Command("fit", "", COMMANDS[0].add_arguments, fake_run)])
    args = parser.parse_args(["fit", DEFAULT, "--output-dir", "o", "--max-steps", "3", "--device", "cpu",
                              "--set", "fit.lr=0.002", "--set", "eval.leace=false"])
    assert args.run(args) == 0
    cfg = seen["cfg"]
    assert (cfg.output_dir, cfg.fit.max_steps, cfg.fit.device) == ("o", 3, "cpu")
    assert cfg.fit.lr == 0.002 and cfg.eval.leace is False and cfg.fit.resume is False
    args = parser.parse_args(["fit", DEFAULT, "--resume"])
    assert args.run(args) == 0 and seen["cfg"].fit.resume is True


def test_subcommand_table_is_extensible() -> None:
    extra = Command("inspect", "describe a model", lambda p: p.add_argument("model_dir"), lambda args: 7)
    parser = build_parser([*COMMANDS, extra])
    args = parser.parse_args(["inspect", "somewhere"])
    assert args.run(args) == 7 and args.model_dir == "somewhere"
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["frobnicate"])
    assert info.value.code == 2


def test_seeded_runs_are_reproducible(tmp_path: Path) -> None:
    fast = ["--max-steps", "3", "--set", "fit.stats_batches=2", "--set", "fit.progress=false",
            "--set", "eval.max_samples=64", "--set", "eval.tsne_samples=0", "--set", "eval.leace=false"]
    for name in ("a", "b"):
        assert main(["fit", DEFAULT, "--output-dir", str(tmp_path / name), *fast]) == 0
    a, b = (json.loads((tmp_path / n / "history.json").read_text()) for n in ("a", "b"))
    assert a["loss"] == b["loss"], (a["loss"], b["loss"])
    assert a["club"] == b["club"], (a["club"], b["club"])
    wa, wb = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_image_csv_model_records_the_preprocessing_it_was_trained_with(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from dmm_wrap.cli import build_data, build_model, run_preprocessing
    from dmm_wrap.run_config import load_run_config

    rows = ["path,site"]
    for i in range(4):
        Image.fromarray((np.random.default_rng(i).random((20, 12, 3)) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i % 2}")
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    yaml_text = (f"data: {{kind: image_csv, root: {tmp_path}, csv: {tmp_path / 'a.csv'}, test_csv: {tmp_path / 'a.csv'},"
                 f" attributes: [{{name: site, kind: categorical, num_classes: 2}}], image_size: 16}}\n"
                 "model: {backbone: 'torchvision:resnet18', layer: layer1}\n")
    (tmp_path / "run.yaml").write_text(yaml_text)
    cfg = load_run_config(tmp_path / "run.yaml", [])
    data = build_data(cfg)
    model = build_model(cfg, data.attributes)
    assert model.preprocessing == run_preprocessing(cfg)
    image, _, _ = data.train.dataset[1]
    assert torch.equal(model.preprocess(Image.open(tmp_path / "1.png").convert("RGB")), image)


# --------------------------------------------------------------------------- audit and sweep
FAST_EVAL = ["--set", "fit.stats_batches=2", "--set", "fit.progress=false", "--set", "eval.tsne_samples=0"]


def test_audit_command_writes_into_the_model_folder_and_its_card(smoke_run: tuple[Path, float], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import shutil

    out, _ = smoke_run
    model_dir = tmp_path / "model"
    shutil.copytree(out / "model", model_dir)
    assert main(["audit", str(model_dir), DEFAULT, "--set", "eval.max_samples=200"]) == 0
    data = json.loads((model_dir / "audit.json").read_text())
    assert {"model", "attributes", "samples", "split", "criteria", "features", "verdicts", "wall_seconds"} <= set(data)
    assert data["samples"] == {"train": 200, "test": 200} and data["split"] == "a separate test set"
    assert data["model"]["weights_sha256"] == json.loads((model_dir / "config.json").read_text())["weights_sha256"]
    assert list(data["features"]) == ["raw", "debiased"]
    for view in data["features"].values():
        assert list(view) == ["rotation", "width", "site"]
        site = view["site"]
        assert site["metric"] == "balanced_accuracy" and site["chance"] == pytest.approx(1 / 3)
        assert site["threshold"] == pytest.approx(1 / 3 + 0.05) and site["verdict"] in ("removed", "leaks")
    # 5 training steps leave the site in Z~, as in raw Z (where the digits encoder reads it perfectly)
    assert data["features"]["raw"]["site"]["mlp"] > 0.9 and data["features"]["raw"]["site"]["verdict"] == "leaks"
    assert data["verdicts"] == {name: v["verdict"] for name, v in data["features"]["debiased"].items()}
    printed = capsys.readouterr().out
    assert "| raw Z " in printed and "site: " in printed
    assert "## Leakage audit" in (model_dir / "README.md").read_text() and (model_dir / "audit.md").is_file()
    DebiasedEncoder.from_pretrained(model_dir)  # still a loadable model

    elsewhere = tmp_path / "audit-out"
    assert main(["audit", str(out / "model"), DEFAULT, "--output-dir", str(elsewhere),
                 "--set", "eval.max_samples=100", "--set", "audit.margin=0.1"]) == 0
    data = json.loads((elsewhere / "audit.json").read_text())
    assert data["criteria"]["margin"] == 0.1 and data["samples"]["train"] == 100
    assert not (out / "model" / "audit.json").exists()  # --output-dir leaves the model folder alone


def test_audit_bad_input_exits_2(smoke_run: tuple[Path, float], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = smoke_run
    assert main(["audit", str(tmp_path / "no_model"), DEFAULT]) == 2
    err = capsys.readouterr().err
    assert "no_model" in err and err.count("\n") == 1
    assert main(["audit", str(out / "model"), DEFAULT, "--set", "audit.margn=0.1"]) == 2
    assert "audit.margn: unknown key; did you mean 'margin'?" in capsys.readouterr().err


def test_sweep_writes_one_run_per_value_and_the_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    assert main(["sweep", DEFAULT, "fit.lam=0.2,0.8", "--max-steps", "2", "--output-dir", str(tmp_path), *FAST_EVAL,
                 "--set", "eval.max_samples=96"]) == 0
    assert time.perf_counter() - start < 60  # about 6 s on 2 idle cores; the bound of the smoke run above
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["key"] == "fit.lam" and data["values"] == [0.2, 0.8] and data["complete"] is True
    assert [r["value"] for r in data["runs"]] == [0.2, 0.8] and [r["label"] for r in data["runs"]] == ["lam=0.2",
                                                                                                      "lam=0.8"]
    for run in data["runs"]:
        assert list(run["methods"]) == ["raw", "leace", "dmm"]
        assert isinstance(run["methods"]["dmm"]["task_accuracy"], float)
        folder = Path(run["output_dir"])
        assert folder.parent == tmp_path and (folder / "metrics.json").is_file() and (folder / "model").is_dir()
        assert load_run_config(folder / "config.yaml").fit.lam == run["value"]  # the run's own value, resolved
        assert json.loads((folder / "metrics.json").read_text())["methods"] == run["methods"]
    # raw Z does not depend on lam: both runs measured the same reference
    assert data["runs"][0]["methods"]["raw"] == data["runs"][1]["methods"]["raw"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lam=0.2 " in capsys.readouterr().out
    from dmm_wrap.sweep import Sweep

    assert Sweep.from_dict(data).to_dict() == data


@pytest.mark.parametrize("argv, message", [
    (["fit.lam=0.2"], "fit.lam: a sweep needs at least 2 values"),
    (["fit.lamb=0.2,0.5"], "fit.lamb: unknown key; did you mean 'lam'?"),
    (["fit.lam=0.2,2.0"], "fit.lam"),
    (["fit.lam=0.2,0.5", "--set", "fit.lrr=0.1"], "fit.lrr: unknown key; did you mean 'lr'?"),
    (["fit.lam=0.2,0.5", "--set", "fit.lam=0.3"], "fit.lam: both swept and set"),
    (["fit.lam=0.2,,0.5"], "empty value"),
    (["output_dir=a,b"], "output_dir: cannot be swept"),
    (["fit.lam"], "A sweep is KEY=VALUE1,VALUE2"),
])
def test_sweep_bad_input_exits_2_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                                message: str) -> None:
    assert main(["sweep", DEFAULT, *argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmm-wrap: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
