"""The leakage suite's problems: generated data behind frozen encoders, each with train / val / test splits.

Every problem yields, per split, inputs X for a frozen backbone, the attributes B, a task label Y and each sample's
own within-class detail D (the content noise, or the writer of a digit): a property beyond the task that B does not
explain, used to measure what the debiased features keep. In all but the additive problem the attribute is entangled
with the content: it changes how the content looks, not only where the features sit, and yet a perfect debiaser that
needs no B at inference exists, because B is readable from the features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dmm_wrap import Attribute

Split = Literal["train", "val", "test", "select", "probe"]
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3, "select": 4, "probe": 5}
"""`probe`: the split the suite's leakage and retention probes are trained on, as large as train (the probe has as
much data as the debiaser had); no method is fitted on it, so a probe cannot be helped by what a debiaser learnt of
its own training samples."""


@dataclass
class SplitData:
    """One split of a problem, held in memory (the suite's problems are small; the library itself streams)."""

    inputs: Tensor
    """Backbone inputs [N, ...]."""
    attrs: Tensor
    """Attributes [N, A] float32, class ids in categorical columns."""
    labels: Tensor
    """Task labels [N], int64."""
    detail: Tensor
    """Within-class detail [N, K] that the attribute does not explain (what retention is measured on)."""


@dataclass
class Problem:
    """A backbone, its hooked layer, the attributes and a sampler of splits."""

    name: str
    backbone: nn.Module
    layer: str | None
    attributes: tuple[Attribute, ...]
    sample: Callable[[Split], SplitData]
    batch_size: int
    epochs: int
    """Training budget (epochs over the train split) of every DeepMinMax variant on this problem."""
    fit_options: dict | None = None
    """FitConfig options of the dmm variants on this problem (the digits job's shipped config); None = defaults."""


def _frozen_encoder(in_dim: int, out_dim: int, gen: torch.Generator) -> nn.Module:
    """A random two-layer tanh network: the frozen 'pretrained' encoder of the vector problems."""
    enc = nn.Sequential(nn.Linear(in_dim, 128), nn.Tanh(), nn.Linear(128, out_dim))
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1))
    return enc.requires_grad_(False).eval()


class _AddShift(nn.Module):
    """Encoder of the additive problem: enc(content) + a per-group shift, the group given as trailing one-hot inputs."""

    def __init__(self, enc: nn.Module, shifts: Tensor, content_dim: int) -> None:
        super().__init__()
        self.enc = enc
        self.register_buffer("shifts", shifts)
        self.content_dim = content_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.enc(x[:, :self.content_dim]) + x[:, self.content_dim:] @ self.shifts


def rotate_planes(c: Tensor, angle: Tensor) -> Tensor:
    """Rotate each consecutive coordinate pair (0, 1), (2, 3), ... of c [N, D] by angle [N] (radians)."""
    cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    even, odd = c[:, 0::2], c[:, 1::2]
    out = torch.empty_like(c)
    out[:, 0::2], out[:, 1::2] = cos * even - sin * odd, sin * even + cos * odd
    return out


VECTOR_SIZES: dict[Split, int] = {"train": 4000, "val": 2000, "test": 2000, "select": 2000, "probe": 4000}
CONV_SIZES: dict[Split, int] = {"train": 1500, "val": 500, "test": 500, "select": 500, "probe": 1500}
DIGITS_SIZES: dict[Split, int] = {"train": 4096, "val": 2048, "test": 2048, "select": 8192, "probe": 4096}
"""`select`: the job's validation images (data.num_val, fit.select_samples: 8,192); 2,048 until 2026-12-01."""
STYLE_STRENGTH = 2.0
"""The style problem's strength: the smallest of 1, 1.5, 2, 2.5, 3 at which a fresh MLP probe (trained on the probe
split, scored on val) reads the group from the raw features at >= 0.98 for seeds 0, 1 and 2 (1: 0.85-0.89, 1.5:
0.95-0.97, 2: 0.99). Chosen from the raw features alone, before any method was run: where the group is not a function
of the features, no map that needs no B can hide it and keep the content (samples the groups share cannot be moved
apart), so the suite's premise needs it readable. Strength 1 is kept as "style_overlap"."""


def vector_problem(kind: str, seed: int, n: dict[Split, int] | None = None, strength: float = 1.0) -> Problem:
    """A 16-d content (8 classes, Gaussian detail) seen through a frozen random encoder (64-d features).

    kind: "additive" (each of 4 groups shifts the features), "style" (each group applies a near-identity gain,
    offset and tanh to the content, as staining does; `strength` scales the gain's spread, the offset and the tanh),
    "rotation" (each group applies its own random rotation to the content: an arbitrary transform) or "continuous" (a
    uniform angle in +-45 degrees rotates every coordinate pair).
    """
    n = n or VECTOR_SIZES
    dim, classes, groups, zdim = 16, 8, 4, 64
    gen = torch.Generator().manual_seed(10_000 + seed)
    means = torch.randn(classes, dim, generator=gen) * 1.5
    enc = _frozen_encoder(dim, zdim, gen)
    shifts = torch.randn(groups, zdim, generator=gen) * 0.5
    gain = 1 + strength * 0.4 * (torch.rand(groups, generator=gen) - 0.5)
    offset = torch.randn(groups, dim, generator=gen) * 0.3 * strength
    bend = (torch.rand(groups, generator=gen) - 0.5) * 0.8 * strength
    rotations = torch.linalg.qr(torch.randn(groups, dim, dim, generator=gen))[0]
    continuous = kind == "continuous"

    def sample(split: Split) -> SplitData:
        g = torch.Generator().manual_seed(100 * seed + SPLIT_SEEDS[split])
        m = n[split]
        y = torch.randint(0, classes, (m,), generator=g)
        detail = torch.randn(m, dim, generator=g) * 0.5
        c = means[y] + detail
        if continuous:
            b = (torch.rand(m, generator=g) - 0.5) * (math.pi / 2)
            x = rotate_planes(c, b)
            b = b / (math.pi / 4)  # in [-1, 1]
        else:
            b = torch.randint(0, groups, (m,), generator=g)
            if kind == "additive":
                x = torch.cat([c, nn.functional.one_hot(b, groups).float()], 1)
            elif kind == "style":
                x = gain[b, None] * c + offset[b] + bend[b, None] * torch.tanh(c)
            elif kind == "rotation":
                x = torch.einsum("nij,nj->ni", rotations[b], c)
            else:
                raise ValueError(f"Unknown vector problem {kind!r}: use additive, style, rotation or continuous.")
        return SplitData(x, b.float()[:, None], y, detail[:, :4])

    backbone = _AddShift(enc, shifts, dim) if kind == "additive" else enc
    attr = Attribute("angle", "continuous") if continuous else Attribute("group", "categorical", groups)
    return Problem(kind, backbone, None, (attr,), sample, batch_size=256, epochs=20)


def conv_problem(seed: int, n: dict[Split, int] | None = None) -> Problem:
    """Generated 32x32 images (a bright square left or right: the task; its height: the detail) behind a random-init
    torchvision ResNet-18 hooked at layer2 (the quickstart's kind). Each of 3 sites tints the image, changes its
    contrast and adds its own noise level."""
    from dmm_wrap import create_backbone

    n = n or CONV_SIZES
    torch.manual_seed(20_000 + seed)
    backbone = create_backbone("torchvision:resnet18").eval()
    tint = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]])
    contrast = torch.tensor([1.0, 0.6, 1.4])
    noise = torch.tensor([0.3, 0.5, 0.2])

    def sample(split: Split) -> SplitData:
        g = torch.Generator().manual_seed(100 * seed + SPLIT_SEEDS[split])
        m = n[split]
        label = torch.randint(0, 2, (m,), generator=g)
        site = torch.randint(0, 3, (m,), generator=g)
        col = 4 + 16 * label + torch.randint(0, 6, (m,), generator=g)
        row = torch.randint(4, 20, (m,), generator=g)
        rows, cols = torch.arange(32)[None, :, None], torch.arange(32)[None, None, :]
        square = ((rows >= row[:, None, None]) & (rows < row[:, None, None] + 8)
                  & (cols >= col[:, None, None]) & (cols < col[:, None, None] + 8)).float()
        x = 2.0 * square[:, None] * contrast[site][:, None, None, None]
        x = x + noise[site][:, None, None, None] * torch.randn(m, 3, 32, 32, generator=g) + tint[site][:, :, None, None]
        detail = torch.stack([row.float(), (col - 4 - 16 * label).float()], 1)
        return SplitData(x, site.float()[:, None], label, detail)

    return Problem("conv", backbone, "layer2", (Attribute("site", "categorical", 3),), sample, batch_size=128,
                   epochs=8)


WRITERS_VAL_FRACTION = 0.2
"""Share of the training writers (source images) that `digits_writers` holds out for its val split."""


def digits_problem(seed: int, n: dict[Split, int] | None = None, encoder: str = "digits",
                   writers_val: bool = False) -> Problem:
    """The default job: a shipped digits encoder on generated digits (site, rotation, stroke width). The detail is
    the writer: the first principal components of the source 8x8 digit minus its class mean.

    encoder: "digits" (the job's, trained with digit labels) or "digits_label_free" (never read a digit label).
    writers_val: the val split draws writers that train, select and probe never see (`WRITERS_VAL_FRACTION` of the
    training writers, chosen by the seed), as the test split does, so that settings are chosen seeing the shift to
    new writers; the test split is unchanged. Without it, val renders the training writers with draws of their own."""
    from dmm_wrap import load_digits_encoder
    from dmm_wrap.apps.digits import SyntheticDigits, source_indices
    from dmm_wrap.apps.pretrained import DIGITS_ENCODER_LAYER

    n = n or DIGITS_SIZES
    backbone = load_digits_encoder(name=encoder)
    if writers_val:  # the training writers split in two, by the seed: val draws `held`, the other splits `kept`
        pool = source_indices("train")
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + seed))
        cut = round(WRITERS_VAL_FRACTION * len(pool))
        held, kept = pool[order[:cut]].sort().values, pool[order[cut:]].sort().values
    attributes = SyntheticDigits("train", 8).attributes

    def sample(split: Split) -> SplitData:
        # val, select and probe draw from the training writers with seeds of their own; test uses the held-out
        # writers.
        source = "test" if split == "test" else "train"
        ds = SyntheticDigits(source, n[split], num_sites=3, seed=100 * seed + SPLIT_SEEDS[split])
        if writers_val and split != "test":
            ds.source_indices = held if split == "val" else kept  # the pool _render draws source images from
        batch = ds.generate()
        return SplitData(batch.images, batch.attrs, batch.labels, _writer_detail(ds))

    # The shipped config's fit section (configs/synthetic_digits.yaml) over 480 steps; --epochs-scale 4 --train-scale
    # 60 runs the job's protocol: 1,920 steps, each reading draws no step read before (245,760). The selection probe
    # reads the job's 8,192 validation images (until 2026-12-01 the suite gave it 2,048: FitConfig's default).
    options = {"lr": 1e-3, "estimator_lr": 5e-3, "lam": 0.9, "estimator_steps": 5, "ema_decay": 0.995,
               "select_samples": 8192}
    name = encoder + ("_writers" if writers_val else "")
    return Problem(name, backbone, DIGITS_ENCODER_LAYER, attributes, sample, batch_size=128, epochs=15,
                   fit_options=options)


def _writer_detail(ds: object) -> Tensor:
    """Each sample's writer: the first 4 principal components of its source 8x8 digit minus its class mean."""
    from dmm_wrap.apps.digits import sample_seed as _sample_seed, source_digits as _source_digits

    images, labels = _source_digits()
    flat = images.flatten(1)
    means = torch.stack([flat[labels == k].mean(0) for k in range(10)])
    resid = flat - means[labels]
    basis = torch.linalg.svd(resid - resid.mean(0), full_matrices=False).Vh[:4]
    pool = ds.source_indices  # type: ignore[attr-defined]
    first = torch.tensor([float(torch.rand(1, generator=torch.Generator().manual_seed(
        _sample_seed(ds.seed, ds.split, i)))) for i in range(ds.num_samples)])  # type: ignore[attr-defined]
    src = pool[(first * len(pool)).long().clamp_max(len(pool) - 1)]
    return resid[src] @ basis.T


def scaled(sizes: dict[Split, int], train_scale: int) -> dict[Split, int]:
    """`sizes` with the train split `train_scale` times as large (the other splits, the probe's included, unchanged)."""
    return {**sizes, "train": sizes["train"] * train_scale}


def _vector(kind: str, strength: float = 1.0) -> Callable[..., Problem]:
    return lambda seed, train_scale=1: vector_problem(kind, seed, scaled(VECTOR_SIZES, train_scale), strength)


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "additive": _vector("additive"),
    "style": _vector("style", STYLE_STRENGTH),
    "style_overlap": _vector("style"),
    "rotation": _vector("rotation"),
    "continuous": _vector("continuous"),
    "conv": lambda seed, train_scale=1: conv_problem(seed, scaled(CONV_SIZES, train_scale)),
    "digits": lambda seed, train_scale=1: digits_problem(seed, scaled(DIGITS_SIZES, train_scale)),
    "digits_label_free": lambda seed, train_scale=1: digits_problem(seed, scaled(DIGITS_SIZES, train_scale),
                                                                     "digits_label_free"),
    "digits_writers": lambda seed, train_scale=1: digits_problem(seed, scaled(DIGITS_SIZES, train_scale),
                                                                  writers_val=True),
}
"""Problem builders by name, each taking the seed that draws its data (and its random encoder) and `train_scale`, the
size of the train split (what every method is fitted on) as a multiple of the probe split's."""
