"""Shared fixtures: tiny random-init models and synthetic streams (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dmm_wrap import DebiasedEncoder


def make_site_problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs x [n, 16] carrying a 4-class task label y (dims 0-7) and a 3-site attribute s (dims 8-9, nonlinear)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    s = torch.randint(0, 3, (n,), generator=g)
    proto = torch.randn(4, 8, generator=torch.Generator().manual_seed(99)) * 1.5
    angle = s.float() * 2.1
    site = torch.stack([torch.sin(angle), torch.cos(angle)], 1) * 2 + 0.3 * torch.randn(n, 2, generator=g)
    x = torch.cat([proto[y] + 0.7 * torch.randn(n, 8, generator=g), site, torch.randn(n, 6, generator=g)], 1)
    return x, y, s


def site_encoder(attributes: list, seed: int = 0) -> DebiasedEncoder:
    """A DebiasedEncoder on a small MLP backbone (seeded) for `make_site_problem`'s 16 inputs."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
    return DebiasedEncoder(backbone, None, attributes)


def site_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`make_site_problem`'s inputs and its site as a one-column float attribute tensor."""
    x, _, s = make_site_problem(n, seed)
    return x, s.float()[:, None]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |difference| between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def loader_of(x: torch.Tensor, attrs: torch.Tensor, batch_size: int = 128, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(x, attrs), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


@pytest.fixture
def mlp_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32))
