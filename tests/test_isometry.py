"""The within-group isometry term: its pair weights, its closed forms, and what a fit with it keeps."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.distance import cdist

from dmm_wrap import Attribute, DebiasedEncoder, FitConfig
from dmm_wrap.core.isometry import distances, isometry_loss, pair_weights

SITE = Attribute("site", "categorical", num_classes=2)
TILT = Attribute("tilt", "continuous")


def test_pair_weights_are_same_class_times_a_gaussian_kernel() -> None:
    b = torch.tensor([[0.0, 0.0], [0.0, 0.5], [1.0, 0.0], [0.0, 2.0]])
    w = pair_weights(b, (SITE, TILT), bandwidth=0.5)
    assert torch.all(w.diagonal() == 0) and torch.equal(w, w.T)
    assert w[0, 2] == 0 and w[1, 2] == 0  # another site: never a pair
    assert w[0, 1].item() == pytest.approx(math.exp(-0.5))  # 0.5 apart, bandwidth 0.5: one standard deviation
    assert w[0, 3].item() == pytest.approx(math.exp(-8.0))


def test_distances_equal_scipy_and_have_finite_gradients_at_zero() -> None:
    x = torch.randn(9, 5, dtype=torch.float64)
    x[3] = x[4]  # a repeated row: a zero distance off the diagonal
    torch.testing.assert_close(distances(x, eps=0.0), torch.from_numpy(cdist(x.numpy(), x.numpy())), atol=1e-6,
                               rtol=0)
    x.requires_grad_(True)
    distances(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_loss_is_zero_for_rigid_moves_of_each_group_and_closed_form_for_a_scaling() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 6, generator=g, dtype=torch.float64)
    b = torch.cat([torch.zeros(32), torch.ones(32)])[:, None]
    w = pair_weights(b, (SITE,), 0.2)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    moved = z @ q + 5 * b  # a rotation, and each site shifted its own way: distances within a site are kept
    assert isometry_loss(z, moved, w).item() == pytest.approx(0.0, abs=1e-10)
    # Z~ = s Z: every gap is (s - 1) |z_i - z_j|, so the loss is (s - 1)^2 times the weighted mean squared distance / D.
    s = 1.5
    d = torch.from_numpy(cdist(z.numpy(), z.numpy()))
    expected = ((s - 1) ** 2 * (w * d ** 2).sum() / w.sum() / 6).item()
    assert isometry_loss(z, s * z, w).item() == pytest.approx(expected, rel=1e-9)
    # Merging site 1 into one point, what the term forbids: each of its pairs loses its whole distance.
    collapsed = torch.where(b.bool(), torch.zeros_like(z), z)
    in_site_1 = w * b * b.T
    expected = ((in_site_1 * d ** 2).sum() / w.sum() / 6).item()
    # (the merged points sit sqrt(eps) = 1e-4 apart, not 0: distances() keeps its gradient finite there)
    assert isometry_loss(z, collapsed, w).item() == pytest.approx(expected, rel=1e-3) and expected > 0.5
    # No pair shares its attributes: the term is 0, not NaN.
    assert isometry_loss(z, s * z, torch.zeros(64, 64, dtype=torch.float64)).item() == 0.0


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="iso_weight must be a number >= 0"):
        FitConfig(iso_weight=-1.0)
    with pytest.raises(ValueError, match="iso_bandwidth must be a number > 0"):
        FitConfig(iso_bandwidth=0.0)
    assert FitConfig.paper().iso_weight == 0.0


def _loader(n: int = 512, seed: int = 0):
    """Site 1 folds its features: z -> (|z_0|, z_1, ...) + 2, so the site is readable and a fold loses content."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g)
    site = torch.randint(0, 2, (n,), generator=g)
    z = torch.where(site[:, None].bool(), z + 2.0, z)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(z, site.float()[:, None]), batch_size=128,
                                       shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_fit_logs_the_term_and_it_falls() -> None:
    torch.manual_seed(0)
    enc = DebiasedEncoder(torch.nn.Identity(), None, [SITE], input_size=(4,))
    history = enc.fit(_loader(), config=FitConfig(epochs=12, lr=3e-3, iso_weight=10.0, progress=False))
    assert len(history.iso) == len(history.loss) and min(history.iso) > 0
    assert sum(history.iso[-4:]) < 0.7 * sum(history.iso[:4])  # measured: 0.60 of the first steps' value
    torch.manual_seed(0)
    off = DebiasedEncoder(torch.nn.Identity(), None, [SITE], input_size=(4,))
    assert set(off.fit(_loader(), config=FitConfig(epochs=1, progress=False)).iso) == {0.0}  # control: term off
