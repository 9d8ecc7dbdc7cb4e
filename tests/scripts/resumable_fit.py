"""A checkpointed fit that a test can stop and resume; prints the final step count and saves the heads.

    python tests/scripts/resumable_fit.py --out DIR --steps 45 [--resume] [--workers 2] [--gate-at 12]

The data are shuffled by a seeded DataLoader and augmented with noise from the torch RNG (in the loader's workers
with --workers), so a resumed run only matches an uninterrupted one if the data order and the RNG states are
restored. With --gate-at K the backbone blocks before the forward of step K: it writes DIR/waiting and continues
only once DIR/release exists, so a test can signal the run at a known step without relying on timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_site_problem  # noqa: E402

from dmm_wrap import Attribute, DebiasedEncoder  # noqa: E402
from dmm_wrap.train.checkpoint import TrainingInterrupted  # noqa: E402
from gate import Gate  # noqa: E402  (tests/scripts/gate.py, beside this script)

STATS_BATCHES = 3


class NoisySites(Dataset):
    def __init__(self, n: int) -> None:
        self.x, _, s = make_site_problem(n, seed=0)
        self.attrs = s.float()[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.05 * torch.randn(16), self.attrs[i]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--gate-at", type=int, default=None, help="block before the forward of this step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(NoisySites(320), batch_size=32, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
    if args.gate_at is not None:
        # One backbone call per batch: the first STATS_BATCHES (which also size the heads) are read ahead for the
        # statistics and trained on as steps 0.., so from there on step k is call k + 1.
        assert args.gate_at >= STATS_BATCHES
        backbone.register_forward_pre_hook(Gate(out, args.gate_at + 1))
    model = DebiasedEncoder(backbone, None, [Attribute("site", "categorical", 3)])
    try:
        history = model.fit(loader, max_steps=args.steps, epochs=100, estimator_steps=2, stats_batches=STATS_BATCHES,
                            progress=False, checkpoint_dir=str(out / "checkpoints"),
                            checkpoint_every=args.checkpoint_every, resume=args.resume)
    except TrainingInterrupted as err:
        print(f"interrupted at step {err.step}", flush=True)
        return 128 + err.signum
    save_file({k: v.contiguous() for k, v in model.heads.state_dict().items()}, str(out / "heads.safetensors"))
    print(f"steps_done {history.steps_done} logged {len(history.step)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
