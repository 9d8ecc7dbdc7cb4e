"""The moving average of h_theta's weights (`FitConfig.ema_decay`, `dmm_wrap.train.averaging`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from conftest import loader_of, site_data, site_encoder
from dmm_wrap import Attribute, DebiasedEncoder, FitConfig
from dmm_wrap.train import averaging

SITE = [Attribute("site", "categorical", 3)]
DECAY = 0.9


def _model() -> DebiasedEncoder:
    return site_encoder(SITE)


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return site_data(320, seed)


def _fit(model: DebiasedEncoder, steps: int, val: bool = False, **options):
    x, s = _data(0)
    val_loader = loader_of(*_data(1), batch_size=64, shuffle=False) if val else None
    return model.fit(loader_of(x, s, batch_size=32), epochs=100, max_steps=steps, stats_batches=3, select_every=10,
                     select_samples=128, progress=False, val_loader=val_loader, **options)


def _weights(model: DebiasedEncoder) -> torch.Tensor:
    return parameters_to_vector(model.heads.h.parameters()).detach().clone()


def _trajectory(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """h_theta's weights after each of its updates, recorded as averaging.update sees them."""
    seen: list[torch.Tensor] = []
    update = averaging.update

    def recording(objective) -> None:
        seen.append(parameters_to_vector(objective.h.parameters()).detach().clone())
        update(objective)

    monkeypatch.setattr(averaging, "update", recording)
    return seen


def _ema(trajectory: list[torch.Tensor], decay: float) -> torch.Tensor:
    average = trajectory[0].clone()
    for w in trajectory[1:]:
        average = decay * average + (1 - decay) * w
    return average


def test_run_ends_with_the_moving_average_and_trains_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    plain_steps = _trajectory(monkeypatch)
    plain = _model()
    reference = _fit(plain, 20)
    averaged_steps = _trajectory(monkeypatch)
    averaged = _model()
    history = _fit(averaged, 20, ema_decay=DECAY)
    # Averaging changes no step of the game: the same losses and the same weights after every update.
    assert history.loss == reference.loss and len(averaged_steps) == 20
    assert all(torch.equal(a, b) for a, b in zip(plain_steps, averaged_steps))
    # The run ends with e_1 = w_1, e_t = d e_(t-1) + (1 - d) w_t; without averaging, with w_20.
    assert torch.allclose(_weights(averaged), _ema(averaged_steps, DECAY), atol=1e-6)
    assert torch.equal(_weights(plain), plain_steps[-1])
    assert (_weights(averaged) - plain_steps[-1]).abs().max() > 1e-3  # negative control: the two differ
    assert not hasattr(averaged.heads, "h_average")  # training state: not saved with the model
    assert not any("h_average" in k for k in averaged.state_dict())


def test_selection_scores_the_average(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _trajectory(monkeypatch)
    model = _model()
    history = _fit(model, 30, val=True, ema_decay=DECAY)
    assert history.select_step == [10, 20, 30]
    best = min(range(3), key=lambda i: (history.select_leak[i], -i))
    assert history.selected_step == history.select_step[best]
    # The kept weights are the average as it stood at the selected step (the check runs before that step's update).
    assert torch.allclose(_weights(model), _ema(steps[:history.selected_step], DECAY), atol=1e-6)


def test_averaged_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    whole = _model()
    _fit(whole, 20, ema_decay=DECAY, checkpoint_dir=str(tmp_path / "whole"), checkpoint_every=5)
    parted = _model()
    _fit(parted, 10, ema_decay=DECAY, checkpoint_dir=str(tmp_path / "parted"), checkpoint_every=5)
    resumed = _model()
    _fit(resumed, 20, ema_decay=DECAY, checkpoint_dir=str(tmp_path / "parted"), checkpoint_every=5, resume=True)
    assert torch.equal(_weights(whole), _weights(resumed))
    # The two runs must agree on averaging.
    with pytest.raises(ValueError, match="written by a run with ema_decay, and this run has ema_decay=None"):
        _fit(_model(), 40, checkpoint_dir=str(tmp_path / "parted"), checkpoint_every=5, resume=True)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_ema_decay_out_of_range_names_the_key(decay: float) -> None:
    with pytest.raises(ValueError, match=r"FitConfig.ema_decay must be None or lie in \(0, 1\)"):
        FitConfig(ema_decay=decay)
