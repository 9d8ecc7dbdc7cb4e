"""Fit DeepMinMax heads on a fixed synthetic problem, in one process or under torchrun; each rank saves its heads.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/scripts/ddp_fit.py --out DIR --batch-size 32
    python tests/scripts/ddp_fit.py --out DIR --batch-size 64     # the same global batch in one process
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_site_problem  # noqa: E402

from dmm_wrap import Attribute, DebiasedEncoder  # noqa: E402
from dmm_wrap import distributed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="per-process batch")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--uneven", type=int, default=0, help="rank 1 gets this many fewer samples")
    parser.add_argument("--nan-at", type=int, default=None, help="rank 1's sample with this index is NaN")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    x, _, s = make_site_problem(args.samples, seed=0)
    attrs = torch.stack([s.float(), x[:, 8] + 0.1 * x[:, 10]], 1)
    if args.nan_at is not None and distributed.rank() == 1:
        x[args.nan_at] = float("nan")
    dataset = TensorDataset(x, attrs)
    sampler = DistributedSampler(dataset, shuffle=False) if distributed.is_distributed() else None
    if args.uneven and distributed.rank() == 1:
        sampler = list(sampler)[: -args.uneven]
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, shuffle=False)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
    model = DebiasedEncoder(backbone, None, [Attribute("site", "categorical", 3), Attribute("level", "continuous")])
    history = model.fit(loader, max_steps=args.steps, epochs=args.epochs, estimator_steps=2, stats_batches=4,
                        progress=False, checkpoint_dir=args.checkpoint_dir, checkpoint_every=5, resume=args.resume)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = distributed.rank()
    save_file({k: v.contiguous() for k, v in model.heads.state_dict().items()}, str(out / f"heads-rank{r}.safetensors"))
    (out / f"history-rank{r}.json").write_text(json.dumps(history.as_dict()))
    distributed.shutdown()


if __name__ == "__main__":
    main()
