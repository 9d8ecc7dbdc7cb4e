"""One backbone pass per batch: the statistics pre-pass reads the start of epoch 0 once, and training takes those
features instead of running the backbone on them again; a one-pass iterator trains one epoch on every batch, and is
refused before any work when fit would read it twice."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from conftest import loader_of, make_site_problem
from dmm_wrap import Attribute, DebiasedEncoder, FitConfig
from dmm_wrap.train.prepass import PrePass, RunningMoments

SITE = [Attribute("site", "categorical", 3)]
BATCHES = 5


class CountingBackbone(nn.Module):
    """A tiny MLP that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


def _loader(attrs: str = "site") -> torch.utils.data.DataLoader:
    x, _, s = make_site_problem(32 * BATCHES, seed=0)
    b = s.float()[:, None]
    if attrs == "site+level":
        b = torch.cat([b, x[:, 8:9] + torch.randn(len(x), 1, generator=torch.Generator().manual_seed(1))], 1)
    return loader_of(x, b, batch_size=32, shuffle=False)


def _encoder(backbone: nn.Module, lazy: bool, **head_options) -> DebiasedEncoder:
    enc = DebiasedEncoder(backbone, None, SITE, input_size=None if lazy else (16,), **head_options)
    backbone.calls = 0  # the width inference of input_size= is not a training pass
    return enc


@pytest.mark.parametrize("stats_batches", [32, 2], ids=["stats-beyond-the-epoch", "stats-within-it"])
@pytest.mark.parametrize("lazy", [True, False], ids=["heads-sized-on-the-first-batch", "input_size"])
@pytest.mark.parametrize("standardize", [True, False], ids=["standardize", "raw"])
def test_one_backbone_forward_per_training_batch(stats_batches: int, lazy: bool, standardize: bool) -> None:
    backbone = CountingBackbone()
    enc = _encoder(backbone, lazy, standardize=standardize)
    history = enc.fit(_loader(), epochs=2, stats_batches=stats_batches, progress=False)
    assert history.steps_done == 2 * BATCHES  # every batch trained on, the pre-pass's included
    assert backbone.calls == 2 * BATCHES  # and each one ran through the backbone once per epoch


def test_whole_epoch_statistics_cost_a_second_pass() -> None:
    # Negative control: stats_batches=None needs every batch before the first step, and keeping a whole epoch would
    # tie memory to the data set's size, so epoch 0 runs the backbone twice. The counter sees it.
    backbone = CountingBackbone()
    history = _encoder(backbone, lazy=True).fit(_loader(), epochs=2, stats_batches=None, progress=False)
    assert history.steps_done == 2 * BATCHES
    assert backbone.calls == 3 * BATCHES


@pytest.mark.parametrize("stats_batches, used", [(3, 3), (32, BATCHES), (None, BATCHES)])
def test_statistics_are_those_of_the_first_stats_batches(stats_batches: int | None, used: int) -> None:
    attributes = SITE + [Attribute("level", "continuous")]
    backbone = CountingBackbone()
    enc = DebiasedEncoder(backbone, None, attributes)
    loader = _loader("site+level")
    enc.fit(loader, epochs=1, stats_batches=stats_batches, progress=False)
    zs, bs = RunningMoments(32), RunningMoments(2)
    for (x, b), _ in zip(loader, range(used)):
        zs.update(enc.features(x))
        bs.update(b)
    heads = enc.heads
    assert torch.equal(heads.feature_mean, zs.mean.float()) and torch.equal(heads.feature_std, zs.std.float())
    assert torch.equal(heads.attr_mean, torch.tensor([0.0, bs.mean[1].item()]))  # categorical columns stay raw
    assert torch.equal(heads.attr_std, torch.tensor([1.0, bs.std[1].float().item()]))


def test_training_takes_every_batch_once_in_order() -> None:
    enc = _encoder(CountingBackbone(), lazy=False)
    seen: list[Tensor] = []
    enc.heads.h.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    loader = _loader()
    enc.fit(loader, epochs=1, stats_batches=2, progress=False)
    distinct = [z for i, z in enumerate(seen) if i == 0 or not torch.equal(z, seen[i - 1])]
    expected = [enc.heads.normalize(enc.features(x)) for x, _ in loader]
    assert len(distinct) == len(expected) == BATCHES
    for got, want in zip(distinct, expected):
        torch.testing.assert_close(got, want)


ONE_PASS = [lambda batches: (b for b in batches), lambda batches: iter(batches)]


@pytest.mark.parametrize("make", ONE_PASS, ids=["generator", "list-iterator"])
@pytest.mark.parametrize("stats_batches", [32, 2, None], ids=["stats-beyond-the-pass", "stats-within-it", "stats-all"])
@pytest.mark.parametrize("lazy", [True, False], ids=["heads-sized-on-the-first-batch", "input_size"])
def test_one_pass_iterator_trains_on_every_batch_once(make, stats_batches: int | None, lazy: bool) -> None:
    backbone = CountingBackbone()
    enc = _encoder(backbone, lazy, standardize=stats_batches is not None)  # None: whole-pass statistics need 2 passes
    x, _, s = make_site_problem(16 * 10, seed=0)
    batches = [(x[i:i + 16], s[i:i + 16].float()[:, None]) for i in range(0, len(x), 16)]
    history = enc.fit(make(batches), epochs=1, stats_batches=stats_batches, progress=False)
    assert history.steps_done == 10 and history.step == list(range(10))  # every batch a step, none lost
    assert backbone.calls == 10  # each batch through the backbone once: nothing read twice, nothing skipped


@pytest.mark.parametrize("make", ONE_PASS, ids=["generator", "list-iterator"])
@pytest.mark.parametrize("options, reason", [
    (dict(epochs=2), "epochs=2"),
    (dict(epochs=1, stats_batches=None), "stats_batches=None"),
    (dict(epochs=1, resume=True, checkpoint_dir="unused"), "resume=True"),
])
def test_one_pass_iterators_that_would_be_read_twice_are_refused_before_any_work(make, options, reason) -> None:
    backbone = CountingBackbone()
    enc = _encoder(backbone, lazy=True)
    batches = list(_loader())
    one_pass = make(batches)
    with pytest.raises(TypeError, match=rf"one-pass iterator .*{reason}.* Pass a re-iterable loader \(e\.g\. a "
                                        r"DataLoader or a list"):
        enc.fit(one_pass, progress=False, **options)
    assert backbone.calls == 0 and enc.heads is None
    assert next(one_pass) is batches[0]  # nothing was drawn from it
    # Control: the same batches in a list train on every one, each epoch.
    assert enc.fit(batches, epochs=2, progress=False).steps_done == 2 * BATCHES
    assert backbone.calls == 2 * BATCHES


def test_kept_features_do_not_hold_their_base_tensor() -> None:
    """A class token is a view of the whole [N, T, C] sequence; the pre-pass keeps a copy of it alone."""
    x = torch.randn(4, 16)
    prepass = PrePass([(x, torch.zeros(4, 1))], tuple(SITE), lambda inputs: inputs.reshape(4, 4, 4)[:, 0],
                      FitConfig(), torch.device("cpu"), standardize=True)
    with prepass:
        assert prepass.feature_dim() == 4
        z, _ = next(prepass.statistics_batches())
        assert torch.equal(z, x[:, :4]) and z.untyped_storage().nbytes() == z.numel() * z.element_size()
