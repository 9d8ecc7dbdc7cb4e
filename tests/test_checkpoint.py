"""Checkpoint and resume: a killed run continues to the same result as an uninterrupted one; damaged checkpoints are
detected and the previous one used; nothing is unpickled."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from conftest import loader_of, make_site_problem, max_abs_diff
from dmm_wrap import Attribute, DebiasedEncoder
from dmm_wrap.train.checkpoint import Checkpointer, capture_rng, restore_rng
from dmm_wrap.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "resumable_fit.py"
STEPS = 45
GATE = 12


def _model() -> DebiasedEncoder:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
    return DebiasedEncoder(backbone, None, [Attribute("site", "categorical", 3)])


def _loader() -> DataLoader:
    x, _, s = make_site_problem(320, seed=0)
    return loader_of(x, s.float()[:, None], batch_size=32, shuffle=True)


def _fit(model: DebiasedEncoder, folder: Path, steps: int, **options) -> object:
    return model.fit(_loader(), epochs=100, max_steps=steps, estimator_steps=2, stats_batches=3, progress=False,
                     checkpoint_dir=str(folder), checkpoint_every=5, **options)


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--steps", str(STEPS), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, torch.Tensor]]:
    """Heads after an uninterrupted scripted run of STEPS steps, per number of loader workers."""
    heads = {}
    for workers in (0, 2):
        out = tmp_path_factory.mktemp(f"full{workers}")
        run = _run(out, "--workers", str(workers))
        assert run.returncode == 0, run.stderr
        assert f"steps_done {STEPS} logged {STEPS}" in run.stdout
        heads[workers] = load_file(out / "heads.safetensors")
    return heads


def _stop_at_gate(out: Path, sig: int, workers: int = 0, group: bool = False) -> subprocess.CompletedProcess:
    """Start the scripted run, wait until it blocks before the forward of step GATE, send `sig` (to the whole
    process group, workers included, with `group`), then let it continue."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--steps", str(STEPS), "--gate-at",
                             str(GATE), "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "waiting").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the gate"
        time.sleep(0.02)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    time.sleep(0.2)  # let the signal land before the step goes on
    (out / "release").write_text("")
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _resume(out: Path, workers: int = 0) -> None:
    run = _run(out, "--resume", "--workers", str(workers))
    assert run.returncode == 0, run.stderr
    assert f"steps_done {STEPS} logged {STEPS}" in run.stdout


def _checkpoint_steps(folder: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in Checkpointer(folder, 5).paths()]


def test_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path: Path) -> None:
    stopped = _stop_at_gate(tmp_path, signal.SIGKILL)
    assert stopped.returncode == -signal.SIGKILL
    assert _checkpoint_steps(tmp_path / "checkpoints") == [10, 5]  # killed during step 12: periodic ones only
    _resume(tmp_path)
    # Same data order, same RNG draws for the noise augmentation, same optimiser state: the same weights.
    assert max_abs_diff(load_file(tmp_path / "heads.safetensors"), uninterrupted[0]) == 0.0


@pytest.mark.parametrize("workers, group", [(0, False), (2, True)], ids=["process", "group-with-workers"])
def test_sigterm_writes_a_checkpoint_after_the_current_step_then_resumes(uninterrupted, tmp_path: Path,
                                                                         workers: int, group: bool) -> None:
    stopped = _stop_at_gate(tmp_path, signal.SIGTERM, workers, group)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    # The step in progress (index GATE) finishes, then the checkpoint is written: GATE + 1 steps done. With the
    # signal sent to the whole group, the loader's workers ignore it and the main process stops cleanly.
    assert f"interrupted at step {GATE + 1}" in stopped.stdout
    assert _checkpoint_steps(tmp_path / "checkpoints") == [GATE + 1, 10]
    assert not list((tmp_path / "checkpoints").glob(".checkpoint-*"))  # no temporary file left behind
    _resume(tmp_path, workers)
    assert max_abs_diff(load_file(tmp_path / "heads.safetensors"), uninterrupted[workers]) == 0.0


class _NoisySites(torch.utils.data.Dataset):
    """Samples with noise from the torch RNG: a resume matches only if the data's random draws are replayed."""

    def __init__(self) -> None:
        self.x, _, s = make_site_problem(320, seed=0)
        self.attrs = s.float()[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.05 * torch.randn(16), self.attrs[i]


@pytest.mark.parametrize("stop", [2, 5], ids=["inside-the-pre-pass", "after-it"])
def test_resume_in_epoch_zero_replays_the_pre_pass_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            stop: int) -> None:
    # Epoch 0 starts with the 3 statistics batches, read ahead (the first also sizes the lazily built heads) and
    # trained on as steps 0-2. A resume at step `stop` of epoch 0 replays the epoch's draws without running them.
    def fit(model: DebiasedEncoder, folder: Path, steps: int, **options) -> None:
        loader = DataLoader(_NoisySites(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
        model.fit(loader, epochs=100, max_steps=steps, estimator_steps=2, stats_batches=3, progress=False,
                  checkpoint_dir=str(folder), checkpoint_every=5, **options)

    full = _model()
    fit(full, tmp_path / "full", 14)
    fit(_model(), tmp_path / "part", stop)
    resumed = _model()  # a new process would build its heads anew too
    fit(resumed, tmp_path / "part", 14, resume=True)
    assert max_abs_diff(resumed.heads.state_dict(), full.heads.state_dict()) == 0.0
    # Control: if building the heads drew from the torch RNG between epoch 0's batches, the replay would not line up.
    monkeypatch.setattr(torch.random, "fork_rng", lambda **kwargs: contextlib.nullcontext())
    drawing = _model()
    fit(drawing, tmp_path / "drawing", stop)
    fit(drawing, tmp_path / "drawing", 14, resume=True)
    unreplayed = _model()
    fit(unreplayed, tmp_path / "unreplayed", 14)
    assert max_abs_diff(drawing.heads.state_dict(), unreplayed.heads.state_dict()) > 0.0


def test_resume_in_process_matches_and_counts_steps(tmp_path: Path) -> None:
    full = _model()
    history = _fit(full, tmp_path / "a", 23)
    assert history.steps_done == 23
    resumed = _model()
    _fit(resumed, tmp_path / "b", 12)
    history = _fit(resumed, tmp_path / "b", 23, resume=True)
    assert history.steps_done == 23 and history.step == list(range(23))
    assert max_abs_diff(resumed.heads.state_dict(), full.heads.state_dict()) == 0.0
    # Already at max_steps: resuming trains nothing and changes nothing.
    again = _model()
    history = _fit(again, tmp_path / "b", 23, resume=True)
    assert history.steps_done == 23 and max_abs_diff(again.heads.state_dict(), full.heads.state_dict()) == 0.0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path, damage: str) -> None:
    reference = _model()
    _fit(reference, tmp_path / "ref", 20)
    model = _model()
    _fit(model, tmp_path / "run", 13)  # checkpoints at 10 and 13 (the end)
    ckpt = Checkpointer(tmp_path / "run", 5)
    newest, previous = ckpt.paths()
    assert newest.name.endswith("13.safetensors") and previous.name.endswith("10.safetensors")
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-100] ^= 0xFF  # inside the tensor data: the header still parses, the sha256 does not match
        newest.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated|corrupted"):
        Checkpointer.read(newest)
    resumed = _model()
    with pytest.warns(UserWarning, match=f"Skipping checkpoint {newest.name}"):
        history = _fit(resumed, tmp_path / "run", 20, resume=True)
    assert history.steps_done == 20 and history.step == list(range(20))
    assert max_abs_diff(resumed.heads.state_dict(), reference.heads.state_dict()) == 0.0
    # The damaged file is kept aside for inspection, out of the rotation of the newest two.
    assert (tmp_path / "run" / f"{newest.name}.corrupt").is_file()
    assert _checkpoint_steps(tmp_path / "run") == [20, 15]


def test_resume_errors_and_fresh_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        _model().fit(_loader(), max_steps=2, progress=False, resume=True)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):  # before any training step is spent
        _fit(_model(), tmp_path / "a-file", 3)
    with pytest.warns(UserWarning, match="holds no checkpoint; starting from scratch"):
        assert _fit(_model(), tmp_path / "empty", 3, resume=True).steps_done == 3

    _fit(_model(), tmp_path / "run", 10)
    other = DebiasedEncoder(_model().backbone, None, [Attribute("site", "categorical", 4)])
    with pytest.raises(ValueError, match=r"Cannot resume .* attributes: checkpoint"):
        _fit(other, tmp_path / "run", 12, resume=True)
    wider = _model()
    wider.head_config.h_layers = 2
    with pytest.raises(ValueError, match="run differs in head"):
        _fit(wider, tmp_path / "run", 12, resume=True)

    for path in Checkpointer(tmp_path / "run", 5).paths():
        path.write_bytes(b"\x80\x04not a safetensors file")  # e.g. a pickle under the right name: never loaded
    with pytest.raises(ValueError, match="None of the 2 checkpoint"), pytest.warns(UserWarning):
        _fit(_model(), tmp_path / "run", 12, resume=True)
    # A new run in the folder is refused; told to overwrite, it removes the earlier run's checkpoints, which a later
    # resume would otherwise pick up.
    _fit(_model(), tmp_path / "higher", 15)
    with pytest.raises(ValueError, match="holds 2 checkpoint"):
        _fit(_model(), tmp_path / "higher", 5)
    with pytest.warns(UserWarning, match=r"the 2 checkpoint\(s\) of an earlier run .* will be removed"):
        _fit(_model(), tmp_path / "higher", 5, overwrite_checkpoints=True)
    assert [p.name for p in Checkpointer(tmp_path / "higher", 5).paths()] == ["checkpoint-000000005.safetensors"]


def test_other_process_count_and_failed_writes_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmm_wrap.train import resume as trainer

    with monkeypatch.context() as m:
        m.setattr(trainer, "world_size", lambda: 2)  # the checkpoint records 2 processes
        m.setattr(trainer, "all_gather_object", lambda obj: [obj, obj])
        _fit(_model(), tmp_path / "two", 5)
    with pytest.raises(ValueError, match="world_size: checkpoint 2 vs now 1"):
        _fit(_model(), tmp_path / "two", 10, resume=True)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    model = _model()
    model.fit(_loader(), max_steps=1, progress=False)
    before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    monkeypatch.setattr(Checkpointer, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _fit(model, tmp_path / "full", 6)
    assert max_abs_diff(model.heads.state_dict(), before) == 0.0  # fit is all-or-nothing


def test_persistent_workers_are_warned_about(tmp_path: Path) -> None:
    x, _, s = make_site_problem(64, seed=0)
    loader = DataLoader(torch.utils.data.TensorDataset(x, s.float()[:, None]), batch_size=32, num_workers=1,
                        persistent_workers=True)
    with pytest.warns(UserWarning, match="persistent_workers=True"):
        _model().fit(loader, max_steps=2, progress=False, checkpoint_dir=str(tmp_path))


def test_rng_capture_and_restore_round_trip() -> None:
    loader = _loader()
    state = capture_rng(loader)
    json.dumps(state)  # stored as JSON in the checkpoint's metadata

    def draws() -> tuple:
        return (torch.rand(3).tolist(), torch.rand(2, generator=loader.generator).tolist(), random.random(),
                np.random.rand(), [b[0].sum().item() for b, _ in zip(loader, range(2))])

    first = draws()
    restore_rng(state, loader)
    assert draws() == first
    with pytest.raises(ValueError, match="DataLoader generator"):
        restore_rng(state, DataLoader(list(range(4))))


def test_cli_resume_continues_the_run(tmp_path: Path) -> None:
    config = str(ROOT / "configs" / "synthetic_digits.yaml")
    common = ["--output-dir", str(tmp_path), "--set", "fit.progress=false", "--set", "fit.checkpoint_every=2",
              "--set", "method=deepminmax",
              "--set", "eval.tsne_samples=0", "--set", "eval.smoke_samples=128"]
    assert main(["fit", config, "--max-steps", "2", *common]) == 0
    assert [p.name for p in Checkpointer(tmp_path / "checkpoints", 2).paths()] == ["checkpoint-000000002.safetensors"]
    assert main(["fit", config, "--max-steps", "4", "--resume", *common]) == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["steps_done"] == 4 and history["step"] == [0, 1, 2, 3]
    assert os.path.isfile(tmp_path / "checkpoints" / "checkpoint-000000004.safetensors")
