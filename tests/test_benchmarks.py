"""benchmarks/bench.py --smoke runs end to end and reports every ratio; no timing is asserted, but the memory
ratio must tell a fit that caches its features (the negative control) from the real one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
RATIOS = ("fit_overhead", "early_exit", "stream_memory", "stream_memory_control", "inference_overhead",
          "inference_module_overhead")


@pytest.mark.slow
def test_smoke_reports_all_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out_json.read_text())
    for name in RATIOS:
        value = result["ratios"][name]
        assert math.isfinite(value) and value > 0, (name, value)
        assert name in proc.stdout
    for key in ("date", "command", "machine"):
        assert result[key]
    assert result["machine"]["torch"] and result["machine"]["threads"] >= 1
    assert "--smoke" in proc.stdout and "torch" in proc.stdout
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["stream_memory"]["met"] is True  # the real fit holds as much on 20 batches as on 2
    assert rows["stream_memory_control"]["met"] is True, rows["stream_memory_control"]  # the cache is flagged
    control = result["memory_control_mb"]
    assert control["20"]["cached_batches"] == 20 and control["2"]["cached_batches"] == 2
    cache_mb = 18 * 128 * 512 * 4 / 2**20  # the 18 extra batches' features at avgpool (D = 512), float32
    held = control["20"]["held_mb"] - control["2"]["held_mb"]
    assert 0.8 * cache_mb < held < 1.5 * cache_mb, (held, cache_mb)


def test_gw_rank_finds_the_classes_of_a_rotated_group_and_not_of_a_relabelled_one() -> None:
    """benchmarks/alignment_target.py's gw_rank: 0 where a group is a rigid copy of the first (geometry identifies
    its classes), above 0 where the copy's labels are permuted (the true labelling is no longer the best fit)."""
    sys.path.insert(0, str(BENCH.parent))
    from alignment_target import gw_rank

    rng = np.random.default_rng(0)
    means = rng.normal(size=(5, 6)) * 3
    labels = np.tile(np.arange(5), 40)
    first = means[labels] + 0.1 * rng.normal(size=(200, 6))
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    rotated = (means[labels] + 0.1 * rng.normal(size=(200, 6))) @ rotation.T + 5.0
    groups = np.repeat([0, 1], 200)
    assert gw_rank(np.r_[first, rotated], groups, np.r_[labels, labels]) == [0]
    relabelled = np.array([1, 0, 3, 2, 4])[labels]  # swap classes 0 / 1 and 2 / 3 in the second group only
    assert gw_rank(np.r_[first, rotated], groups, np.r_[labels, relabelled])[0] > 0


def test_suite_probes_train_on_a_split_no_method_saw(monkeypatch: pytest.MonkeyPatch) -> None:
    """A debiaser that hides the group on its own training rows only (it zeroes them, and passes every other row
    through) fools probes trained on the train split (the in-sample protocol reads chance) but not the suite's
    default, probes trained on the `probe` split, which read the group as plainly as from raw Z."""
    import torch
    from torch import nn

    sys.path.insert(0, str(BENCH.parent))
    import leakage as suite
    from problems import vector_problem

    from dmm_wrap import DebiasedEncoder

    sizes = {"train": 400, "val": 400, "test": 10, "select": 10, "probe": 400}
    monkeypatch.setitem(suite.PROBLEMS, "tiny", lambda seed, train_scale=1: vector_problem("additive", seed, sizes))

    class Memoriser(nn.Module):
        def __init__(self, problem: object, train: object) -> None:
            super().__init__()
            self.raw = DebiasedEncoder(problem.backbone, problem.layer,  # type: ignore[attr-defined]
                                       problem.attributes)  # type: ignore[attr-defined]
            self.seen = {row.numpy().tobytes() for row in train.inputs}  # type: ignore[attr-defined]

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.raw.features(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.raw.features(x)
            seen = torch.tensor([row.numpy().tobytes() in self.seen for row in x])
            return torch.where(seen[:, None], torch.zeros_like(z), z)

    monkeypatch.setattr(suite, "fit_variant", lambda method, problem, train, *rest: (Memoriser(problem, train), {}))
    in_sample = suite.run_problem("tiny", 0, ["raw", "dmm"], "val", {}, 1.0, probe_split="train")
    held_out = suite.run_problem("tiny", 0, ["raw", "dmm"], "val", {}, 1.0, probe_split="probe")
    assert held_out["raw"]["leak_mlp.group"] > 0.9 and in_sample["raw"]["leak_mlp.group"] > 0.9
    assert in_sample["dmm"]["leak_mlp.group"] < 0.3  # chance 0.25: the memoriser looks perfect in sample
    assert held_out["dmm"]["leak_mlp.group"] > 0.9  # and is caught held out


def test_train_scale_grows_only_the_train_split_and_keeps_the_step_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """--train-scale K: the train split K times its usual size, every other split (the probe's included) unchanged,
    and the training variants' epochs divided by K, so they take the same steps over more distinct samples."""
    import torch

    sys.path.insert(0, str(BENCH.parent))
    import leakage as suite
    from problems import PROBLEMS, VECTOR_SIZES

    one, four = PROBLEMS["additive"](0), PROBLEMS["additive"](0, 4)
    for split in ("train", "probe", "test"):
        a, b = one.sample(split), four.sample(split)  # type: ignore[arg-type]
        assert len(b.inputs) == (4 if split == "train" else 1) * VECTOR_SIZES[split]  # type: ignore[index]
        if split != "train":
            assert torch.equal(a.inputs, b.inputs)  # the same draws: only the train split grows
    seen: dict[str, int] = {}

    def spy(loader: object, config: object, **_: object) -> object:
        seen["epochs"] = config.epochs  # type: ignore[attr-defined]
        raise StopIteration

    monkeypatch.setattr(suite.DebiasedEncoder, "fit", lambda self, loader, config=None, **kw: spy(loader, config))
    for scale in (1, 4):
        problem = PROBLEMS["additive"](0, scale)
        with pytest.raises(StopIteration):
            suite.fit_variant("dmm", problem, problem.sample("train"), 0, {}, 1.0, scale)
        seen[f"x{scale}"] = seen["epochs"]
    assert seen["x1"] == one.epochs and seen["x4"] == one.epochs // 4


def test_style_problem_group_is_readable_and_the_overlap_problem_is_not() -> None:
    """The suite's premise (a B-free perfect debiaser exists because B is a function of the features) holds for the
    style problem at STYLE_STRENGTH: a linear probe already reads the group from raw Z at >= 0.95 (the MLP reads
    0.98-0.99). The strength-1 problem, kept as style_overlap, reads far less: its groups share samples."""
    import torch
    from sklearn.linear_model import LogisticRegression

    sys.path.insert(0, str(BENCH.parent))
    from problems import PROBLEMS

    def readability(name: str) -> float:
        problem = PROBLEMS[name](0)
        train, test = problem.sample("probe"), problem.sample("test")
        with torch.no_grad():
            a, c = problem.backbone(train.inputs).numpy(), problem.backbone(test.inputs).numpy()
        clf = LogisticRegression(max_iter=3000).fit(a, train.attrs[:, 0].long().numpy())
        return clf.score(c, test.attrs[:, 0].long().numpy())

    assert readability("style") >= 0.95
    assert readability("style_overlap") < 0.9


def test_train_scale_below_one_is_refused_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(BENCH.parent))
    import leakage as suite

    with pytest.raises(SystemExit) as exc:
        suite.main(["--train-scale", "0"])
    assert exc.value.code == 2
    assert "--train-scale must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a head-only key with no head method would be ignored silently
        suite.main(["--problems", "additive", "--methods", "raw,dmm", "--set", "align_outliers=0.99"])
    assert exc.value.code == 2
    assert "give it with --methods head or head_dmm" in capsys.readouterr().err


@pytest.mark.slow
def test_selection_trajectory_scores_the_checks_it_recorded(tmp_path: Path) -> None:
    """benchmarks/selection_trajectory.py keeps every check's score, scores the selected check, the last and every
    N-th with the suite's probes, and the selected one is the check of least score (a tie to the later)."""
    sys.path.insert(0, str(BENCH.parent))
    from selection_trajectory import main

    out = tmp_path / "trajectory.json"
    assert main(["--problem", "additive", "--epochs-scale", "0.05", "--every", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    scores = {int(step): score for step, score in result["scores"].items()}
    assert sorted(scores) == list(range(1, 17))  # 16 steps, a check at each
    least = min(scores.values())
    chosen = max(step for step, score in scores.items() if score == least)
    rows = {row["step"]: row for row in result["rows"]}
    assert set(rows) == {8, 16, chosen}
    assert [step for step, row in rows.items() if row["selected"]] == [chosen]
    for row in rows.values():
        assert row["selection_score"] == scores[row["step"]]
        assert 0.0 <= row["group"] <= 1.0 and 0.0 <= row["task"] <= 1.0


def test_head_dmm_trains_deepminmax_on_the_fixed_head_s_output() -> None:
    """The suite's head_dmm method: the alignment head for the categorical attribute, then DeepMinMax on its output.
    The head is bit-identical after DeepMinMax trains (it is part of the frozen backbone), the debiased features are
    h_theta of the head's aligned features, and --set keys meant for the head reach the head only."""
    import torch

    sys.path.insert(0, str(BENCH.parent))
    import leakage as suite
    from problems import PROBLEMS

    problem = PROBLEMS["additive"](0)
    train = problem.sample("train")
    ref = suite.DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
    ref.fit_alignment_head(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train.inputs, train.attrs),
                                                       batch_size=problem.batch_size),
                           clusters=4, samples=len(train.inputs), maps="diagonal", seed=0)
    enc, extra = suite.fit_variant("head_dmm", problem, train, 0, {"align_clusters": 4, "align_head_maps": "diagonal"},
                                   0.05, 1)
    head = enc.backbone.encoder
    assert head.head_config.align_head_maps == "diagonal" and enc.head_config.align_head_maps is None
    assert extra["selected_step"] >= 1 and extra["fit_seconds"] > 0
    fitted = {k: v for k, v in head.heads.state_dict().items() if k.startswith(("h.", "feature_"))}
    assert len(fitted) > 2
    for name, after in fitted.items():  # the same fitted head, untouched by DeepMinMax's training
        assert torch.equal(ref.heads.state_dict()[name], after), name
    x = problem.sample("test").inputs[:64]
    with torch.no_grad():
        aligned = ref(x)
        assert torch.equal(head(x), aligned)
        torch.testing.assert_close(enc(x), enc.heads.debias(aligned))
        assert not torch.allclose(enc(x), aligned)  # negative control: DeepMinMax moved the features
    with pytest.raises(SystemExit, match="categorical attribute"):
        suite.fit_variant("head_dmm", PROBLEMS["continuous"](0), PROBLEMS["continuous"](0).sample("train"), 0, {},
                          0.05, 1)


def test_label_free_digits_problem_is_the_same_data_behind_the_label_free_encoder() -> None:
    """digits_label_free draws exactly the digits problem's samples and feeds them to the shipped encoder that never
    read a digit label: the inputs match, the features do not."""
    import torch

    sys.path.insert(0, str(BENCH.parent))
    from problems import digits_problem

    sizes = dict.fromkeys(("train", "val", "test", "select", "probe"), 8)
    job, free = digits_problem(0, sizes), digits_problem(0, sizes, "digits_label_free")  # type: ignore[arg-type]
    assert (job.name, free.name) == ("digits", "digits_label_free")
    a, b = job.sample("val"), free.sample("val")
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.attrs, b.attrs) and torch.equal(a.detail, b.detail)
    with torch.no_grad():
        za = job.backbone.forward_features(a.inputs)
        zb = free.backbone.forward_features(b.inputs)
    assert za.shape == zb.shape and not torch.allclose(za, zb)


def test_digits_writers_validates_on_writers_that_training_never_sees() -> None:
    """digits_writers' val split draws source digits that its train and probe splits never draw (the shift to new
    writers that the test split has); the plain digits problem's val shares them with train; the test split is the
    digits problem's own."""
    import torch

    sys.path.insert(0, str(BENCH.parent))
    from problems import digits_problem

    sizes = dict.fromkeys(("train", "val", "test", "select", "probe"), 300)

    def sources(split_data: object) -> set[tuple[float, ...]]:  # the writer detail identifies the source digit
        return {tuple(np.round(row, 4)) for row in split_data.detail.numpy()}  # type: ignore[attr-defined]

    plain, writers = digits_problem(0, sizes), digits_problem(0, sizes, writers_val=True)  # type: ignore[arg-type]
    assert writers.name == "digits_writers"
    assert sources(plain.sample("val")) & sources(plain.sample("train"))  # negative control: shared writers
    val = sources(writers.sample("val"))
    assert not val & sources(writers.sample("train")) and not val & sources(writers.sample("probe"))
    a, b = plain.sample("test"), writers.sample("test")
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
