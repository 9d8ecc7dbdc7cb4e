"""Variational networks: the MLP, CLUB's q(B | Z~) for each attribute kind, and the retaining density m(Z | Z~, B)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LOG_2PI = math.log(2 * math.pi)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """`layers` Linear layers with `act` between them (no activation after the last)."""
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            mods.append(act())
    return nn.Sequential(*mods)


def bounded(raw: Tensor, low: float, high: float) -> Tensor:
    """Squash `raw` smoothly into (low, high)."""
    return low + (high - low) * torch.sigmoid(raw)


class Residual(nn.Module):
    """x + body(x), with the body's last layer zeroed so that the map starts as the identity.

    h_theta then moves Z only as far as the objective asks. Among the maps that make the groups look alike, training
    from the identity finds one of least movement, and least movement is what decides which content of one group is
    matched with which content of another (an objective that only asks for Z~ independent of B is indifferent to it).
    """

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        last = body[-1]
        assert isinstance(last, nn.Linear) and last.in_features and last.out_features
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        """x + body(x)."""
        return x + self.body(x)


class CategoricalCLUB(nn.Module):
    """CLUB for a categorical attribute: q(b | z~) is a softmax classifier.

    The pairwise term mean_{i,j} log q(b_j | z~_i) is computed exactly in O(N K) from the batch's class
    frequencies instead of the N x N matrix. q uses SiLU, not ReLU: h_theta can push Z~ where every ReLU of q is
    dead, which makes q constant and the CLUB estimate exactly 0 while B stays decodable.

    With `floor` > 0, q is the mixture (1 - floor) softmax + floor uniform. On separable classes a plain softmax
    grows its logits without end, and CLUB (which is linear in the logits) grows with them, measuring the logit
    scale rather than information; the floor bounds every log-ratio by log(K / floor), as the log-variance bound
    does for the Gaussian estimator.
    """

    def __init__(self, in_dim: int, hidden: int, num_classes: int, floor: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pair_width = num_classes
        """Length of `pair_sums`."""
        self.floor = floor
        self.net = mlp(in_dim, hidden, num_classes, 2, nn.SiLU)

    def log_probs(self, z: Tensor) -> Tensor:
        """log q(k | z) for every class k: a softmax mixed with `floor` of the uniform distribution."""
        logp = F.log_softmax(self.net(z), dim=-1)
        if self.floor == 0.0:
            return logp
        uniform = torch.full_like(logp, math.log(self.floor / self.num_classes))
        return torch.logaddexp(logp + math.log1p(-self.floor), uniform)

    def nll(self, z: Tensor, b: Tensor) -> Tensor:
        """Negative log-likelihood of q on (z, b): the loss that fits q."""
        return F.nll_loss(self.log_probs(z), b.long())

    def pair_sums(self, b: Tensor) -> Tensor:
        """What the pairwise term needs of the batch's attribute values: the count of each class [K]."""
        return torch.bincount(b.long(), minlength=self.num_classes).float()

    def club_terms(self, z: Tensor, b: Tensor, sums: Tensor | None = None, n: Tensor | int | None = None) -> Tensor:
        """Per-sample CLUB terms log q(b_i | z~_i) - mean_j log q(b_j | z~_i); their mean is the CLUB estimate.

        `sums` / `n` are `pair_sums` and the sample count of the batch the negatives j are drawn from; by default this
        batch. Data-parallel training passes the totals over all ranks, so that j runs over the global batch.
        """
        logp = self.log_probs(z)
        b = b.long()
        if sums is None:
            sums, n = self.pair_sums(b), b.numel()
        freq = sums.to(logp.dtype) / n
        return logp.gather(1, b[:, None]).squeeze(1) - (logp * freq).sum(1)

    def club(self, z: Tensor, b: Tensor) -> Tensor:
        """CLUB estimate of I(B; Z~) on the batch (differentiable in z)."""
        return self.club_terms(z, b).mean()


class GaussianCLUB(nn.Module):
    """CLUB for a continuous attribute: q(b | z~) = N(mu(z~), exp(logvar(z~))) with a bounded log-variance.

    The pairwise term has the closed form mean_j (b_j - mu_i)^2 = (mu_i - mean(b))^2 + var(b), so it costs O(N).
    """

    def __init__(self, in_dim: int, hidden: int, logvar_min: float, logvar_max: float) -> None:
        super().__init__()
        self.mu = mlp(in_dim, hidden, 1, 2, nn.SiLU)
        self.logvar = mlp(in_dim, hidden, 1, 2, nn.SiLU)
        self.logvar_min, self.logvar_max = logvar_min, logvar_max
        self.pair_width = 2
        """Length of `pair_sums`."""

    def params(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and bounded log-variance of q(b | z), each [N]."""
        mu = self.mu(z).squeeze(-1)
        logvar = bounded(self.logvar(z).squeeze(-1), self.logvar_min, self.logvar_max)
        return mu, logvar

    def nll(self, z: Tensor, b: Tensor) -> Tensor:
        """Negative log-likelihood of q on (z, b): the loss that fits q."""
        mu, logvar = self.params(z)
        return 0.5 * ((b - mu) ** 2 / logvar.exp() + logvar + _LOG_2PI).mean()

    def pair_sums(self, b: Tensor) -> Tensor:
        """What the pairwise term needs of the batch's attribute values: [sum b, sum b^2]."""
        return torch.stack([b.sum(), (b * b).sum()]).float()

    def club_terms(self, z: Tensor, b: Tensor, sums: Tensor | None = None, n: Tensor | int | None = None) -> Tensor:
        """Per-sample CLUB terms log q(b_i | z~_i) - mean_j log q(b_j | z~_i).

        `sums` / `n` as for the categorical estimator (default: this batch).
        """
        mu, logvar = self.params(z)
        if sums is None:
            sums, n = self.pair_sums(b), b.numel()
        mean = sums[0] / n
        var = (sums[1] / n - mean * mean).clamp_min(0)
        pair_sq = (mu - mean) ** 2 + var
        return 0.5 * (pair_sq - (b - mu) ** 2) * torch.exp(-logvar)

    def club(self, z: Tensor, b: Tensor) -> Tensor:
        """CLUB estimate of I(B; Z~) on the batch (differentiable in z)."""
        return self.club_terms(z, b).mean()


class ConditionalGaussian(nn.Module):
    """The retaining density m_phi(z | z~, b): a diagonal Gaussian whose mean and bounded log-variance are an MLP of (z~, b)."""

    def __init__(self, cond_dim: int, hidden: int, out_dim: int, layers: int, logvar_min: float, logvar_max: float) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = mlp(cond_dim, hidden, 2 * out_dim, layers)
        self.logvar_min, self.logvar_max = logvar_min, logvar_max

    def nll(self, target: Tensor, cond: Tensor, reduction: str = "mean") -> Tensor:
        """-log m(target | cond), averaged over the batch; per feature dimension ("mean") or summed ("sum")."""
        mu, raw = self.net(cond).chunk(2, dim=-1)
        logvar = bounded(raw, self.logvar_min, self.logvar_max)
        per_dim = 0.5 * ((target - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI)
        per_sample = per_dim.sum(-1)
        if reduction == "mean":
            per_sample = per_sample / self.out_dim
        return per_sample.mean()


__all__ = ["mlp", "Residual", "CategoricalCLUB", "GaussianCLUB", "ConditionalGaussian"]
