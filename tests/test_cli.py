"""CLI: a smoke run of the default config writes every output; user errors exit 2 with the key in one line, bugs
show their traceback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmm_wrap import DebiasedEncoder
from dmm_wrap.apps.cli import COMMANDS, Command, build_parser, main
from dmm_wrap.apps.evaluate import Metrics
from dmm_wrap.apps.run_config import OPTION_KEYS, load_run_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "synthetic_digits.yaml")


REFERENCE_INPUT = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
"""A batch the smoke run's trained model is applied to in memory, as it is saved: the reference for the reload."""
REFERENCE_THREADS: list[int] = []
"""torch's intra-op thread count when the reference was taken (the run's `threads` setting): a float sum split over
another number of threads rounds differently, so the reload is compared on the same count."""


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """The smoke run's folder, and the trained model's output on REFERENCE_INPUT (taken in memory, as it was saved)."""
    out = tmp_path_factory.mktemp("smoke")
    reference: list[torch.Tensor] = []
    save = DebiasedEncoder.save_pretrained

    def recording(self: DebiasedEncoder, *args, **kwargs):
        with torch.no_grad():
            reference.append(self(REFERENCE_INPUT).clone())
        REFERENCE_THREADS.append(torch.get_num_threads())
        return save(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DebiasedEncoder, "save_pretrained", recording)
        status = main(["fit", DEFAULT, "--max-steps", "5", "--output-dir", str(out), "--set", "fit.progress=false",
                       "--set", "method=deepminmax"])
    assert status == 0 and len(reference) == 1
    return out, reference[0]


def test_smoke_run_writes_every_output(smoke_run: tuple[Path, torch.Tensor], capsys: pytest.CaptureFixture) -> None:
    from dmm_wrap.apps.targets import check_targets
    from dmm_wrap.apps.report import format_targets

    out, _ = smoke_run
    for name in ("metrics.json", "report.md", "tsne.png", "training_curves.png", "history.json", "config.yaml",
                 "model/config.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    for png in ("tsne.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((out / "metrics.json").read_text())
    assert set(data) == {"methods", "wall_seconds", "weights_sha256", "leakage_probes"} and data["wall_seconds"] > 0
    assert data["leakage_probes"] == "probe"  # the default job's data.num_probe split
    assert "probes trained on the probe split" in (out / "report.md").read_text()
    assert list(data["methods"]) == ["raw", "leace", "dmm"]
    for method in data["methods"].values():
        assert set(method) == {"task_accuracy", "leakage"} and isinstance(method["task_accuracy"], float)
        assert set(method["leakage"]) == {"rotation", "width", "site"}
        for entry in method["leakage"].values():
            assert set(entry) == {"metric", "chance", "linear", "mlp"}
        assert method["leakage"]["site"]["metric"] == "balanced_accuracy"
        assert method["leakage"]["site"]["chance"] == pytest.approx(1 / 3)  # 3 sites
        assert method["leakage"]["rotation"]["metric"] == "r2"
    metrics = Metrics.from_dict(data)

    report = (out / "report.md").read_text()
    targets = check_targets(metrics)  # each target's MET / NOT MET line must be the one its numbers give
    assert len(targets) == 5 and f"## Targets ({sum(t.met for t in targets)}/5 met)" in report
    assert format_targets(targets) in report and "![tsne](tsne.png)" in report
    assert json.loads((out / "history.json").read_text())["steps_done"] == 5
    resolved = load_run_config(out / "config.yaml")
    assert resolved.fit.max_steps == 5 and resolved.output_dir == str(out)


def test_smoke_model_loads_and_matches(smoke_run: tuple[Path, torch.Tensor]) -> None:
    out, reference = smoke_run
    model = DebiasedEncoder.from_pretrained(out / "model")
    before = torch.get_num_threads()
    torch.set_num_threads(REFERENCE_THREADS[-1])
    try:
        with torch.no_grad():
            reloaded = model(REFERENCE_INPUT)
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        assert torch.equal(reloaded, reference)  # the reloaded model computes what the trained one did
        # Control: the comparison can fail. The same architecture with fresh heads gives other features.
        fresh = DebiasedEncoder.from_pretrained(out / "model")
        torch.manual_seed(1)
        fresh._build_heads(fresh.feature_dim)
        assert not torch.allclose(fresh(REFERENCE_INPUT), reference, atol=1e-3)
    assert [a.name for a in model.attributes] == ["rotation", "width", "site"]


def test_eval_command_on_saved_model(smoke_run: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
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
        from dmm_wrap.apps.commands import config_overrides as _overrides

        seen["cfg"] = load_run_config(args.config, _overrides(args))
        return 0

    parser = build_parser([Command("fit", "", COMMANDS[0].add_arguments, fake_run)])
    args = parser.parse_args(["fit", DEFAULT, "--output-dir", "o", "--max-steps", "3", "--device", "cpu",
                              "--set", "fit.lr=0.002", "--set", "eval.leace=false"])
    assert args.run(args) == 0
    cfg = seen["cfg"]
    assert (cfg.output_dir, cfg.fit.max_steps, cfg.fit.device) == ("o", 3, "cpu")
    assert cfg.fit.lr == 0.002 and cfg.eval.leace is False
    assert cfg.fit.resume is False and cfg.fit.overwrite_checkpoints is False
    args = parser.parse_args(["fit", DEFAULT, "--resume"])
    assert args.run(args) == 0
    assert (seen["cfg"].fit.resume, seen["cfg"].fit.overwrite_checkpoints) == (True, False)
    args = parser.parse_args(["fit", DEFAULT, "--overwrite"])
    assert args.run(args) == 0
    assert (seen["cfg"].fit.resume, seen["cfg"].fit.overwrite_checkpoints) == (False, True)
    # Every dedicated option of `fit` is one config key: no option is left out of OPTION_KEYS, nor the reverse.
    fit_parser = argparse.ArgumentParser()
    COMMANDS[0].add_arguments(fit_parser)
    fit_options = {a.dest for a in fit_parser._actions if a.option_strings and a.dest not in ("help", "set")}
    assert fit_options == set(OPTION_KEYS) and OPTION_KEYS["overwrite"] == "fit.overwrite_checkpoints"


def test_resume_and_overwrite_together_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", DEFAULT, "--resume", "--overwrite", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmm-wrap: error: fit.resume and fit.overwrite_checkpoints are both True")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as info:  # eval and audit train nothing: they have no --overwrite
        build_parser().parse_args(["eval", str(tmp_path), DEFAULT, "--overwrite"])
    assert info.value.code == 2


BUG_INJECTION = """
import runpy

import dmm_wrap.apps.commands


def broken(*args, **kwargs):
    raise ValueError("injected bug")


dmm_wrap.apps.commands.build_data = broken
runpy.run_module("dmm_wrap", run_name="__main__", alter_sys=True)
"""
"""`python -c BUG_INJECTION ARGS...` is `python -m dmm_wrap ARGS...` with a bug in the data loading of `fit`."""


def test_user_errors_exit_2_in_one_line_but_bugs_show_their_traceback(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import dmm_wrap.apps.commands
    from dmm_wrap.config import ConfigError

    monkeypatch.delenv("DMM_WRAP_TRACEBACK", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("fit:\n  epochs: ten\n")
    out = tmp_path / "out"
    one_line = "dmm-wrap: error: fit.epochs: expected int, got str 'ten'.\n"
    assert main(["fit", str(bad), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == one_line

    fit = ["fit", DEFAULT, "--max-steps", "1", "--output-dir", str(out), "--set", "fit.progress=false",
           "--set", "method=deepminmax"]
    for error in (ConfigError("data.root: injected"), ValueError("injected"), TypeError("injected"),
                  OSError(5, "injected"), FileNotFoundError(2, "injected", "x"), KeyError("injected")):
        def broken(*args: object, error: Exception = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(dmm_wrap.apps.commands, "build_data", broken)
        if isinstance(error, ConfigError):  # control: the patched function is on fit's path, and this is the user's
            assert main(fit) == 2 and capsys.readouterr().err == "dmm-wrap: error: data.root: injected\n"
            continue
        with pytest.raises(type(error)) as info:
            main(fit)
        assert info.value is error and "dmm-wrap: error" not in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setenv("DMM_WRAP_TRACEBACK", "1")  # asked for, a user error shows its traceback too
    with pytest.raises(ConfigError, match=r"^fit\.epochs: expected int, got str 'ten'"):
        main(["fit", str(bad), "--output-dir", str(out)])

    # The same through the interpreter: the exit status and stderr a shell sees.
    env = {k: v for k, v in os.environ.items() if k != "DMM_WRAP_TRACEBACK"} | {"OMP_NUM_THREADS": "1"}
    user = subprocess.run([sys.executable, "-m", "dmm_wrap", "fit", str(bad), "--output-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert (user.returncode, user.stderr, user.stdout) == (2, one_line, "")
    bug = subprocess.run([sys.executable, "-c", BUG_INJECTION, *fit], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bug.returncode == 1, bug.stderr
    assert "Traceback (most recent call last):" in bug.stderr and "dmm-wrap: error" not in bug.stderr
    assert "in fit_and_evaluate" in bug.stderr and bug.stderr.rstrip().endswith("ValueError: injected bug")
    assert not out.exists()


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
            "--set", "method=deepminmax", "--set", "eval.max_samples=64", "--set", "eval.tsne_samples=0",
            "--set", "eval.leace=false"]
    for name in ("a", "b"):
        assert main(["fit", DEFAULT, "--output-dir", str(tmp_path / name), *fast]) == 0
    a, b = (json.loads((tmp_path / n / "history.json").read_text()) for n in ("a", "b"))
    assert a["loss"] == b["loss"], (a["loss"], b["loss"])
    assert a["club"] == b["club"], (a["club"], b["club"])
    wa, wb = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_validation_split_selects_the_saved_model(tmp_path: Path) -> None:
    """data.num_val: the run checks h_theta by a fresh probe every fit.select_every steps, saves the h_theta kept,
    and the report says which step that was."""
    out = tmp_path / "run"
    fast = ["--max-steps", "5", "--set", "fit.stats_batches=2", "--set", "fit.progress=false",
            "--set", "method=deepminmax", "--set", "eval.max_samples=64", "--set", "eval.tsne_samples=0",
            "--set", "eval.leace=false",
            "--set", "data.num_val=64", "--set", "fit.select_every=2"]
    assert main(["fit", DEFAULT, "--output-dir", str(out), *fast]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["select_step"] == [2, 4, 5] and len(history["select_leak"]) == 3
    best = min(range(3), key=lambda i: (history["select_leak"][i], -i))  # ties go to the later step
    assert history["selected_step"] == history["select_step"][best]
    report = (out / "report.md").read_text()
    assert f"kept h_theta from step {history['selected_step']}" in report
    assert "h_theta is the moving average of its weights (ema_decay=0.995)" in report  # the shipped config's
    # The shipped config's validation split; a smoke run generates at most eval.smoke_samples of it.
    from dmm_wrap.apps.build import build_data
    assert build_data(load_run_config(DEFAULT, [])).val.dataset.num_samples == 8192
    assert build_data(load_run_config(DEFAULT, [("fit.max_steps", 5)])).val.dataset.num_samples == 512
    # ... and its probe split (draws of their own), likewise capped in a smoke run; 0 builds none.
    assert build_data(load_run_config(DEFAULT, [])).probe.dataset.num_samples == 8192
    assert build_data(load_run_config(DEFAULT, [("fit.max_steps", 5)])).probe.dataset.num_samples == 512
    assert build_data(load_run_config(DEFAULT, [("data.num_probe", 0)])).probe is None
    # Negative control: without a validation split nothing is selected.
    assert main(["fit", DEFAULT, "--output-dir", str(tmp_path / "plain"), *fast[:-4], "--set", "data.num_val=0"]) == 0
    assert json.loads((tmp_path / "plain" / "history.json").read_text())["selected_step"] is None


def test_image_csv_model_records_the_preprocessing_it_was_trained_with(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from dmm_wrap.apps.cli import build_data, build_model, run_preprocessing
    from dmm_wrap.apps.run_config import load_run_config

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
    # data.val_csv: a validation loader for model selection, read as the training images are; none unless given.
    assert data.val is None
    val = build_data(load_run_config(tmp_path / "run.yaml", [("data.val_csv", str(tmp_path / "a.csv"))])).val
    assert val is not None and torch.equal(val.dataset[1][0], image)
    # data.probe_csv: the leakage probes' split, read likewise, in order; none unless given.
    assert data.probe is None
    probe = build_data(load_run_config(tmp_path / "run.yaml", [("data.probe_csv", str(tmp_path / "a.csv"))])).probe
    assert probe is not None and torch.equal(probe.dataset[1][0], image)


def test_image_csv_eval_split_and_saved_model_use_the_training_vocabulary(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Training sites {A, B, C} are ids 0/1/2; a test CSV holding only {B, C} keeps B=1, C=2 (read alone: 0/1)."""
    import numpy as np
    from PIL import Image

    import dmm_wrap.apps.cli
    import dmm_wrap.apps.commands
    from dmm_wrap.data import ImageCSVDataset

    rng = np.random.default_rng(0)

    def write_csv(name: str, sites: list[str]) -> None:
        rows = ["path,site,label"]
        for i, site in enumerate(sites):
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(tmp_path / f"{name}_{i}.png")
            rows.append(f"{name}_{i}.png,{site},{i % 2}")
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")

    def write_config(name: str, csv: str, test_csv: str) -> str:
        (tmp_path / name).write_text(
            f"data: {{kind: image_csv, root: {tmp_path}, csv: {tmp_path / csv}, test_csv: {tmp_path / test_csv}, "
            "label_column: label, batch_size: 4, image_size: 16, "
            "attributes: [{name: site, kind: categorical, num_classes: 3}]}\n"
            "model: {backbone: 'torchvision:resnet18', layer: layer1}\n")
        return str(tmp_path / name)

    write_csv("train", ["A", "B", "C"] * 4)
    write_csv("test", ["C", "B", "C", "B"])
    write_csv("unseen", ["B", "D", "C"])
    loaded: list[dmm_wrap.apps.cli.RunData] = []
    build_data = dmm_wrap.apps.cli.build_data

    def recording(*args: object, **kwargs: object) -> dmm_wrap.apps.cli.RunData:
        loaded.append(build_data(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(dmm_wrap.apps.commands, "build_data", recording)
    out = tmp_path / "out"
    fast = ["--set", "fit.stats_batches=2", "--set", "fit.progress=false", "--set", "eval.tsne_samples=0"]
    assert main(["fit", write_config("fit.yaml", "train.csv", "test.csv"), "--max-steps", "3",
                 "--output-dir", str(out), *fast]) == 0
    vocabulary = json.loads((out / "model" / "config.json").read_text())["vocabulary"]
    assert vocabulary == {"site": ["A", "B", "C"]}  # class id k is the k-th label: A=0, B=1, C=2
    assert DebiasedEncoder.from_pretrained(out / "model").vocabulary == vocabulary
    (run,) = loaded
    assert run.vocabulary == vocabulary and run.train.dataset.attrs[:, 0].tolist() == [0.0, 1.0, 2.0] * 4
    assert run.test.dataset.attrs[:, 0].tolist() == [2.0, 1.0, 2.0, 1.0]  # the run evaluated on C=2, B=1
    attributes = run.attributes
    again = ImageCSVDataset(tmp_path, tmp_path / "test.csv", attributes, label_column="label", vocabulary=vocabulary)
    assert again.attrs[:, 0].tolist() == [2.0, 1.0, 2.0, 1.0]
    alone = ImageCSVDataset(tmp_path, tmp_path / "test.csv", attributes, label_column="label")
    assert alone.attrs[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]  # control: without the vocabulary the ids shift

    # eval reads both splits with the saved vocabulary, even when its config's training CSV lacks A. The validation
    # CSV is fit's (model selection): eval neither builds nor reads it, so a missing one is no error there.
    assert main(["eval", str(out / "model"), write_config("eval.yaml", "test.csv", "test.csv"),
                 "--output-dir", str(tmp_path / "eval"), *fast, "--set", f"data.val_csv={tmp_path / 'gone.csv'}"]) == 0
    assert [d.attrs[:, 0].tolist() for d in (loaded[-1].train.dataset, loaded[-1].test.dataset)] == [
        [2.0, 1.0, 2.0, 1.0]] * 2
    assert loaded[-1].val is None
    assert (tmp_path / "eval" / "metrics.json").is_file()

    capsys.readouterr()
    assert main(["eval", str(out / "model"), write_config("unseen.yaml", "train.csv", "unseen.csv"),
                 "--output-dir", str(tmp_path / "unseen-out"), *fast]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dmm-wrap: error: CSV {str(tmp_path / 'unseen.csv')!r}: ") and err.count("\n") == 1
    assert ("column 'site', data row 2 has the label 'D', which the training data did not have (its labels: "
            "['A', 'B', 'C'])") in err
    assert not (tmp_path / "unseen-out").exists()


# --------------------------------------------------------------------------- audit and sweep
FAST_EVAL = ["--set", "fit.stats_batches=2", "--set", "fit.progress=false", "--set", "eval.tsne_samples=0"]


def test_audit_command_writes_into_the_model_folder_and_its_card(smoke_run: tuple[Path, torch.Tensor], tmp_path: Path,
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


def test_audit_bad_input_exits_2(smoke_run: tuple[Path, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = smoke_run
    assert main(["audit", str(tmp_path / "no_model"), DEFAULT]) == 2
    err = capsys.readouterr().err
    assert "no_model" in err and err.count("\n") == 1
    assert main(["audit", str(out / "model"), DEFAULT, "--set", "audit.margn=0.1"]) == 2
    assert "audit.margn: unknown key; did you mean 'margin'?" in capsys.readouterr().err


def test_sweep_writes_one_run_per_value_and_the_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", DEFAULT, "fit.lam=0.2,0.8", "--max-steps", "2", "--output-dir", str(tmp_path), *FAST_EVAL,
                 "--set", "eval.max_samples=96", "--set", "method=deepminmax"]) == 0
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
    from dmm_wrap.apps.sweep import Sweep

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


def test_fit_with_the_alignment_head_saves_a_model_that_reloads_and_evaluates(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """method: alignment_head fits `fit_alignment_head` (joint groups: the job has continuous attributes) in one pass
    instead of the training loop: no history, the model reloads with the same outputs, and the report says what
    h_theta is."""
    out = tmp_path / "head"
    status = main(["fit", DEFAULT, "--max-steps", "5", "--output-dir", str(out), *FAST_EVAL,
                   "--set", "method=alignment_head", "--set", "data.num_train=2048", "--set", "data.num_val=0",
                   "--set", "alignment_head.samples=1024", "--set", "alignment_head.clusters=2",
                   "--set", "alignment_head.outliers=0.99"])
    assert status == 0
    assert not (out / "history.json").exists() and (out / "metrics.json").is_file()
    model = DebiasedEncoder.from_pretrained(out / "model")
    assert model.head_config.align_head_groups == [48] and model.head_config.align_head_pieces == [2]  # 3 x 4 x 4
    report = (out / "report.md").read_text()
    assert "alignment head" in report and "beyond its piece's outlier radius keeps its features" in report
    assert torch.isfinite(model.heads.h.alignment.stages[0].radius).any()  # the radius was fitted, saved and loaded
    # eval with the shipped run file (outliers: null) reports what the weights do, not what the run file says
    assert main(["eval", str(out / "model"), DEFAULT, "--output-dir", str(tmp_path / "eval"),
                 "--set", "eval.max_samples=200", "--set", "eval.tsne_samples=0"]) == 0
    assert "outlier radius keeps its features" in (tmp_path / "eval" / "report.md").read_text()
    assert load_run_config(out / "config.yaml").method == "alignment_head"
    assert main(["fit", DEFAULT, "--output-dir", str(tmp_path / "bad"), "--set", "alignment_head.bins=1"]) == 2
    assert not (tmp_path / "bad").exists()
    assert "alignment_head: samples must be >= 2, clusters None or >= 1 and bins >= 2" in capsys.readouterr().err
    assert main(["fit", DEFAULT, "--output-dir", str(tmp_path / "bad"), "--set", "alignment_head.outliers=1.5"]) == 2
    assert "alignment_head: outliers must be None or a quantile in (0, 1]" in capsys.readouterr().err
