"""The alignment head on a site it never saw, on the validation side: the digits job's head fitted on sites 0-2 and
scored on site 3, with draws of the training writers (the test split's writers stay for the report).

For each `outliers` quantile (None: every row is mapped), the head is fitted as the default job fits it (the shipped
digits encoder, joint groups of site, rotation and width, `samples` = every draw, seed = the run's seed) on `--draws`
training draws of sites 0-2; a logistic regression (the evaluation's task classifier) is trained on the features of
8,192 of those draws and scored on 1,536 further draws of the seen sites and 512 of site 3, raw `Z` and `Z~` alike:
accuracy and one-vs-rest AUROC.

Example:
    python benchmarks/unseen_site.py --seed 0 --outliers none,0.99,0.98 --json benchmarks/results/val_unseen_site.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dmm_wrap import DebiasedEncoder, load_digits_encoder
from dmm_wrap.apps.digits import SyntheticDigits
from dmm_wrap.apps.pretrained import DIGITS_ENCODER_LAYER

SEEN, UNSEEN = [0, 1, 2], [3]
SEEDS = {"train": 1, "eval": 2}
"""Data seeds (100 * seed + this): the fit's draws, and the seen and unseen evaluation draws."""


def draws(n: int, seed: int, part: str, sites: list[int]) -> SyntheticDigits:
    return SyntheticDigits("train", n, num_sites=4, seed=100 * seed + SEEDS[part], sites=sites)


@torch.no_grad()
def scores(encode, fit_rows, seen, unseen) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Task accuracy and AUROC on the seen and the unseen site of a logistic regression on `encode`'s features."""
    def feats(batch):  # type: ignore[no-untyped-def]
        return torch.cat([encode(batch.images[i:i + 1024]) for i in range(0, len(batch.images), 1024)]).numpy()

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(feats(fit_rows), fit_rows.labels.numpy())
    out = {}
    for name, batch in (("seen", seen), ("unseen", unseen)):
        x, y = feats(batch), batch.labels.numpy()
        out[f"{name}_task"] = float(clf.score(x, y))
        out[f"{name}_auroc"] = float(roc_auc_score(y, clf.predict_proba(x), multi_class="ovr"))
    return out


def run(seed: int, total: int, outliers: float | None) -> dict[str, object]:
    start = time.perf_counter()
    train = draws(total, seed, "train", SEEN)
    fit_rows = train.generate(range(min(8192, total)))
    seen, unseen = draws(1536, seed, "eval", SEEN).generate(), draws(512, seed, "eval", UNSEEN).generate()

    def loader():  # type: ignore[no-untyped-def]
        for i in range(0, total, 1024):
            batch = train.generate(range(i, min(i + 1024, total)))
            yield batch.images, batch.attrs

    enc = DebiasedEncoder(load_digits_encoder(), DIGITS_ENCODER_LAYER, train.attributes)
    enc.fit_alignment_head(loader(), samples=total, seed=seed, outliers=outliers)
    enc.eval()
    row: dict[str, object] = {"seed": seed, "draws": total, "outliers": outliers}
    row.update({f"raw_{k}": v for k, v in scores(enc.features, fit_rows, seen, unseen).items()})
    row.update({f"head_{k}": v for k, v in scores(enc, fit_rows, seen, unseen).items()})
    row["seconds"] = time.perf_counter() - start
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=245760, help="training draws (the default job's)")
    parser.add_argument("--outliers", default="none,0.99", help="comma-separated quantiles; none = every row mapped")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for q in args.outliers.split(","):
        row = run(args.seed, args.draws, None if q == "none" else float(q))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        rows.append(row)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
