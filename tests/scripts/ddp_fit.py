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
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_site_problem  # noqa: E402

from dmm_wrap import Attribute, DebiasedEncoder  # noqa: E402
from dmm_wrap import distributed  # noqa: E402
from dmm_wrap.train.checkpoint import TrainingInterrupted  # noqa: E402
from gate import Gate  # noqa: E402  (tests/scripts/gate.py, beside this script)


class NoisyData(Dataset):
    """(x + noise from the torch RNG, attrs): a resumed run matches only if each rank's RNG state is restored."""

    def __init__(self, x: torch.Tensor, attrs: torch.Tensor) -> None:
        self.x, self.attrs = x, attrs

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.05 * torch.randn(self.x.shape[1]), self.attrs[i]


def _record_alignment_rounds(out: Path) -> None:
    """Save each rank's alignment target after every round (OUT/align-rank<r>-<round>.safetensors)."""
    from dmm_wrap.train import aligning as trainer

    refit, rounds = trainer.refit_alignment, [0]

    def recording(objective, target, cfg) -> None:
        refit(objective, target, cfg)
        state = {k: v.contiguous().cpu() for k, v in target.state_dict().items()}
        save_file(state, str(out / f"align-rank{distributed.rank()}-{rounds[0]}.safetensors"))
        rounds[0] += 1

    trainer.refit_alignment = recording


def main() -> int:
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
    parser.add_argument("--match-weight", type=float, default=0.0, help="FitConfig.match_weight")
    parser.add_argument("--align-weight", type=float, default=0.0, help="FitConfig.align_weight (residual h_theta)")
    parser.add_argument("--shuffle", action="store_true", help="shuffled shards and noise from each rank's RNG")
    parser.add_argument("--select", action="store_true", help="model selection on a held-out set (val_loader)")
    parser.add_argument("--gate-at", type=int, default=None,
                        help="rank 0 blocks before the forward of this step until OUT/release exists")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    x, _, s = make_site_problem(args.samples, seed=0)
    attrs = torch.stack([s.float(), x[:, 8] + 0.1 * x[:, 10]], 1)
    if args.nan_at is not None and distributed.rank() == 1:
        x[args.nan_at] = float("nan")
    dataset = NoisyData(x, attrs) if args.shuffle else TensorDataset(x, attrs)
    sampler = DistributedSampler(dataset, shuffle=args.shuffle, seed=3) if distributed.is_distributed() else None
    if args.uneven and distributed.rank() == 1:
        sampler = list(sampler)[: -args.uneven]
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, shuffle=False)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gate_at is not None and distributed.rank() == 0:
        # One backbone call per batch read (the 4 statistics batches are trained on as steps 0-3): call k + 1 reads
        # step k's batch (test_distributed.py explains where uneven shards shift this).
        assert args.gate_at >= 4
        backbone.register_forward_pre_hook(Gate(out, args.gate_at + 1))
    if args.align_weight > 0:
        _record_alignment_rounds(out)
    model = DebiasedEncoder(backbone, None, [Attribute("site", "categorical", 3), Attribute("level", "continuous")],
                            residual=args.align_weight > 0)
    val_loader = None
    if args.select:
        vx, _, vs = make_site_problem(512, seed=1)
        val = TensorDataset(vx, torch.stack([vs.float(), vx[:, 8] + 0.1 * vx[:, 10]], 1))
        val_sampler = DistributedSampler(val, shuffle=False) if distributed.is_distributed() else None
        val_loader = DataLoader(val, batch_size=64, sampler=val_sampler)
    try:
        history = model.fit(loader, max_steps=args.steps, epochs=args.epochs, estimator_steps=2, stats_batches=4,
                            progress=False, checkpoint_dir=args.checkpoint_dir, checkpoint_every=5,
                            resume=args.resume, match_weight=args.match_weight,
                            align_weight=args.align_weight, align_every=5, val_loader=val_loader, select_every=6,
                            select_samples=256)
    except TrainingInterrupted as err:
        sys.stdout.write(f"rank {distributed.rank()} interrupted at step {err.step}\n")  # one write: lines of the
        sys.stdout.flush()  # two ranks share a pipe
        distributed.shutdown()  # every rank stops after the same step: a normal, synchronised exit
        return 128 + err.signum
    r = distributed.rank()
    save_file({k: v.contiguous() for k, v in model.heads.state_dict().items()}, str(out / f"heads-rank{r}.safetensors"))
    (out / f"history-rank{r}.json").write_text(json.dumps(history.as_dict()))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
