"""How good the piecewise-alignment target is before any distillation, on the leakage suite's problems.

The `aligned` variant of `leakage.py` distils the target T(z, b) of `dmm_wrap.core.alignment` into h_theta. When it
fails, this says whether the target itself failed (its matching of pieces across groups, or its per-piece maps) or
the distillation did: the target is fitted on the problem's standardised training features and scored with the
suite's own probes: the task's trained on T(Z, B) of the train split, the leakage and retention probes on T(Z, B) of
the problem's probe split (which nothing is fitted on), all scored on T(Z, B) of the evaluation split.

For every problem with a categorical attribute (its first one), seed and piece count:

    task       logistic regression on the target (the suite's `task_accuracy`)
    leak_mlp   the suite's fresh MLP probe on the attribute (balanced accuracy, chance 1 / K)
    retention  the suite's retention (an MLP given the features and B predicting the within-class detail), over raw Z's
    purity     the mean share of a piece's training samples in its majority task class
    matched    the share of the other groups' pieces matched to the piece of the first group that holds the same
               majority class (1: the matching kept the classes; the task labels are read only here)
    gw_rank    how many permutations of the classes keep the distances between class means better than the true
               one does, between the first group and each other group (Gromov-Wasserstein cost on the normalised
               distance matrices; 0: geometry alone identifies the classes). Only for at most 8 classes; the
               vector problems also give it on their inputs, before the frozen encoder (row "inputs").

Each piece count has a second row, "B predicted": the same target with the attribute predicted from Z by a logistic
regression fitted on the train split, T(z, b^(z)), a map that needs no B at inference (every split alike):
`fit_predicted_alignment`, the alignment head's map.

Example:
    python benchmarks/alignment_target.py --problems rotation,conv --clusters auto,4 --seeds 0,1
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from leakage import features, leakage, retention_r2, task_accuracy  # noqa: E402
from problems import PROBLEMS  # noqa: E402

from dmm_wrap import DebiasedEncoder  # noqa: E402
from dmm_wrap.core.alignment import fit_predicted_alignment  # noqa: E402

MAX_PERMUTED = 8
"""gw_rank enumerates all permutations of the classes: at most 8! = 40,320."""


def class_means(z: np.ndarray, groups: np.ndarray, labels: np.ndarray, group: int, classes: int) -> np.ndarray:
    return np.stack([z[(groups == group) & (labels == c)].mean(0) for c in range(classes)])


def gw_rank(z: np.ndarray, groups: np.ndarray, labels: np.ndarray) -> list[int] | None:
    """Per group after the first: the number of class permutations whose Gromov-Wasserstein cost between the groups'
    normalised class-mean distance matrices is below the true (identity) permutation's."""
    classes = int(labels.max()) + 1
    if classes > MAX_PERMUTED:
        return None
    present = [g for g in np.unique(groups) if all(((groups == g) & (labels == c)).any() for c in range(classes))]

    def distances(g: int) -> np.ndarray:
        m = class_means(z, groups, labels, g, classes)
        d = np.linalg.norm(m[:, None] - m[None], axis=-1)
        return d / d.max()

    perms = np.array(list(itertools.permutations(range(classes))))
    ref = distances(present[0])
    ranks = []
    for g in present[1:]:
        own = distances(g)
        costs = ((own[None] - ref[perms[:, :, None], perms[:, None, :]]) ** 2).sum((1, 2))
        ranks.append(int((costs < costs[0] - 1e-12).sum()))  # perms[0] is the identity
    return ranks


def matching(stage: torch.nn.Module, z: np.ndarray, groups: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(purity, matched) of one alignment stage on its training sample."""
    centroids = stage.centroids.numpy()
    target = stage.target_mean.numpy()
    present = [g for g in np.unique(groups)]
    majority, purity = {}, []
    for g in present:
        x, y = z[groups == g], labels[groups == g]
        piece = ((x[:, None] - centroids[g][None]) ** 2).sum(-1).argmin(1)
        for k in np.unique(piece):
            counts = np.bincount(y[piece == k])
            majority[g, k] = int(counts.argmax())
            purity.append(counts.max() / counts.sum())
    # Pieces matched to the same pooled piece share their target mean.
    slot = {(g, k): int(np.argmin(((target[present[0]] - target[g, k]) ** 2).sum(-1))) for g, k in majority}
    first = {slot[present[0], k]: c for (g, k), c in majority.items() if g == present[0]}
    others = [(g, k) for g, k in majority if g != present[0]]
    same = [majority[g, k] == first.get(slot[g, k], -1) for g, k in others]
    return float(np.mean(purity)), float(np.mean(same)) if same else 1.0


def run(name: str, seed: int, clusters: list[int | None], split: str) -> list[dict[str, object]]:
    problem = PROBLEMS[name](seed)
    column = next((k for k, a in enumerate(problem.attributes) if a.kind == "categorical"), None)
    if column is None:
        return []
    train, ev = problem.sample("train"), problem.sample(split)  # type: ignore[arg-type]
    held = problem.sample("probe")  # the leakage and retention probes train here: nothing is fitted on it
    enc = DebiasedEncoder(problem.backbone, problem.layer, problem.attributes)
    ztr, zev, zpr = (features(enc, x.inputs, False) for x in (train, ev, held))
    mean, std = ztr.mean(0), ztr.std(0) + 1e-6
    ztr, zev, zpr = (ztr - mean) / std, (zev - mean) / std, (zpr - mean) / std
    groups, labels = train.attrs[:, column].numpy().astype(int), train.labels.numpy()
    held_groups = held.attrs[:, column].numpy().astype(int)
    attr = problem.attributes[column]
    rows = []
    raw_leak = leakage(zpr, held_groups, zev, ev.attrs[:, column].numpy(), True, seed)["leak_mlp"]
    raw_task = task_accuracy(ztr, labels, zev, ev.labels.numpy())
    raw_retention = retention_r2(zpr, held, zev, ev, problem, seed)
    rows.append({"problem": name, "seed": seed, "clusters": "raw", "task": raw_task, "leak_mlp": raw_leak,
                 "retention": 1.0, "gw_rank": gw_rank(ztr, groups, labels)})
    if train.inputs.dim() == 2:  # vector problems: the same before the frozen encoder
        rows.append({"problem": name, "seed": seed, "clusters": "inputs",
                     "gw_rank": gw_rank(train.inputs.double().numpy(), groups, labels)})
    for k in clusters:
        head = fit_predicted_alignment(torch.from_numpy(ztr).float(), train.attrs[:, column:column + 1], (attr,), k,
                                       None, seed)
        align = head.alignment
        ttr = align(torch.from_numpy(ztr).float(), train.attrs[:, column:column + 1]).double().numpy()
        tev = align(torch.from_numpy(zev).float(), ev.attrs[:, column:column + 1]).double().numpy()
        tpr = align(torch.from_numpy(zpr).float(), held.attrs[:, column:column + 1]).double().numpy()
        purity, matched = matching(align.stages[0], ztr, groups, labels)
        pieces = int(align.stages[0].centroids.shape[1])
        rows.append({"problem": name, "seed": seed, "clusters": pieces,
                     "task": task_accuracy(ttr, labels, tev, ev.labels.numpy()),
                     "leak_mlp": leakage(tpr, held_groups, tev, ev.attrs[:, column].numpy(), True, seed)["leak_mlp"],
                     "retention": retention_r2(tpr, held, tev, ev, problem, seed) / raw_retention,
                     "purity": purity, "matched": matched})
        # The same target with the attribute predicted from Z (the alignment head's map): no B at inference.
        with torch.no_grad():
            ptr, pev, ppr = (head(torch.from_numpy(x).float()).double().numpy() for x in (ztr, zev, zpr))
        rows.append({"problem": name, "seed": seed, "clusters": f"{pieces}, B predicted",
                     "task": task_accuracy(ptr, labels, pev, ev.labels.numpy()),
                     "leak_mlp": leakage(ppr, held_groups, pev, ev.attrs[:, column].numpy(), True, seed)["leak_mlp"],
                     "retention": retention_r2(ppr, held, pev, ev, problem, seed) / raw_retention})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default="style,rotation,conv")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--clusters", default="auto", help="comma-separated piece counts; auto = the silhouette's")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    for bad in [p for p in args.problems.split(",") if p not in PROBLEMS]:
        raise SystemExit(f"Unknown problem {bad!r}: use {list(PROBLEMS)}.")
    clusters = [None if c == "auto" else int(c) for c in args.clusters.split(",")]
    print("| problem | seed | pieces | task | MLP leak | retention | purity | matched | gw_rank |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.problems.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for r in run(name, seed, clusters, args.split):
                cells = [f"{r[key]:.3f}" if isinstance(r.get(key), float) else str(r.get(key, ""))
                         for key in ("task", "leak_mlp", "retention", "purity", "matched", "gw_rank")]
                print(f"| {name} | {seed} | {r['clusters']} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
