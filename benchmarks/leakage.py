"""The leakage suite: how much of an attribute a *fresh* probe still reads from the features, and what else they keep.

For each problem of `benchmarks/problems.py` and each seed, the feature sets below are compared side by side:

    raw          Z, the frozen backbone's features
    leace        LEACE (concept-erasure), the best linear eraser
    quadratic    concept-erasure's QuadraticEraser: an ORACLE that needs B at inference (continuous B: 4 quantile bins)
    paper        DeepMinMax with FitConfig.paper() (lam 0.5, lr 0.005, one q step, summed NLL)
    dmm          DeepMinMax with today's defaults (FitConfig(), HeadConfig()), with any --set overrides
    matched      dmm plus the experimental group-matching term: residual h_theta, match_weight 10
    aligned      DeepMinMax with the piecewise-alignment target: HeadConfig.aligned(), FitConfig.aligned(), and
                 ALIGNED_EPOCHS times the problem's epoch budget
    selected     aligned, plus model selection: fit(..., val_loader=) on the problem's "select" split (neither val
                 nor test), the h_theta a fresh probe reads least from at the end of each round is kept
    dmm_selected dmm, plus the same model selection, checked SELECT_CHECKS times over the run (the digits job's
                 shipped setting: data.num_val)
    head         the alignment head, DebiasedEncoder.fit_alignment_head on the train split: the alignment applied
                 with the attribute predicted from Z, no training loop (--set align_clusters=K gives its pieces;
                 continuous attributes through joint groups, --set align_bins=B bins each, default 4; --set
                 align_outliers=Q its outliers quantile; --set align_target=pooled or harmonic maps each piece onto
                 the pooled piece's covariance or the harmonic mean instead of the geometric mean)
    head_dmm     the alignment head for the problem's categorical attributes (fitted on HEAD_SAMPLES training rows,
                 its maps refit from every row with one such attribute), then dmm_selected for every attribute on its
                 output: the head stays fixed while DeepMinMax trains (--set align_clusters=K, --set
                 align_head_maps=diagonal, --set align_outliers=Q for the head)

Every method is fitted on the train split (DeepMinMax variants with the problem's epoch budget). The task's logistic
regression trains on the train features (the paper's protocol); the leakage and retention probes train on the
problem's `probe` split, which no method saw, so that what a debiaser fitted to its own training samples cannot help
it (--probe-split train gives that in-sample protocol, for comparison); all are scored on the evaluation split
(--split val to choose settings, test to report). Reported:

    task         logistic regression on the task label (the paper's protocol)
    leak_mlp     a fresh MLP probe (hidden 128, 128: at least CLUB's q) on each attribute: balanced accuracy
                 (chance 1 / K) or R^2
    leak_lin     a linear probe: balanced accuracy (logistic regression) or R^2 (ridge)
    retention    R^2 of an MLP given (features, B) predicting each sample's own within-class detail, divided by the
                 same on raw Z: 1 keeps everything, 0 keeps nothing beyond the attribute
    retain_nll   -log m_phi(Z | Z~, B) per feature dimension at the end of training (DeepMinMax variants)

Example:
    python benchmarks/leakage.py --seeds 0,1,2 --json benchmarks/results/leakage.json
    python benchmarks/leakage.py --problems style,continuous --methods raw,dmm --split val --set match_weight=3
    python benchmarks/leakage.py --problems digits --epochs-scale 2      # stability with training length
    python benchmarks/leakage.py --methods raw,aligned --merge-into benchmarks/results/leakage.json  # add a variant
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import PROBLEMS, Problem, SplitData  # noqa: E402

from dmm_wrap import DebiasedEncoder, FitConfig, HeadConfig  # noqa: E402

METHODS = ("raw", "leace", "quadratic", "paper", "dmm", "matched", "aligned", "selected", "dmm_selected", "head",
           "head_dmm")
HEAD_SAMPLES = 16384
"""Rows the head_dmm method's head fits its pieces, their matching and its predictor on (the rest only refit the
maps): the digits job's train split is 245,760 draws."""
HEAD_ONLY = ("align_clusters", "align_head_maps", "align_shrinkage", "align_outliers", "align_target")
"""--set keys that head_dmm gives its head and not DeepMinMax."""
MATCHED = {"residual": True, "match_weight": 10.0}
"""The matched variant's settings (chosen on the val split of the style problem, seed 0: weights 1, 10, 100 gave
MLP-probe leakage 0.839, 0.818, 0.746 with task 1.000, 0.999, 0.885)."""
ALIGNED = {"residual": True, "h_hidden": 256, "align_weight": 100.0, "align_every": 200, "lam": 1.0, "lr": 3e-3}
"""The aligned variant: HeadConfig.aligned() and FitConfig.aligned() (tests/test_alignment.py checks they agree).
Chosen on the val split, seed 0: rounds every 400 steps gave continuous R^2 0.19, every 200 steps 0.05; lam 0.5
(with the retaining term) left additive seed 1 at 0.64, lam 1 gave 0.25 (lam 0, the retaining term alone: 0.86)."""
ALIGNED_EPOCHS = 10
"""The aligned variant trains this many times the problem's epoch budget (the vector problems: 200 epochs, the
paper's count; 3200 steps). Distilling the target to a mean squared error near 0.005 took about 3000 steps on the
style problem's val split (leak 0.80 at 320 steps, 0.28 at 1600, 0.26 at 3200)."""
SELECT_CHECKS = 30
"""dmm_selected: checks of h_theta by the selection probe over a run (select_every = steps // SELECT_CHECKS)."""
PROBE_HIDDEN = (128, 128)


def _mlp(regression: bool, seed: int) -> Any:
    kind = MLPRegressor if regression else MLPClassifier
    return make_pipeline(StandardScaler(), kind(hidden_layer_sizes=PROBE_HIDDEN, max_iter=300, early_stopping=True,
                                                random_state=seed))


def leakage(train_x: np.ndarray, train_b: np.ndarray, test_x: np.ndarray, test_b: np.ndarray, categorical: bool,
            seed: int) -> dict[str, float]:
    """Fresh MLP and linear probes of one attribute: balanced accuracy (categorical) or R^2 (continuous)."""
    if categorical:
        tr, te = train_b.astype(int), test_b.astype(int)
        lin = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return {"leak_mlp": balanced_accuracy_score(te, _mlp(False, seed).fit(train_x, tr).predict(test_x)),
                "leak_lin": balanced_accuracy_score(te, lin.fit(train_x, tr).predict(test_x))}
    lin = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
    return {"leak_mlp": r2_score(test_b, _mlp(True, seed).fit(train_x, train_b).predict(test_x)),
            "leak_lin": r2_score(test_b, lin.fit(train_x, train_b).predict(test_x))}


def with_attrs(x: np.ndarray, b: np.ndarray, problem: Problem) -> np.ndarray:
    cols = [x]
    for k, a in enumerate(problem.attributes):
        cols.append(np.eye(a.num_classes)[b[:, k].astype(int)] if a.kind == "categorical" else b[:, k:k + 1])
    return np.concatenate(cols, 1)


def retention_r2(train_x: np.ndarray, train: SplitData, test_x: np.ndarray, test: SplitData, problem: Problem,
                 seed: int) -> float:
    """R^2 of an MLP given (features, B) predicting the within-class detail."""
    probe = _mlp(True, seed).fit(with_attrs(train_x, train.attrs.numpy(), problem), train.detail.numpy())
    return r2_score(test.detail.numpy(), probe.predict(with_attrs(test_x, test.attrs.numpy(), problem)))


def task_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return float(clf.fit(train_x, train_y).score(test_x, test_y))


def encode_for_erasure(b: np.ndarray, problem: Problem, bins: bool) -> np.ndarray:
    """B as LEACE's target (one-hot / value) or, with `bins`, as QuadraticEraser's class ids (quantile bins)."""
    cols = []
    for k, a in enumerate(problem.attributes):
        col = b[:, k]
        if a.kind == "categorical":
            cols.append(col.astype(int) if bins else np.eye(a.num_classes)[col.astype(int)])
        else:
            cols.append(np.digitize(col, np.quantile(col, [0.25, 0.5, 0.75])) if bins else col[:, None])
    if bins:
        return cols[0] if len(cols) == 1 else np.ravel_multi_index(cols, [max(c.max() + 1, 1) for c in cols])
    return np.concatenate(cols, 1)


def erased(method: str, ztr: np.ndarray, train: SplitData, others: list[tuple[np.ndarray, SplitData]],
           problem: Problem) -> list[np.ndarray]:
    """The eraser fitted on the train features, applied to train and to each of `others` (QuadraticEraser is given
    each split's own B)."""
    from concept_erasure import LeaceEraser, QuadraticEraser

    xtr = torch.from_numpy(ztr).double()
    if method == "leace":
        concepts = torch.from_numpy(encode_for_erasure(train.attrs.numpy(), problem, False)).double()
        eraser = LeaceEraser.fit(xtr, concepts)
        return [eraser(xtr).numpy()] + [eraser(torch.from_numpy(z).double()).numpy() for z, _ in others]

    def ids(split: SplitData) -> torch.Tensor:
        return torch.from_numpy(encode_for_erasure(split.attrs.numpy(), problem, True)).long()

    quadratic = QuadraticEraser.fit(xtr, ids(train))
    return [quadratic(xtr, ids(train)).numpy()] + [quadratic(torch.from_numpy(z).double(), ids(split)).numpy()
                                                  for z, split in others]


def head_options(overrides: dict[str, Any]) -> dict[str, Any]:
    """The `--set` keys that `fit_alignment_head` takes as they are (`shrinkage`, `outliers`), where given; its own
    defaults otherwise."""
    names = {"align_shrinkage": "shrinkage", "align_outliers": "outliers", "align_target": "target"}
    return {arg: overrides[key] for key, arg in names.items() if key in overrides}


def fit_variant(method: str, problem: Problem, train: SplitData, seed: int, overrides: dict[str, Any],
                epochs_scale: float, train_scale: int = 1) -> tuple[DebiasedEncoder, dict[str, float]]:
    """One fitted method. A train split `train_scale` times the usual size keeps the training variants' step count
    (epochs / train_scale): more distinct samples, not more steps."""
    if method == "head":  # no training loop: one bounded pass of fit_alignment_head
        enc = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
        start = time.perf_counter()
        enc.fit_alignment_head(DataLoader(TensorDataset(train.inputs, train.attrs), batch_size=problem.batch_size),
                               clusters=overrides.get("align_clusters"), samples=len(train.inputs), seed=seed,
                               bins=overrides.get("align_bins", 4), **head_options(overrides))
        return enc, {"fit_seconds": time.perf_counter() - start}
    if method == "head_dmm":
        return head_then_dmm(problem, train, seed, overrides, epochs_scale, train_scale)
    torch.manual_seed(seed)
    aligned = method in ("aligned", "selected")
    epochs = max(1, round(problem.epochs * epochs_scale * (ALIGNED_EPOCHS if aligned else 1) / train_scale))
    if method == "paper":
        head, cfg = HeadConfig(), FitConfig.paper(epochs=epochs)
    else:
        overrides = {**(problem.fit_options or {}), **overrides, **(MATCHED if method == "matched" else {}),
                     **(ALIGNED if aligned else {})}
        head = HeadConfig(**{k: v for k, v in overrides.items() if k in HeadConfig.__dataclass_fields__})
        cfg = FitConfig(epochs=epochs, **{k: v for k, v in overrides.items() if k in FitConfig.__dataclass_fields__})
    cfg.progress = False
    enc = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes, **vars(head))
    loader = DataLoader(TensorDataset(train.inputs, train.attrs), batch_size=problem.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    val_loader = None
    if method in ("selected", "dmm_selected"):  # a split of its own: choosing on val or test would tune on what
        chosen = problem.sample("select")         # is reported
        val_loader = DataLoader(TensorDataset(chosen.inputs, chosen.attrs), batch_size=512)
        steps = epochs * len(loader)
        cfg.select_every = cfg.align_every if method == "selected" else max(1, steps // SELECT_CHECKS)
    history = enc.fit(loader, config=cfg, val_loader=val_loader)
    tail = max(1, len(history.retain) // 10)
    extra = {"retain_nll": float(np.mean(history.retain[-tail:])), "fit_seconds": time.perf_counter() - start}
    if history.selected_step is not None:
        extra["selected_step"] = float(history.selected_step)
    return enc, extra


class HeadFirst(nn.Module):
    """A frozen backbone followed by a fitted alignment head: `encoder` is a DebiasedEncoder whose h_theta is the
    head; its output (the aligned features) is that of the `out` submodule, which DeepMinMax hooks."""

    def __init__(self, encoder: DebiasedEncoder) -> None:
        super().__init__()
        self.encoder = encoder.eval()
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(x))


def head_then_dmm(problem: Problem, train: SplitData, seed: int, overrides: dict[str, Any], epochs_scale: float,
                  train_scale: int) -> tuple[DebiasedEncoder, dict[str, float]]:
    """The head_dmm method: the alignment head for the categorical attributes, then dmm_selected on its output."""
    cols = [k for k, a in enumerate(problem.attributes) if a.kind == "categorical"]
    if not cols:
        raise SystemExit(f"head_dmm needs a categorical attribute for its head; {problem.name} has none.")
    start = time.perf_counter()
    head = DebiasedEncoder(problem.backbone, problem.layer, tuple(problem.attributes[k] for k in cols))
    head.fit_alignment_head(DataLoader(TensorDataset(train.inputs, train.attrs[:, cols]), batch_size=problem.batch_size),
                            clusters=overrides.get("align_clusters"), samples=min(len(train.inputs), HEAD_SAMPLES),
                            maps=overrides.get("align_head_maps"), seed=seed, **head_options(overrides))
    stacked = dataclasses.replace(problem, backbone=HeadFirst(head), layer="out")
    rest = {k: v for k, v in overrides.items() if k not in HEAD_ONLY}
    enc, extra = fit_variant("dmm_selected", stacked, train, seed, rest, epochs_scale, train_scale)
    return enc, {**extra, "fit_seconds": time.perf_counter() - start}


@torch.no_grad()
def features(enc: DebiasedEncoder, x: torch.Tensor, debiased: bool, batch_size: int = 512) -> np.ndarray:
    enc.eval()
    out = [(enc(x[i:i + batch_size]) if debiased else enc.features(x[i:i + batch_size])) for i in
           range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


def run_problem(name: str, seed: int, methods: list[str], split: str, overrides: dict[str, Any],
                epochs_scale: float, probe_split: str = "probe", train_scale: int = 1) -> dict[str, dict[str, Any]]:
    """Every method on one problem and seed. The task's logistic regression trains on the train split (the paper's
    protocol: a user trains on the debiased training features); the leakage and retention probes train on
    `probe_split`, which no method was fitted on ("train" gives the in-sample protocol, for comparison)."""
    problem = PROBLEMS[name](seed, train_scale)
    train, ev = problem.sample("train"), problem.sample(split)  # type: ignore[arg-type]
    held = train if probe_split == "train" else problem.sample(probe_split)  # type: ignore[arg-type]
    raw_enc = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
    ztr, zev = features(raw_enc, train.inputs, False), features(raw_enc, ev.inputs, False)
    zpr = ztr if held is train else features(raw_enc, held.inputs, False)
    raw_retention = retention_r2(zpr, held, zev, ev, problem, seed)
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        extra: dict[str, float] = {}
        if method == "raw":
            a, c, d = ztr, zev, zpr
        elif method in ("leace", "quadratic"):
            a, c, d = erased(method, ztr, train, [(zev, ev), (zpr, held)], problem)
        else:
            enc, extra = fit_variant(method, problem, train, seed, overrides, epochs_scale, train_scale)
            a, c, d = (features(enc, x.inputs, True) for x in (train, ev, held))
        row: dict[str, Any] = {"task": task_accuracy(a, train.labels.numpy(), c, ev.labels.numpy()), **extra}
        for k, attr in enumerate(problem.attributes):
            leak = leakage(d, held.attrs[:, k].numpy(), c, ev.attrs[:, k].numpy(), attr.kind == "categorical", seed)
            row.update({f"{key}.{attr.name}": v for key, v in leak.items()})
        row["retention"] = retention_r2(d, held, c, ev, problem, seed) / raw_retention
        rows[method] = row
        print(f"  {name} seed {seed} {method:10s} " + " ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)
    return rows


def summarise(results: dict[str, dict[int, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean and sd over seeds of every number, per problem and method."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, by_seed in results.items():
        out[name] = {}
        methods = next(iter(by_seed.values())).keys()
        for method in methods:
            keys = next(iter(by_seed.values()))[method].keys()
            stats = {}
            for key in keys:
                values = [by_seed[s][method][key] for s in by_seed]
                stats[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1
                              else 0.0, "values": values}
            out[name][method] = stats
    return out


def targets(name: str, summary: dict[str, dict[str, Any]], problem: Problem) -> dict[str, bool]:
    """The quality targets of each DeepMinMax variant on the mean over seeds: fresh-MLP leakage <= chance + 0.05
    (balanced accuracy) or R^2 <= 0.10; task >= raw - 0.02 and >= LEACE; retention >= 0.5 of raw Z's."""
    out = {}
    for variant in ("paper", "dmm", "matched", "aligned", "selected", "dmm_selected", "head", "head_dmm"):
        if variant in summary:
            out.update({f"{variant}: {k}": v for k, v in _targets(summary[variant], summary, problem).items()})
    return out


def _targets(dmm: dict[str, Any], summary: dict[str, dict[str, Any]], problem: Problem) -> dict[str, bool]:
    out = {}
    for a in problem.attributes:
        key = f"leak_mlp.{a.name}"
        limit = 1 / a.num_classes + 0.05 if a.kind == "categorical" else 0.10
        out[f"leak {a.name} <= {limit:.3f}"] = dmm[key]["mean"] <= limit
    if "raw" in summary:
        out["task >= raw - 0.02"] = dmm["task"]["mean"] >= summary["raw"]["task"]["mean"] - 0.02
    if "leace" in summary:
        out["task >= LEACE"] = dmm["task"]["mean"] >= summary["leace"]["task"]["mean"]
    out["retention >= 0.5"] = dmm["retention"]["mean"] >= 0.5
    return out


def table(summary: dict[str, dict[str, dict[str, Any]]], problems: dict[str, Problem]) -> str:
    lines = []
    for name, by_method in summary.items():
        problem = problems[name]
        chance_txt = ", ".join(f"{a.name}: chance {1 / a.num_classes:.3f}" if a.kind == "categorical"
                               else f"{a.name}: R^2" for a in problem.attributes)
        lines.append(f"\n## {name} ({chance_txt})\n")
        keys = list(next(iter(by_method.values())).keys())
        keys = [k for k in keys if k != "fit_seconds"]
        lines.append("| method | " + " | ".join(keys) + " |")
        lines.append("| --- " * (len(keys) + 1) + "|")
        for method, stats in by_method.items():
            cells = [f"{stats[k]['mean']:.3f} ± {stats[k]['sd']:.3f}" if k in stats else "" for k in keys]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        met = targets(name, by_method, problem)
        if met:
            lines.append("\ntargets (mean over seeds): " + "; ".join(
                f"{k}: {'met' if v else 'NOT MET'}" for k, v in met.items()))
    return "\n".join(lines)


def merge_into(path: Path, payload: dict[str, Any], problems: dict[str, Problem]) -> dict[str, Any]:
    """`payload`'s rows added to the results file `path` (same split and seeds); rows both hold must agree."""
    old = json.loads(path.read_text())
    mine = (payload["split"], payload["seeds"], payload["probe_split"], payload["train_scale"])
    # files before the probe split: train; before the train scale: 1
    theirs = (old["split"], old["seeds"], old.get("probe_split", "train"), old.get("train_scale", 1))
    if theirs != mine:
        raise SystemExit(f"--merge-into {path}: it holds (split, seeds, probe split, train scale) {theirs}, this "
                         f"run {mine}.")
    for name, methods in payload["summary"].items():
        into = old["summary"].setdefault(name, {})
        for method, stats in methods.items():
            for key, cell in stats.items():
                if method in into and key in into[method] and key != "fit_seconds" and not np.allclose(
                        into[method][key]["values"], cell["values"], rtol=0, atol=1e-9):
                    raise SystemExit(f"--merge-into {path}: {name}/{method}/{key} differs from the file's "
                                     f"({into[method][key]['values']} vs {cell['values']}); not merged.")
            into[method] = stats
    old["targets"] = {n: targets(n, old["summary"][n], problems[n]) for n in payload["summary"]} | {
        n: t for n, t in old["targets"].items() if n not in payload["summary"]}
    old.setdefault("merged", []).append({"overrides": payload["overrides"], "epochs_scale": payload["epochs_scale"],
                                         "methods": sorted({m for v in payload["summary"].values() for m in v})})
    return old


def parse_set(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE overrides of FitConfig / HeadConfig fields, align_outliers and align_target (the head's `outliers`
    and `target`; values parsed as YAML; the configs validate them)."""
    out: dict[str, Any] = {}
    fields = {**FitConfig.__dataclass_fields__, **HeadConfig.__dataclass_fields__, "align_outliers": None,
              "align_target": None}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}.")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated, from " + ", ".join(PROBLEMS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--split", choices=("val", "test"), default="test",
                        help="val to choose settings, test to report")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a FitConfig / HeadConfig field of the 'dmm' method")
    parser.add_argument("--probe-split", choices=("probe", "train"), default="probe",
                        help="the split the leakage and retention probes train on: 'probe', which no method was "
                             "fitted on (default), or 'train', the in-sample protocol of earlier results")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every problem's epoch budget")
    parser.add_argument("--train-scale", type=int, default=1,
                        help="the train split (what every method is fitted on) this many times its usual size, the "
                             "probe split unchanged; training variants keep their step count (default 1: train as "
                             "large as the probe split)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and BLAS threads (1 by default: on a shared 2-core machine, 2 BLAS threads made "
                             "the probes 9x slower)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge-into", default=None, metavar="FILE",
                        help="add this run's rows to an earlier --json file of the same split and seeds (rows both "
                             "hold, e.g. raw, must agree) instead of writing a new one")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    names = [p for p in args.problems.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    for bad in [p for p in names if p not in PROBLEMS] + [m for m in methods if m not in METHODS]:
        raise SystemExit(f"Unknown problem or method {bad!r}: problems {list(PROBLEMS)}, methods {list(METHODS)}.")
    if args.train_scale < 1:
        parser.error(f"--train-scale must be an integer >= 1 (the train split's size as a multiple of its usual one), "
                     f"got {args.train_scale}.")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = parse_set(args.set)
    if "align_outliers" in overrides and not {"head", "head_dmm"} & set(methods):
        parser.error("--set align_outliers=Q sets the alignment head's outlier radius; give it with --methods head or "
                     f"head_dmm (got {methods}).")
    results: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}
    problems = {}
    start = time.perf_counter()
    for name in names:
        results[name] = {}
        for seed in seeds:
            results[name][seed] = run_problem(name, seed, methods, args.split, overrides, args.epochs_scale,
                                                args.probe_split, args.train_scale)
        problems[name] = PROBLEMS[name](seeds[0])
    summary = summarise(results)
    print(f"\n# Leakage suite ({args.split} split, probes trained on {args.probe_split}, {len(seeds)} seeds, "
          f"mean ± sd; "
          f"{time.perf_counter() - start:.0f} s; dmm overrides {overrides or 'none'}; epochs x{args.epochs_scale}; "
          f"train split x{args.train_scale})")
    print(table(summary, problems))
    if args.json or args.merge_into:
        path = Path(args.merge_into or args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"split": args.split, "probe_split": args.probe_split, "seeds": seeds, "overrides": overrides,
                   "epochs_scale": args.epochs_scale, "train_scale": args.train_scale,
                   "summary": summary, "targets": {n: targets(n, summary[n], problems[n]) for n in summary}}
        if args.merge_into:
            payload = merge_into(path, payload, problems)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
