"""CLUB estimators against closed forms: Gaussian MI and an exactly computable categorical mixture."""

from __future__ import annotations

import math

import pytest
import torch

from dmm_wrap.core.estimators import CategoricalCLUB, GaussianCLUB


def _fit_q(q: torch.nn.Module, z: torch.Tensor, b: torch.Tensor, steps: int = 400) -> None:
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        q.nll(z, b).backward()
        opt.step()


def _gaussian_pair(n: int, rho: float, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    w = torch.ones(d) / math.sqrt(d)
    b = rho * (z @ w) + math.sqrt(1 - rho**2) * torch.randn(n, generator=g)
    return z, b


@pytest.mark.parametrize("mi", [0.1, 0.3, 0.6])
def test_gaussian_club_matches_closed_form(mi: float) -> None:
    rho2 = 1 - math.exp(-2 * mi)  # I(B; Z) = -1/2 log(1 - rho^2)
    rho = math.sqrt(rho2)
    club_exact = rho2 / (1 - rho2)  # CLUB with the true conditional: E_pq[..] gap in closed form
    estimates = []
    for seed in range(3):
        torch.manual_seed(seed)
        q = GaussianCLUB(4, 32, -6.0, 4.0)
        _fit_q(q, *_gaussian_pair(4000, rho, 4, seed))
        with torch.no_grad():
            estimates.append(q.club(*_gaussian_pair(50_000, rho, 4, 100 + seed)).item())
    mean = sum(estimates) / len(estimates)
    assert mean >= mi - 0.02, (estimates, mi)  # an upper bound, on average
    assert abs(mean - club_exact) <= 0.1 * club_exact + 0.03, (estimates, club_exact)


def test_gaussian_club_is_zero_for_independent_variables() -> None:
    torch.manual_seed(0)
    q = GaussianCLUB(4, 32, -6.0, 4.0)
    _fit_q(q, *_gaussian_pair(4000, 0.0, 4, 0))
    with torch.no_grad():
        est = q.club(*_gaussian_pair(50_000, 0.0, 4, 1)).item()
    assert abs(est) < 0.02


def _mixture(n: int, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B uniform on 3 classes, Z | B ~ N(mu_B, I) in 2-D; returns z, b and the exact posterior log p(k | z)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.tensor([0.0, 2.0944, 4.1888])
    mu = sep * torch.stack([angles.cos(), angles.sin()], 1)
    b = torch.randint(0, 3, (n,), generator=g)
    z = mu[b] + torch.randn(n, 2, generator=g)
    log_post = torch.log_softmax(-0.5 * ((z[:, None, :] - mu[None]) ** 2).sum(-1), dim=1)
    return z, b, log_post


@pytest.mark.parametrize("sep", [0.5, 1.0, 2.0])
def test_categorical_club_bounds_exact_mixture_mi(sep: float) -> None:
    z, b, log_post = _mixture(200_000, sep, 7)
    cond = log_post.gather(1, b[:, None]).mean()
    true_mi = (math.log(3) + cond).item()  # I = H(B) - H(B | Z), posterior exact, 200k Monte Carlo samples
    club_exact = (cond - log_post.mean(1).mean()).item()  # CLUB with q = p(b | z), uniform p(b)
    assert club_exact >= true_mi
    estimates = []
    for seed in range(3):
        torch.manual_seed(seed)
        q = CategoricalCLUB(2, 32, 3)
        zt, bt, _ = _mixture(4000, sep, seed)
        _fit_q(q, zt, bt.float())
        with torch.no_grad():
            estimates.append(q.club(z[:50_000], b[:50_000].float()).item())
    mean = sum(estimates) / len(estimates)
    assert mean >= true_mi - 0.02, (estimates, true_mi)
    assert abs(mean - club_exact) <= 0.1 * club_exact + 0.02, (estimates, club_exact)


def test_categorical_pairwise_term_matches_full_matrix() -> None:
    torch.manual_seed(0)
    q = CategoricalCLUB(5, 16, 4)
    z, b = torch.randn(64, 5), torch.randint(0, 4, (64,))
    logp = q.log_probs(z)
    full = logp.gather(1, b[:, None]).mean() - logp[:, b].mean()  # [i, j] = log q(b_j | z_i)
    assert torch.allclose(q.club(z, b.float()), full, atol=1e-6)


def test_gaussian_pairwise_term_matches_full_matrix() -> None:
    torch.manual_seed(0)
    q = GaussianCLUB(5, 16, -6.0, 4.0)
    z, b = torch.randn(64, 5), torch.randn(64)
    mu, logvar = q.params(z)
    logq = -0.5 * (b[None, :] - mu[:, None]) ** 2 / logvar.exp()[:, None] - 0.5 * logvar[:, None]
    full = logq.diagonal().mean() - logq.mean()
    assert torch.allclose(q.club(z, b), full, atol=1e-5)
