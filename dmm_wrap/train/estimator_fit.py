"""The estimators' side of a training step: CLUB's q networks and m_phi as one module to fit (and wrap in DDP)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from ..core.objective import DeepMinMax


class EstimatorFitLoss(NamedTuple):
    """What `EstimatorFit` returns for a batch."""

    total: Tensor
    """q_nll + m_nll: the loss the estimator step minimises."""
    q_nll: Tensor
    """Sum over attributes of -log q(b | z~): CLUB's part of it (logged as FitHistory.q_nll)."""


class EstimatorFit(nn.Module):
    """CLUB's q networks and m_phi as one module whose forward is their fitting loss.

    Data-parallel training can thus wrap exactly these parameters in DistributedDataParallel (h_theta is wrapped on
    its own). The losses themselves are `DeepMinMax.estimator_losses`.
    """

    def __init__(self, objective: DeepMinMax) -> None:
        super().__init__()
        self.q = objective.q
        self.m = objective.m
        self._objective = [objective]  # not a submodule: the objective owns q and m

    def forward(self, z_std: Tensor, z_tilde: Tensor, b: Tensor, reduction: str) -> EstimatorFitLoss:
        """The fitting loss of q and m_phi on a batch (z_tilde is detached: h_theta gets no gradient from it)."""
        est = self._objective[0].estimator_losses(z_std, z_tilde, b, reduction)
        return EstimatorFitLoss(est.q_nll + est.m_nll, est.q_nll)


__all__ = ["EstimatorFit", "EstimatorFitLoss"]
