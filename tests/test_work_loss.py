"""Work is not lost: Ctrl-C keeps the steps taken, readable checkpoints are never set aside, a new run does not delete
an earlier run's checkpoints, outputs are written atomically (without touching the umask), edited model cards are
kept, and metrics are tied to the weights they describe."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from conftest import make_site_problem, max_abs_diff
from dmm_wrap import Attribute, DebiasedEncoder, FitConfig, TrainingInterrupted
from dmm_wrap.train.checkpoint import CHECKPOINT_FORMAT, Checkpointer, _digest
from dmm_wrap.apps.cli import main
from dmm_wrap.io.hub import push_folder_to_hub
from dmm_wrap.io.serialization import WEIGHTS_NAME, file_sha256

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "synthetic_digits.yaml")


def _model() -> DebiasedEncoder:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
    return DebiasedEncoder(backbone, None, [Attribute("site", "categorical", 3)])


class _Batches:
    """A fixed list of batches, re-iterable; sends `signals` SIGINTs to this process when batch number `at` (counted
    over every pass) is drawn."""

    def __init__(self, at: int | None = None, signals: int = 1) -> None:
        x, _, s = make_site_problem(320, seed=0)
        self.batches = list(zip(x.split(32), s.float()[:, None].split(32)))
        self.at, self.signals, self.drawn = at, signals, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            if self.drawn == self.at:
                for _ in range(self.signals):
                    os.kill(os.getpid(), signal.SIGINT)
            yield batch


def _fit(model: DebiasedEncoder, loader: _Batches, steps: int, **options: Any):
    return model.fit(loader, epochs=100, max_steps=steps, estimator_steps=2, stats_batches=3, progress=False,
                     **options)


# --------------------------------------------------------------------------- 1. Ctrl-C keeps the steps taken
@pytest.mark.parametrize("signals, steps", [(1, 7), (2, 6)], ids=["ctrl-c", "ctrl-c-twice"])
def test_ctrl_c_without_checkpoint_dir_keeps_the_heads_of_the_last_complete_step(signals: int, steps: int) -> None:
    # Draw 7 is the batch of step 6 (3 pre-pass batches are steps 0-2): one Ctrl-C finishes that step, a second
    # one stops before it.
    model = _model()
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        _fit(model, _Batches(at=7, signals=signals), 30)
    stop = info.value
    assert isinstance(stop, KeyboardInterrupt) and stop.signum == signal.SIGINT and stop.checkpoint is None
    assert stop.step == steps and stop.history.steps_done == steps and stop.history.step == list(range(steps))
    reference = _model()
    history = _fit(reference, _Batches(), steps)
    assert history.loss == stop.history.loss
    assert max_abs_diff(model.heads.state_dict(), reference.heads.state_dict()) == 0.0
    control = _model()
    _fit(control, _Batches(), steps - 1)
    assert max_abs_diff(model.heads.state_dict(), control.heads.state_dict()) > 0  # the last step is in it
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back


def test_ctrl_c_with_checkpoint_dir_still_writes_a_checkpoint(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(TrainingInterrupted) as info:
        _fit(model, _Batches(at=7), 30, checkpoint_dir=str(tmp_path), checkpoint_every=100)
    assert info.value.step == 7 and info.value.checkpoint == tmp_path / "checkpoint-000000007.safetensors"
    assert Checkpointer.read(info.value.checkpoint).position.step == 7
    reference = _model()
    _fit(reference, _Batches(), 7)
    assert max_abs_diff(model.heads.state_dict(), reference.heads.state_dict()) == 0.0


# --------------------------------------------------------------------------- 2. only damaged checkpoints set aside
def _two_checkpoints(folder: Path) -> list[Path]:
    _fit(_model(), _Batches(), 13, checkpoint_dir=str(folder), checkpoint_every=5)
    paths = Checkpointer(folder, 5).paths()
    assert [p.name for p in paths] == ["checkpoint-000000013.safetensors", "checkpoint-000000010.safetensors"]
    return paths


def test_transient_read_error_propagates_and_renames_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _two_checkpoints(tmp_path)
    real = Path.read_bytes

    def flaky(self: Path) -> bytes:
        if self.name.startswith("checkpoint-"):
            raise OSError(5, "Input/output error", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", flaky)
    with pytest.raises(OSError, match="Input/output error"):
        Checkpointer(tmp_path, 5).latest()
    with pytest.raises(OSError, match="Input/output error"):
        _fit(_model(), _Batches(), 20, checkpoint_dir=str(tmp_path), checkpoint_every=5, resume=True)
    assert sorted(tmp_path.iterdir()) == sorted(paths)


@pytest.mark.parametrize("same_digest", [True, False], ids=["intact", "other-digest-scheme"])
def test_newer_format_checkpoint_asks_to_upgrade_and_renames_nothing(tmp_path: Path, same_digest: bool) -> None:
    paths = _two_checkpoints(tmp_path)
    newest = paths[0]
    data = newest.read_bytes()
    tensors = load(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    state = json.loads(header["dmm_wrap_checkpoint"])
    state["format"] = CHECKPOINT_FORMAT + 1
    state_json = json.dumps(state)
    digest = _digest(tensors, state_json) if same_digest else "0" * 64
    newest.write_bytes(save(tensors, metadata={**header, "dmm_wrap_checkpoint": state_json, "sha256": digest}))
    with pytest.raises(ValueError, match=r"newer dmm_wrap .*[Uu]pgrade dmm_wrap"):
        Checkpointer(tmp_path, 5).latest()
    with pytest.raises(ValueError, match=r"[Uu]pgrade dmm_wrap"):
        _fit(_model(), _Batches(), 20, checkpoint_dir=str(tmp_path), checkpoint_every=5, resume=True)
    assert sorted(tmp_path.iterdir()) == sorted(paths)


# --------------------------------------------------------------------------- 3. a new run keeps earlier checkpoints
def test_new_run_refuses_a_folder_with_checkpoints_unless_told(tmp_path: Path) -> None:
    paths = _two_checkpoints(tmp_path)
    expected = rf"{re.escape(str(tmp_path))}.*resume=True.*overwrite_checkpoints=True"
    with pytest.raises(ValueError, match=expected) as info:
        _fit(_model(), _Batches(), 3, checkpoint_dir=str(tmp_path), checkpoint_every=5)
    assert "--overwrite" in str(info.value) and "--resume" in str(info.value)
    assert sorted(tmp_path.iterdir()) == sorted(paths)  # nothing deleted, nothing trained into it
    with pytest.warns(UserWarning, match="will be removed"):
        _fit(_model(), _Batches(), 3, checkpoint_dir=str(tmp_path), checkpoint_every=5, overwrite_checkpoints=True)
    assert [p.name for p in Checkpointer(tmp_path, 5).paths()] == ["checkpoint-000000003.safetensors"]
    with pytest.raises(ValueError, match="resume.*overwrite_checkpoints"):
        FitConfig(resume=True, overwrite_checkpoints=True)
    with pytest.raises(ValueError, match="FitConfig.overwrite_checkpoints"):
        FitConfig(overwrite_checkpoints="yes")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """A short CLI fit; returns its folder, its options and the names os.replace moved into it."""
    out = tmp_path_factory.mktemp("run")
    common = ["--max-steps", "2", "--output-dir", str(out), "--set", "fit.progress=false", "--set", "method=deepminmax",
              "--set",
              "fit.stats_batches=2", "--set", "eval.max_samples=64", "--set", "eval.smoke_samples=64", "--set",
              "eval.tsne_samples=0", "--set", "eval.leace=false"]
    replaced: list[str] = []
    real = os.replace

    def recording(src: Any, dst: Any) -> None:
        if Path(src).parent == Path(dst).parent == out:
            replaced.append(Path(dst).name)
        real(src, dst)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "replace", recording)
    try:
        assert main(["fit", DEFAULT, *common]) == 0
    finally:
        mp.undo()
    return out, common, replaced


def test_cli_fit_refuses_a_folder_with_checkpoints_and_overwrite_allows_it(cli_run, capsys) -> None:
    out, common, _ = cli_run
    before = sorted((out / "checkpoints").iterdir())
    assert main(["fit", DEFAULT, *common]) == 2
    err = capsys.readouterr().err
    assert str(out / "checkpoints") in err and "--resume" in err and "--overwrite" in err
    assert sorted((out / "checkpoints").iterdir()) == before
    with pytest.warns(UserWarning, match="will be removed"):
        assert main(["fit", DEFAULT, *common, "--max-steps", "1", "--overwrite"]) == 0
    assert [p.name for p in Checkpointer(out / "checkpoints", 5).paths()] == ["checkpoint-000000001.safetensors"]


# --------------------------------------------------------------------------- 4. atomic outputs, stale temp folders
def test_cli_outputs_are_moved_into_place_whole(cli_run) -> None:
    out, _, replaced = cli_run
    assert {"history.json", "metrics.json", "report.md", "config.yaml"} <= set(replaced)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_an_interrupted_text_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmm_wrap.apps.evaluate import Metrics
    from dmm_wrap.io.serialization import write_text_atomically
    from dmm_wrap.apps.report import write_report
    from dmm_wrap.apps.run_config import RunConfig, write_run_config

    writers = {"metrics.json": lambda p: Metrics({}, 1.0).write(p),
               "report.md": lambda p: write_report(p, Metrics(), []),  # render_report is replaced below
               "config.yaml": lambda p: write_run_config(RunConfig(), p),
               "notes.txt": lambda p: write_text_atomically(p, "new\n")}
    for name in writers:
        (tmp_path / name).write_text("old\n")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dmm_wrap.apps.report.render_report", lambda *args: "new\n")
    monkeypatch.setattr(os, "fsync", disk_full)
    for name, write in writers.items():
        with pytest.raises(OSError, match="No space left"):
            write(tmp_path / name)
        assert (tmp_path / name).read_text() == "old\n", name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)  # no temp file left behind


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_killed_saves_are_cleaned(tmp_path: Path) -> None:
    from dmm_wrap.io.serialization import _host_tag

    host = _host_tag()
    stale = [f".model.tmp-{host}-{_dead_pid()}-abcd1234", f".other.tmp-{host}-{_dead_pid()}-x_z9abcd",
             ".model.tmp-q1w2e3r4"]  # the last one: the name an older dmm_wrap gave, left long ago
    kept = [f".model.tmp-{host}-{os.getpid()}-abcd1234",  # a save in progress in this process
            ".model.tmp-fresh123",  # an older dmm_wrap's save, perhaps still running
            ".model.tmp-notours", "model.tmp-abcd1234", f".model.tmp-{'f' * 8}-{_dead_pid()}-abcd1234"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    old = time.time() - 2 * 86400
    os.utime(tmp_path / ".model.tmp-q1w2e3r4", (old, old))
    model = _model()
    _fit(model, _Batches(), 2)
    model.save_pretrained(tmp_path / "model")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == set(kept) | {"model"}


# --------------------------------------------------------------------------- 5. permissions without os.umask
def test_saved_files_get_the_umask_mode_without_calling_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmm_wrap.io.serialization import write_text_atomically

    previous = os.umask(0o027)
    try:
        def forbidden(mask: int) -> int:
            raise AssertionError("os.umask changes the mask of every thread of the process")

        monkeypatch.setattr(os, "umask", forbidden)
        model = _model()
        _fit(model, _Batches(), 3, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=5)
        model.save_pretrained(tmp_path / "model", metrics={"acc": 0.5})
        write_text_atomically(tmp_path / "history.json", "{}\n")
        files = [*(tmp_path / "ckpt").iterdir(), *(tmp_path / "model").iterdir(), tmp_path / "history.json"]
        assert len(files) == 1 + 4 + 1
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o640) for p in files}
    finally:
        monkeypatch.undo()
        os.umask(previous)


# --------------------------------------------------------------------------- 6. model cards
def test_save_pretrained_keeps_an_edited_card_and_refreshes_its_own(tmp_path: Path) -> None:
    model = _model()
    _fit(model, _Batches(), 2)
    model.save_pretrained(tmp_path, metrics={"acc": 0.5})
    assert "| acc | 0.5 |" in (tmp_path / "README.md").read_text()
    model.save_pretrained(tmp_path, metrics={"acc": 0.75})  # our own card: regenerated with the new metrics
    card = (tmp_path / "README.md").read_text()
    assert "| acc | 0.75 |" in card and "weights_sha256" not in card
    (tmp_path / "README.md").write_text(card.replace("# DeepMinMax", "# My encoder"))
    edited = (tmp_path / "README.md").read_text()
    with pytest.warns(UserWarning, match="README.md was edited"):
        model.save_pretrained(tmp_path, metrics={"acc": 0.8})
    assert (tmp_path / "README.md").read_text() == edited
    assert json.loads((tmp_path / "metrics.json").read_text())["acc"] == 0.8


class _Api:
    """The HfApi calls of a push, with a Hub repo that does or does not hold a README.md."""

    def __init__(self, has_readme: bool) -> None:
        self.has_readme = has_readme
        self.checked: list[tuple[Any, ...]] = []
        self.uploaded: list[str] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        pass

    def file_exists(self, repo_id: str, filename: str, **kwargs: Any) -> bool:
        self.checked.append((repo_id, filename, kwargs.get("revision")))
        return self.has_readme

    def upload_folder(self, **kwargs: Any) -> Any:
        folder, allowed = Path(kwargs["folder_path"]), kwargs["allow_patterns"]
        self.uploaded = sorted(p.name for p in folder.iterdir() if p.name in allowed)
        return SimpleNamespace(commit_url="https://huggingface.co/org/m/commit/abc", pr_url=None)


@pytest.mark.parametrize("has_readme", [True, False])
def test_push_does_not_upload_our_card_over_the_hub_one(tmp_path: Path, has_readme: bool) -> None:
    model = _model()
    _fit(model, _Batches(), 2)
    model.save_pretrained(tmp_path)
    api = _Api(has_readme)
    push_folder_to_hub(tmp_path, "org/m", revision="v1", api=api)
    assert api.checked == [("org/m", "README.md", "v1")]
    assert ("README.md" in api.uploaded) is not has_readme
    assert {"config.json", "model.safetensors"} <= set(api.uploaded)
    api = _Api(has_readme)
    model.push_to_hub("org/m", api=api)
    assert ("README.md" in api.uploaded) is not has_readme


# --------------------------------------------------------------------------- 7. metrics tied to the weights
def test_metrics_record_the_weights_and_stale_ones_stay_out_of_cards(tmp_path: Path) -> None:
    model = _model()
    _fit(model, _Batches(), 2)
    model.save_pretrained(tmp_path, metrics={"acc": 0.5})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {"acc": 0.5, "weights_sha256": file_sha256(tmp_path / WEIGHTS_NAME)}
    _fit(model, _Batches(), 4)  # other weights; the folder's metrics.json describes the old ones
    with pytest.warns(UserWarning, match="metrics.json records other weights"):
        model.save_pretrained(tmp_path)
    assert "| acc |" not in (tmp_path / "README.md").read_text()
    api = _Api(has_readme=False)
    with pytest.warns(UserWarning, match="metrics.json records other weights"):
        push_folder_to_hub(tmp_path, "org/m", api=api)
    assert "metrics.json" not in api.uploaded
    with pytest.raises(ValueError, match="metrics.*other weights"):
        push_folder_to_hub(tmp_path, "org/m", api=_Api(False), metrics=metrics)


def test_cli_metrics_record_the_model_weights_and_push_checks_them(cli_run, monkeypatch, capsys) -> None:
    out, _, _ = cli_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights_sha256"] == file_sha256(out / "model" / WEIGHTS_NAME)
    api = _Api(has_readme=False)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda **kwargs: api)
    assert main(["push", str(out), "org/m"]) == 0
    assert "metrics.json" in api.uploaded
    (out / "metrics.json").write_text(json.dumps({**metrics, "weights_sha256": "0" * 64}))
    assert main(["push", str(out), "org/m"]) == 2
    assert "other weights" in capsys.readouterr().err
