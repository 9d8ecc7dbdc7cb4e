"""Data-parallel training: 2 processes under torchrun (gloo on 127.0.0.1) end with identical heads on both ranks and
take the same steps as one process with the same global batch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import max_abs_diff
from dmm_wrap.apps.digits import SyntheticDigits

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_fit.py"
TOLERANCE = 1e-4
"""Max |difference| of any head weight after 24 steps, 2 ranks x 32 vs 1 process x 64 (measured about 3e-6: float
rounding of the all-reduce and the concatenated batch); a run with another batch differs by about 0.3."""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(nproc: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    if check:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _single(*args: str) -> None:
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    assert run.returncode == 0, run.stderr[-3000:]


def test_two_gloo_ranks_agree_and_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    _torchrun(2, str(SCRIPT), "--out", str(tmp_path / "ddp"), "--batch-size", "32")
    _single(str(SCRIPT), "--out", str(tmp_path / "one"), "--batch-size", "64")
    _single(str(SCRIPT), "--out", str(tmp_path / "small"), "--batch-size", "32")
    rank0, rank1 = (load_file(tmp_path / "ddp" / f"heads-rank{r}.safetensors") for r in (0, 1))
    one = load_file(tmp_path / "one" / "heads-rank0.safetensors")
    small = load_file(tmp_path / "small" / "heads-rank0.safetensors")

    assert max_abs_diff(rank0, rank1) == 0.0  # DDP: both ranks apply the same averaged gradients
    assert max_abs_diff(rank0, one) < TOLERANCE
    # Negative control: the per-rank batch alone is a different run, far outside the tolerance.
    assert max_abs_diff(rank0, small) > 100 * TOLERANCE

    histories = [json.loads((tmp_path / d / "history-rank0.json").read_text()) for d in ("ddp", "one")]
    assert histories[0]["steps_done"] == histories[1]["steps_done"] == 24
    # The logged losses are the global batch's (CLUB's negatives drawn from both ranks), as in one process.
    for key in ("loss", "debias", "retain", "q_nll"):
        assert histories[0][key] == pytest.approx(histories[1][key], abs=1e-4)


def test_alignment_target_is_the_same_on_both_ranks(tmp_path: Path) -> None:
    # Rank 0 fits the target on both ranks' gathered pre-pass samples (and refits it every 5 steps) and sends it to
    # rank 1: both ranks hold the same target, fitted on the global sample, in every round.
    common = ["--steps", "12", "--align-weight", "10.0"]
    _torchrun(2, str(SCRIPT), "--out", str(tmp_path / "ddp"), "--batch-size", "32", *common)
    for round_ in range(3):  # round 0, then refits at steps 5 and 10
        rank0, rank1 = (load_file(tmp_path / "ddp" / f"align-rank{r}-{round_}.safetensors") for r in (0, 1))
        assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
        assert rank0["sample_z"].shape[0] == 2 * 4 * 32  # both ranks' 4 statistics batches of 32
        assert rank0["alignment.stages.0.centroids"].abs().sum() > 0
    first, second = (load_file(tmp_path / "ddp" / f"align-rank0-{n}.safetensors") for n in (0, 1))
    assert not torch.equal(first["alignment.stages.0.target_mean"], second["alignment.stages.0.target_mean"])
    history = json.loads((tmp_path / "ddp" / "history-rank0.json").read_text())
    assert min(history["align"]) > 0


def test_model_selection_over_two_ranks(tmp_path: Path) -> None:
    # Rank 0 scores each check on the gathered sample; every rank keeps the same step and ends with the same heads.
    _torchrun(2, str(SCRIPT), "--out", str(tmp_path / "ddp"), "--batch-size", "32", "--steps", "12", "--select")
    heads = [load_file(tmp_path / "ddp" / f"heads-rank{r}.safetensors") for r in (0, 1)]
    assert max_abs_diff(heads[0], heads[1]) == 0.0
    history = [json.loads((tmp_path / "ddp" / f"history-rank{r}.json").read_text()) for r in (0, 1)]
    assert history[0]["select_step"] == history[1]["select_step"] == [6, 12]
    assert history[0]["select_leak"] == history[1]["select_leak"]
    best = max(i for i, v in enumerate(history[0]["select_leak"]) if v == min(history[0]["select_leak"]))
    assert history[0]["selected_step"] == history[1]["selected_step"] == history[0]["select_step"][best]


def test_matching_term_over_two_ranks_matches_one_process(tmp_path: Path) -> None:
    # The group-matching term gathers the projected Z~ of both ranks: its groups and quantiles are the global batch's.
    common = ["--steps", "12", "--match-weight", "1.0"]
    _torchrun(2, str(SCRIPT), "--out", str(tmp_path / "ddp"), "--batch-size", "32", *common)
    _single(str(SCRIPT), "--out", str(tmp_path / "one"), "--batch-size", "64", *common)
    _single(str(SCRIPT), "--out", str(tmp_path / "off"), "--batch-size", "64", "--steps", "12")
    rank0 = load_file(tmp_path / "ddp" / "heads-rank0.safetensors")
    one = load_file(tmp_path / "one" / "heads-rank0.safetensors")
    off = load_file(tmp_path / "off" / "heads-rank0.safetensors")
    assert max_abs_diff(rank0, one) < TOLERANCE
    assert max_abs_diff(one, off) > 100 * TOLERANCE  # control: the term changes training
    histories = [json.loads((tmp_path / d / "history-rank0.json").read_text()) for d in ("ddp", "one")]
    assert min(histories[1]["match"]) > 0
    assert histories[0]["match"] == pytest.approx(histories[1]["match"], abs=1e-4)


@pytest.mark.parametrize("gate, held", [(6, 6), (19, 18)], ids=["epoch-0", "epoch-1"])
def test_signalled_two_rank_run_resumes_to_the_uninterrupted_result(tmp_path: Path, gate: int, held: int) -> None:
    # Shuffled, noise-augmented shards of unequal length (rank 1 has 15 batches per epoch, rank 0 16): the resumed
    # run only matches if each rank's RNG, position and the shared end-of-epoch are all restored. In epoch 0 the
    # replay also runs through the 4 statistics batches, read ahead and trained on as steps 0-3.
    common = [str(SCRIPT), "--batch-size", "32", "--steps", "28", "--shuffle", "--uneven", "40"]
    _torchrun(2, *common, "--out", str(tmp_path / "full"), "--checkpoint-dir", str(tmp_path / "full-ckpt"))
    part, ckpt = tmp_path / "part", tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *common,
           "--out", str(part), "--checkpoint-dir", str(ckpt), "--gate-at", str(gate)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    deadline = time.monotonic() + 120
    # Rank 0 holds in its backbone call number gate + 1, one per batch read, that of step `held`. In epoch 1 that is
    # step 18 (batch 3), because its 16th batch of epoch 0 was read and dropped when rank 1's shard ran out.
    while not (part / "waiting").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the gate"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
    time.sleep(0.5)
    (part / "release").write_text("")
    stdout, stderr = proc.communicate(timeout=120)
    # Both ranks print to one pipe, so their lines may interleave: match the reports, not lines.
    stops = sorted(re.findall(r"rank (\d) interrupted at step (\d+)", stdout))
    assert [r for r, _ in stops] == ["0", "1"], stdout + stderr[-3000:]
    step = int(stops[0][1])
    assert stops[1][1] == stops[0][1]  # both ranks stop after the same step
    assert step in (held + 1, held + 2)  # the step in progress, and at most one more while the ranks agree on the stop
    assert (ckpt / f"checkpoint-{step:09d}.safetensors").is_file()

    _torchrun(2, *common, "--out", str(part), "--checkpoint-dir", str(ckpt), "--resume")
    for r in (0, 1):
        resumed = load_file(part / f"heads-rank{r}.safetensors")
        assert max_abs_diff(resumed, load_file(tmp_path / "full" / f"heads-rank{r}.safetensors")) == 0.0
    history = json.loads((part / "history-rank0.json").read_text())
    assert history["steps_done"] == 28 and history["step"] == list(range(28))


def test_uneven_shards_end_each_epoch_together(tmp_path: Path) -> None:
    # Rank 1 has 40 samples fewer: 15 batches of 32 against rank 0's 16. Every rank ends each epoch after 15.
    _torchrun(2, str(SCRIPT), "--batch-size", "32", "--steps", "100", "--epochs", "2", "--uneven", "40",
              "--out", str(tmp_path))
    histories = [json.loads((tmp_path / f"history-rank{r}.json").read_text()) for r in (0, 1)]
    assert histories[0]["steps_done"] == histories[1]["steps_done"] == 30
    rank0, rank1 = (load_file(tmp_path / f"heads-rank{r}.safetensors") for r in (0, 1))
    assert max_abs_diff(rank0, rank1) == 0.0


def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path: Path) -> None:
    run = _torchrun(2, str(SCRIPT), "--batch-size", "32", "--steps", "24", "--nan-at", "601", "--out", str(tmp_path),
                    check=False)
    assert run.returncode != 0
    assert "NaN or infinite features" in run.stderr  # rank 1's own error
    assert "another process failed" in run.stderr  # rank 0 stops too instead of waiting for rank 1


def test_torchrun_cli_trains_on_shards_and_only_rank0_writes(tmp_path: Path) -> None:
    common = ["fit", "configs/synthetic_digits.yaml", "--max-steps", "3", "--set", "fit.progress=false",
              "--set", "method=deepminmax",
              "--set", "eval.tsne_samples=0", "--set", "eval.smoke_samples=128", "--set", "fit.checkpoint_every=2"]
    run = _torchrun(2, "-m", "dmm_wrap", *common, "--output-dir", str(tmp_path / "ddp"))
    assert run.stdout.count("Wall time") == 1  # only rank 0 evaluates and prints
    _single("-m", "dmm_wrap", *common, "--output-dir", str(tmp_path / "one"), "--set", "data.batch_size=256")
    ddp = json.loads((tmp_path / "ddp" / "history.json").read_text())
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    assert ddp["steps_done"] == one["steps_done"] == 3
    assert ddp["loss"] == pytest.approx(one["loss"], abs=1e-4)  # 2 x 128 on shards == 1 x 256
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "checkpoint-000000002.safetensors", "checkpoint-000000003.safetensors"]
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()


def test_synthetic_digits_shards_are_equal_interleaved_parts() -> None:
    ds = SyntheticDigits("train", 203, image_size=16)
    shards = [ds.shard(3, r) for r in range(3)]
    assert [len(s) for s in shards] == [67, 67, 67]  # 203 // 3; the last 2 samples are dropped
    whole = ds.generate()
    for r, shard in enumerate(shards):
        attrs = torch.stack([a for _, a, _ in shard])
        torch.testing.assert_close(attrs, whole.attrs[r:201:3])
    assert len(ds) == 203  # shard() returns a copy
    with pytest.raises(ValueError, match="index < num_shards"):
        ds.shard(3, 3)
    with pytest.raises(ValueError, match="num_shards must be an int"):
        ds.shard(2.0, 0)


def test_unsharded_loader_warns_and_cuda_without_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from dmm_wrap import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    dataset = TensorDataset(torch.zeros(8, 2))
    with pytest.warns(UserWarning, match="every rank sees the same samples"):
        distributed.check_sharded(DataLoader(dataset, batch_size=4, shuffle=True))
    sharded = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=2, rank=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distributed.check_sharded(sharded)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        distributed.init_from_env("cuda")


def test_pair_sums_of_the_halves_give_the_whole_batch_club() -> None:
    """What each rank computes with the summed pair sums, averaged over 2 ranks, is the global batch's CLUB."""
    from dmm_wrap import Attribute, HeadConfig
    from dmm_wrap.core.objective import DeepMinMax

    torch.manual_seed(0)
    heads = DeepMinMax(6, (Attribute("site", "categorical", 3), Attribute("level", "continuous")), HeadConfig())
    z = torch.randn(64, 6)
    b = torch.stack([torch.randint(0, 3, (64,)).float(), torch.randn(64)], 1)
    whole = heads.theta_losses(z, heads.h(z), b, 0.5, "mean")
    halves = (slice(0, 32), slice(32, 64))
    sums = sum(heads.pair_sums(b[h]) for h in halves)
    parts = [heads.theta_losses(z[h], heads.h(z[h]), b[h], 0.5, "mean", sums, lambda t: t) for h in halves]
    for name in whole.club:
        torch.testing.assert_close((parts[0].club[name] + parts[1].club[name]) / 2, whole.club[name])
    torch.testing.assert_close((parts[0].retain + parts[1].retain) / 2, whole.retain)
    # Local negatives (each half on its own) are a different, noisier estimate: the control.
    local = [heads.theta_losses(z[h], heads.h(z[h]), b[h], 0.5, "mean") for h in halves]
    assert abs((local[0].club["site"] + local[1].club["site"]).item() / 2 - whole.club["site"].item()) > 1e-5
