"""The loss history of a training run, one entry per logged step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.objective import ThetaLosses

LOGGED = ("loss", "debias", "retain", "q_nll", "match", "align", "iso")
"""The FitHistory lists filled at each logged step, besides `step` and `club`, in recording order."""


@dataclass
class FitHistory:
    """Loss terms recorded during `fit`, one entry per logged step."""

    step: list[int] = field(default_factory=list)
    """Index of the h_theta step (0-based, counting warm-up steps)."""
    loss: list[float] = field(default_factory=list)
    """lam * L_d + (1 - lam) * L_r + match_weight * match + align_weight * align + iso_weight * iso."""
    debias: list[float] = field(default_factory=list)
    """L_d as minimised: max(CLUB estimate of I(B; Z~) summed over attributes, 0) in nats (raw estimates: `club`)."""
    retain: list[float] = field(default_factory=list)
    """L_r, -log m_phi(Z | Z~, B)."""
    q_nll: list[float] = field(default_factory=list)
    """Fit loss of CLUB's q networks."""
    match: list[float] = field(default_factory=list)
    """Group-matching term: sliced Wasserstein distance of each attribute group's Z~ to the batch's (0 when off)."""
    align: list[float] = field(default_factory=list)
    """Piecewise-alignment term: mean squared distance of Z~ to its aligned target (0 when off)."""
    iso: list[float] = field(default_factory=list)
    """Within-group isometry term (0 when off)."""
    club: dict[str, list[float]] = field(default_factory=dict)
    """CLUB estimate per attribute."""
    steps_done: int = 0
    """Total optimisation steps taken."""
    select_step: list[int] = field(default_factory=list)
    """Steps at which h_theta was scored by the selection probe (with `fit(..., val_loader=)`)."""
    select_leak: list[float] = field(default_factory=list)
    """The probe's leakage above chance at those steps, in [0, 1] (largest over attributes; `selection`)."""
    selected_step: int | None = None
    """The step whose h_theta the run ended with (None: the last one, no selection)."""

    def as_dict(self) -> dict[str, Any]:
        """The history as plain lists and numbers (JSON-ready)."""
        return {"step": self.step, "loss": self.loss, "debias": self.debias, "retain": self.retain,
                "q_nll": self.q_nll, "match": self.match, "align": self.align, "iso": self.iso, "club": self.club,
                "steps_done": self.steps_done, "select_step": self.select_step, "select_leak": self.select_leak, "selected_step": self.selected_step}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitHistory:
        """The history `as_dict` gave (keys it does not know are ignored, missing ones left empty)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def record_selection(self, step: int, leak: float) -> None:
        """Append a selection check: step `step`'s h_theta read at `leak` above chance."""
        self.select_step.append(step)
        self.select_leak.append(leak)

    def record(self, step: int, losses: ThetaLosses, q_nll: Tensor,
               mean_over_ranks: Callable[[Tensor], Tensor] | None = None) -> None:
        """Append step `step`'s losses (data-parallel: their mean over ranks, the same on every rank)."""
        values = torch.stack([losses.total, losses.debias, losses.retain, q_nll, losses.match, losses.align,
                              losses.iso, *losses.club.values()]).detach()
        if mean_over_ranks is not None:
            values = mean_over_ranks(values)  # one collective for every value
        values = values.tolist()
        self.step.append(step)
        for name, v in zip(LOGGED, values):
            getattr(self, name).append(v)
        for name, v in zip(losses.club, values[len(LOGGED):]):
            self.club[name].append(v)


__all__ = ["FitHistory"]
