"""The group-matching term: sliced Wasserstein values against POT and closed forms, groups, and its gradient."""

from __future__ import annotations

import ot
import pytest
import torch

from dmm_wrap import Attribute
from dmm_wrap.core.matching import group_ids, quantile_w2, random_directions, sliced_group_discrepancy

CAT = (Attribute("site", "categorical", 2),)


def test_quantile_w2_equals_pot_on_equal_sizes_and_is_close_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), 2 * torch.randn(300, 8, generator=g) + 1
    ours = quantile_w2(x, y.sort(0).values)
    reference = ot.wasserstein_1d(x, y, p=2)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    y_big = 2 * torch.randn(1000, 8, generator=g) + 1
    ours = quantile_w2(x, y_big.sort(0).values)
    reference = ot.wasserstein_1d(x, y_big, p=2)
    assert torch.allclose(ours, reference, rtol=0.05)


def test_sliced_distance_of_shifted_gaussians_is_the_squared_shift() -> None:
    # Two equal groups N(0, I) and N(m, I): each group against the other, SW_2^2 * dim = |m|^2 (closed form).
    g = torch.Generator().manual_seed(1)
    dim, n = 8, 20000
    m = torch.zeros(dim)
    m[:2] = 1.0
    theta = random_directions(dim, 2048, 0, torch.device("cpu"))
    a, b = torch.randn(n, dim, generator=g) @ theta, (torch.randn(n, dim, generator=g) + m) @ theta
    assert quantile_w2(a, b.sort(0).values).mean().item() * dim == pytest.approx(m.square().sum().item(), rel=0.05)


def test_discrepancy_is_near_zero_for_a_random_grouping_and_large_for_a_real_one() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2000, 16, generator=g)
    groups = torch.randint(0, 2, (2000,), generator=g)
    z_shifted = z + 1.5 * groups[:, None].float()
    theta = random_directions(16, 256, 3, torch.device("cpu"))
    b = groups.float()[:, None]
    null = sliced_group_discrepancy(z @ theta, group_ids(b, CAT, 4), 16).item()
    real = sliced_group_discrepancy(z_shifted @ theta, group_ids(b, CAT, 4), 16).item()
    # the pool is a mixture, so no closed form; its squared distance to either group lies between a quarter and all
    # of the squared shift (1.5^2 * 16 = 36), while a random grouping sits at the sampling floor
    assert null < 0.2 and 9.0 < real < 36.0


def test_continuous_groups_are_equal_quantile_bins() -> None:
    b = torch.randn(1000, 1)
    ids = group_ids(b, (Attribute("angle", "continuous"),), 4)[0]
    assert torch.bincount(ids).tolist() == [250] * 4
    order = b[:, 0].argsort()
    assert bool((ids[order].diff() >= 0).all())  # bins follow the value


def test_directions_are_unit_and_reproducible() -> None:
    a = random_directions(10, 64, 7, torch.device("cpu"))
    assert torch.allclose(a.norm(dim=0), torch.ones(64))
    assert torch.equal(a, random_directions(10, 64, 7, torch.device("cpu")))
    assert not torch.equal(a, random_directions(10, 64, 8, torch.device("cpu")))


def test_gradient_descent_on_the_term_aligns_two_groups() -> None:
    g = torch.Generator().manual_seed(4)
    groups = torch.randint(0, 2, (512,), generator=g)
    z = (torch.randn(512, 4, generator=g) + 2.0 * groups[:, None].float()).requires_grad_(True)
    b = groups.float()[:, None]
    opt = torch.optim.Adam([z], lr=0.05)
    first = None
    for step in range(200):
        loss = sliced_group_discrepancy(z @ random_directions(4, 64, step, torch.device("cpu")),
                                        group_ids(b, CAT, 4), 4)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    gap = (z[groups == 1].mean(0) - z[groups == 0].mean(0)).norm().item()
    assert first > 3.0 and gap < 0.2


def test_residual_head_starts_as_the_identity_and_round_trips(tmp_path) -> None:
    from torch import nn

    from dmm_wrap import DebiasedEncoder

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 8))
    enc = DebiasedEncoder(backbone, None, CAT, input_size=(6,), residual=True)
    x = torch.randn(64, 6)
    with torch.no_grad():
        assert torch.equal(enc(x), enc.heads.normalize(enc.features(x)))  # identity before training
    b = torch.randint(0, 2, (64, 1)).float()
    enc.fit([(x, b)] * 4, epochs=2, match_weight=1.0, progress=False)
    enc.save_pretrained(tmp_path / "m")
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "m", backbone=backbone)
    with torch.no_grad():
        moved = enc(x)
        assert not torch.equal(moved, enc.heads.normalize(enc.features(x)))  # control: training moved it
        assert torch.equal(loaded(x), moved)
        assert torch.allclose(enc.inference_module(check=False)(x), moved, atol=1e-6)


def test_residual_head_refuses_another_width() -> None:
    from dmm_wrap import HeadConfig

    with pytest.raises(ValueError, match="out_dim must be None"):
        HeadConfig(residual=True, out_dim=4)
