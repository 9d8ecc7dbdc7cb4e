"""What a run of the CLI is made of, built from its `RunConfig`: the data loaders, the model, the preprocessing, and
the CPU thread limits it runs under."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from ..backbones import create_backbone
from ..config import Attribute, is_smoke_run
from ..inference import Preprocessing
from ..model import DebiasedEncoder
from .run_config import RunConfig


class RunData(NamedTuple):
    """The loaders of one run and what they carry."""

    attributes: tuple[Attribute, ...]
    """Attributes in the column order of the batches."""
    train: DataLoader
    """Training batches (shuffled when the dataset is map-style)."""
    train_eval: DataLoader
    """The same training data in a fixed order, for fitting the evaluation probes."""
    test: DataLoader
    """Held-out batches the evaluation scores on."""
    label_name: str
    """What the task label is (for figure titles)."""
    vocabulary: dict[str, list[str]] | None = None
    """image_csv / hf_dataset: the training split's string labels per column (`ImageCSVDataset.vocabulary`), which
    the held-out split was read with and the model records; None for data without text labels."""
    val: DataLoader | None = None
    """Held-out batches of the training sites for model selection (`fit(..., val_loader=)`); None = none
    configured. Sharded like `train` under torchrun: each rank reads its share of the selection sample."""
    probe: DataLoader | None = None
    """Held-out batches the evaluation's leakage probes are trained on (never fitted on); None = none configured,
    the probes train on `train_eval`."""


def run_preprocessing(cfg: RunConfig) -> Preprocessing | None:
    """How images of an image_csv / camelyon17 / hf_dataset run become tensors; saved with the model so that
    `model.preprocess` and `model.embed` see what training saw. Synthetic digits are generated as tensors: None."""
    d = cfg.data
    if d.kind == "synthetic_digits":
        return None
    size = cfg.input_size()
    return Preprocessing(input_size=(3, size, size), mean=tuple(d.mean), std=tuple(d.std), interpolation="bilinear",
                         crop_pct=1.0, crop_mode="squash")


class _Sets(NamedTuple):
    """The data sets of a run before they are batched."""

    train: Any
    test: Any
    val: Any
    attributes: tuple[Attribute, ...]
    label_name: str
    vocabulary: dict[str, list[str]] | None
    probe: Any = None


def _datasets(cfg: RunConfig, vocabulary: dict[str, list[str]] | None, with_val: bool) -> _Sets:
    """The data sets of `cfg.data` (the validation set None unless configured and `with_val`); only the chosen kind
    is imported."""
    d = cfg.data
    if d.kind == "synthetic_digits":
        from .digits import SyntheticDigits

        options = dict(image_size=cfg.input_size(), num_sites=d.num_sites, seed=d.seed)
        train = SyntheticDigits("train", d.num_train, sites=d.train_sites, **options)
        num_val = min(d.num_val, cfg.eval.smoke_samples) if is_smoke_run(cfg.fit.max_steps) else d.num_val
        val = SyntheticDigits("val", num_val, sites=d.train_sites, **options) if num_val and with_val else None
        num_probe = min(d.num_probe, cfg.eval.smoke_samples) if is_smoke_run(cfg.fit.max_steps) else d.num_probe
        probe = SyntheticDigits("probe", num_probe, sites=d.train_sites, **options) if num_probe else None
        return _Sets(train, SyntheticDigits("test", d.num_test, **options), val, train.attributes, "digit", None,
                     probe)
    transform = run_preprocessing(cfg).transform()
    if d.kind == "image_csv":
        from ..data import ImageCSVDataset

        options = dict(path_column=d.path_column, label_column=d.label_column, transform=transform)
        train = ImageCSVDataset(d.root, d.csv, d.attributes, vocabulary=vocabulary, **options)

        def held_out(csv: str | None) -> Any:
            return None if csv is None else ImageCSVDataset(d.root, csv, d.attributes, vocabulary=train.vocabulary,
                                                            **options)

        return _Sets(train, held_out(d.test_csv), held_out(d.val_csv if with_val else None), tuple(d.attributes),
                     d.label_column or "label", train.vocabulary, held_out(d.probe_csv))
    if d.kind == "hf_dataset":
        from ..data.hf import HFImageDataset, hf_split, load_hf_splits

        assert d.dataset is not None  # DataConfig checks it
        splits = load_hf_splits(d.dataset)
        hf_options = dict(image_column=d.image_column, label_column=d.label_column, transform=transform)

        def split(name: str, vocab: dict[str, list[str]] | None) -> HFImageDataset:
            return HFImageDataset(hf_split(splits, name.split("+"), d.dataset), d.attributes, vocabulary=vocab,
                                  source=f"Hugging Face dataset {d.dataset!r}, split {name!r}", **hf_options)

        train = split(d.train_split, vocabulary)
        val = split(d.val_split, train.vocabulary) if d.val_split and with_val else None
        probe = split(d.probe_split, train.vocabulary) if d.probe_split else None
        return _Sets(train, split(d.test_split or "test", train.vocabulary), val, tuple(d.attributes),
                     d.label_column or "label", train.vocabulary, probe)
    from ..data import camelyon17

    train = camelyon17(d.root, split=d.train_split.split("+"), transform=transform)
    test = camelyon17(d.root, split=(d.test_split or "id_val").split("+"), transform=transform)
    val = camelyon17(d.root, split=d.val_split.split("+"), transform=transform) if d.val_split and with_val else None
    probe = camelyon17(d.root, split=d.probe_split.split("+"), transform=transform) if d.probe_split else None
    return _Sets(train, test, val, train.attributes, "tumor", None, probe)


def build_data(cfg: RunConfig, rank: int = 0, world_size: int = 1,
               vocabulary: dict[str, list[str]] | None = None, with_val: bool = True) -> RunData:
    """Datasets and loaders described by `cfg.data` (imported lazily: only the chosen kind is loaded).

    With `world_size` > 1 the training loader reads this rank's shard (SyntheticDigits.shard, or a
    DistributedSampler seeded with data.seed); the evaluation loaders are never sharded. image_csv: the test CSV
    is read with the training CSV's vocabulary, or both with `vocabulary` (what a saved model recorded) when given.
    `with_val=False` leaves the validation set (model selection's, read by `fit` only) unbuilt and unread.
    """
    d = cfg.data
    sets = _datasets(cfg, vocabulary, with_val)
    # Page-locked batches let the host-to-GPU copies (non_blocking in the trainer) overlap with compute.
    pin = (cfg.fit.device or "").startswith("cuda") and torch.cuda.is_available()

    def loader(ds: Any, shuffle: bool) -> DataLoader:
        shuffle = shuffle and not isinstance(ds, IterableDataset)
        return DataLoader(ds, batch_size=d.batch_size, shuffle=shuffle, num_workers=d.num_workers, pin_memory=pin,
                          generator=torch.Generator().manual_seed(d.seed) if shuffle else None)

    def sharded(ds: Any, shuffle: bool) -> DataLoader:
        if world_size == 1:
            return loader(ds, shuffle)
        if isinstance(ds, IterableDataset):
            return loader(ds.shard(world_size, rank), False)
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=d.seed)
        return DataLoader(ds, batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers, pin_memory=pin)

    val = None if sets.val is None else sharded(sets.val, False)
    return RunData(sets.attributes, sharded(sets.train, True), loader(sets.train, False), loader(sets.test, False),
                   sets.label_name, sets.vocabulary, val, None if sets.probe is None else loader(sets.probe, False))


def build_model(cfg: RunConfig, attributes: Sequence[Attribute]) -> DebiasedEncoder:
    """The DebiasedEncoder described by `cfg.model`, its feature width inferred by one dummy forward."""
    m = cfg.model
    if m.digits_encoder:
        from .pretrained import DIGITS_ENCODER_LAYER, load_digits_encoder

        backbone = load_digits_encoder(m.weights, name=m.backbone)
        layer = m.layer if m.layer is not None else DIGITS_ENCODER_LAYER
    else:
        backbone = create_backbone(m.backbone, pretrained=m.pretrained)
        layer = m.layer
    size = cfg.input_size()
    preprocessing = run_preprocessing(cfg) if cfg.data.kind != "synthetic_digits" else "auto"
    return DebiasedEncoder(backbone, layer, attributes, pool=m.pool, input_size=(3, size, size),
                           preprocessing=preprocessing, **dataclasses.asdict(m.head))


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Limit torch and the OpenMP / BLAS thread pools to `n` threads inside the block (None: leave them)."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)


__all__ = ["RunData", "run_preprocessing", "build_data", "build_model", "cpu_threads"]
