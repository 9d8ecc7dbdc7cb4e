"""What a fresh probe reads along one `dmm_selected` run: the leakage, task and retention of h_theta at the model
selection's checks, beside the selection probe's own score.

`leakage.py`'s `dmm_selected` keeps the h_theta its selection probe (trained on half of the problem's `select`
split) read least. This scores the h_theta of every `--every`-th check, the selected one and the last with the
suite's probes (trained on the probe split, scored on `--split`), so it shows whether another check would have
served better: for example one that keeps more of the within-class detail at the same leakage.

Example (the digits job's protocol, val split):
    python benchmarks/selection_trajectory.py --problem digits --seed 0 --epochs-scale 4 --train-scale 60 \
        --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from leakage import features, fit_variant, leakage, retention_r2, task_accuracy  # noqa: E402
from problems import PROBLEMS  # noqa: E402

from dmm_wrap import DebiasedEncoder  # noqa: E402
from dmm_wrap.train import averaging, selection  # noqa: E402

TASK_ROWS = 8192
"""Training rows of the task's logistic regression (the default job's eval.max_samples)."""


@contextmanager
def recorded_checks() -> Iterator[dict[int, tuple[float, torch.Tensor]]]:
    """While open, every check of the model selection also keeps its score and the h_theta it scored (step -> both)."""
    kept: dict[int, tuple[float, torch.Tensor]] = {}
    check = selection.check

    def recording(objective: Any, step: int, record: Any) -> None:
        def both(at: int, score: float) -> None:
            record(at, score)
            kept[at] = (score, parameters_to_vector(averaging.scored(objective).parameters()).detach().clone())
        check(objective, step, both)

    selection.check = recording
    try:
        yield kept
    finally:
        selection.check = check


def score_checks(args: argparse.Namespace) -> dict[str, Any]:
    problem = PROBLEMS[args.problem](args.seed, args.train_scale)
    train = problem.sample("train")
    with recorded_checks() as checks:
        enc, extra = fit_variant("dmm_selected", problem, train, args.seed, {}, args.epochs_scale, args.train_scale)
    ev, held = problem.sample(args.split), problem.sample("probe")
    raw = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
    raw_retention = retention_r2(features(raw, held.inputs, False), held, features(raw, ev.inputs, False), ev,
                                 problem, args.seed)
    steps = sorted(checks)
    chosen = int(extra["selected_step"])
    rows = []
    for step in sorted(set(steps[args.every - 1::args.every] + [chosen, steps[-1]])):
        score, weights = checks[step]
        vector_to_parameters(weights, enc.heads.h.parameters())
        d, c = features(enc, held.inputs, True), features(enc, ev.inputs, True)
        a = features(enc, train.inputs[:TASK_ROWS], True)
        row = {"step": step, "selection_score": score, "selected": step == chosen,
               "task": task_accuracy(a, train.labels[:TASK_ROWS].numpy(), c, ev.labels.numpy())}
        for k, attr in enumerate(problem.attributes):
            row[attr.name] = leakage(d, held.attrs[:, k].numpy(), c, ev.attrs[:, k].numpy(),
                                     attr.kind == "categorical", args.seed)["leak_mlp"]
        row["retention"] = retention_r2(d, held, c, ev, problem, args.seed) / raw_retention
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    return {"problem": args.problem, "seed": args.seed, "split": args.split, "epochs_scale": args.epochs_scale,
            "train_scale": args.train_scale, "scores": {s: checks[s][0] for s in steps}, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="digits", choices=sorted(PROBLEMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--epochs-scale", type=float, default=1.0)
    parser.add_argument("--train-scale", type=int, default=1)
    parser.add_argument("--every", type=int, default=5, help="score every N-th check (and the selected and last)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.every < 1 or args.train_scale < 1:
        parser.error("--every and --train-scale must be >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = score_checks(args)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
