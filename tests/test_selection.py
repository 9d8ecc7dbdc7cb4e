"""Model selection by a fresh probe on a validation sample (`fit(..., val_loader=)`, `dmm_wrap.train.selection`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import loader_of, site_data, site_encoder
from dmm_wrap import Attribute, DebiasedEncoder
from dmm_wrap.train.selection import probe_leakage

SITE = [Attribute("site", "categorical", 3)]


def _model() -> DebiasedEncoder:
    return site_encoder(SITE)


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return site_data(320, seed)


def _fit(model: DebiasedEncoder, steps: int, val: bool, **options):
    x, s = _data(0)
    val_loader = loader_of(*_data(1), batch_size=64, shuffle=False) if val else None
    return model.fit(loader_of(x, s, batch_size=32), epochs=100, max_steps=steps, stats_batches=3, select_every=10,
                     select_samples=128,
                     progress=False, val_loader=val_loader, **options)


def test_probe_reads_a_planted_attribute_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    n = 1024
    site = torch.randint(0, 3, (n,), generator=g)
    angle = torch.rand(n, generator=g)
    b = torch.stack([site.float(), angle], 1)
    attrs = [Attribute("site", "categorical", 3), Attribute("angle", "continuous")]
    noise = torch.randn(n, 8, generator=g)
    assert probe_leakage(noise, b, attrs) < 0.1  # negative control: nothing to read
    with_site = torch.cat([noise, torch.nn.functional.one_hot(site, 3).float()], 1)
    state = torch.get_rng_state()
    assert probe_leakage(with_site, b[:, :1], attrs[:1]) > 0.95
    assert torch.equal(state, torch.get_rng_state())  # the probe draws from its own stream
    with_angle = torch.cat([noise, torch.tanh(4 * angle - 2)[:, None]], 1)  # nonlinear, still readable
    assert probe_leakage(with_angle, b[:, 1:], attrs[1:]) > 0.8


def test_selection_ends_with_the_least_leaking_step_and_changes_no_other_draw() -> None:
    selected, plain = _model(), _model()
    history = _fit(selected, 40, val=True)
    reference = _fit(plain, 40, val=False)
    assert history.select_step == [10, 20, 30, 40]
    best = min(range(4), key=lambda i: history.select_leak[i])
    assert history.selected_step == history.select_step[best]
    assert history.loss == reference.loss and reference.select_step == [] and reference.selected_step is None
    # The kept heads are those of a plain run stopped at the selected step.
    truncated = _model()
    _fit(truncated, history.selected_step, val=False)
    x = _data(2)[0]
    with torch.no_grad():
        assert torch.equal(selected(x), truncated(x))
    assert not hasattr(selected.heads, "selection") and not hasattr(selected.heads, "alignment")
    if history.selected_step != 40:  # the plain run's heads moved on after the selected step
        with torch.no_grad():
            assert not torch.equal(selected(x), plain(x))


def test_selection_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    whole = _model()
    history = _fit(whole, 40, val=True, checkpoint_dir=str(tmp_path / "whole"), checkpoint_every=5)
    parted = _model()
    _fit(parted, 25, val=True, checkpoint_dir=str(tmp_path / "parted"), checkpoint_every=5)
    model = _model()
    resumed = _fit(model, 40, val=True, checkpoint_dir=str(tmp_path / "parted"), checkpoint_every=5, resume=True)
    assert resumed.select_step == history.select_step and resumed.select_leak == history.select_leak
    assert resumed.selected_step == history.selected_step
    x = _data(2)[0]
    with torch.no_grad():
        assert torch.equal(whole(x), model(x))
    # Loading the finished run's final checkpoint gives the selected heads again, with nothing left to train.
    final = _model()
    assert _fit(final, 40, val=True, checkpoint_dir=str(tmp_path / "parted"), checkpoint_every=5,
                resume=True).selected_step == history.selected_step
    with torch.no_grad():
        assert torch.equal(whole(x), final(x))


def test_selection_input_errors(tmp_path: Path) -> None:
    empty = loader_of(torch.zeros(0, 16), torch.zeros(0, 1), shuffle=False)
    x, s = _data(0)
    with pytest.raises(ValueError, match="val_loader is empty"):
        _model().fit(loader_of(x, s, batch_size=32), max_steps=5, progress=False, val_loader=empty)
    _fit(_model(), 10, val=False, checkpoint_dir=str(tmp_path / "plain"), checkpoint_every=5)
    with pytest.raises(ValueError, match="written by a run without val_loader"):
        _fit(_model(), 20, val=True, checkpoint_dir=str(tmp_path / "plain"), checkpoint_every=5, resume=True)
