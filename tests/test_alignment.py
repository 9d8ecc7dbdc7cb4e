"""The piecewise-alignment target (dmm_wrap.core.alignment) and its term in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.neural_network import MLPClassifier
from torch.utils.data import DataLoader, TensorDataset

from dmm_wrap import Attribute, DebiasedEncoder, FitConfig
from dmm_wrap.core.alignment import PiecewiseAlignment, fit_alignment, gaussian_map
from dmm_wrap.core.gaussian import mean_target
from dmm_wrap.core.pieces import choose_clusters, choose_pieces

GROUP = (Attribute("group", "categorical", 3),)


def _mixture(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 classes in 6-d; each of 3 groups moves, stretches and bends every class differently (near-identity)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * 6
    y = torch.randint(0, 4, (n,), generator=g)
    b = torch.randint(0, 3, (n,), generator=g)
    shift = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1)) * 0.6
    scale = 0.7 + 0.6 * torch.rand(3, 6, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(n, 6, generator=g) * scale[b]
    z = means[y] + shift[b, y] + noise + 0.3 * torch.tanh(noise) * b[:, None]
    return z, b.float()[:, None], y


def _probe(train_x, train_b, test_x, test_b) -> float:
    clf = MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=400, random_state=0).fit(train_x, train_b)
    return balanced_accuracy_score(test_b, clf.predict(test_x))


def test_gaussian_map_sends_one_covariance_to_the_other() -> None:
    # Closed form: the OT map A between N(0, S) and N(0, T) is symmetric and A S A = T.
    rng = np.random.default_rng(0)
    a, c = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s, t = a @ a.T + 0.1 * np.eye(5), c @ c.T + 0.1 * np.eye(5)
    m = gaussian_map(s, t)
    np.testing.assert_allclose(m, m.T, atol=1e-8)
    np.testing.assert_allclose(m @ s @ m, t, atol=1e-6)
    assert np.linalg.eigvalsh(m).min() > 0


def test_alignment_matches_the_same_content_across_groups_and_removes_the_group() -> None:
    z, b, y = _mixture(3000, 0)
    align = fit_alignment(z, b, GROUP, clusters=None, bins=8, maps="full", seed=0)
    assert align.stages[0].centroids.shape == (3, 4, 6)  # the silhouette score found the 4 classes
    target = align(z, b)
    # Each class lands on one place whatever its group: the matching followed the content, not a permutation of it.
    for k in range(4):
        means = torch.stack([target[(y == k) & (b[:, 0] == g)].mean(0) for g in range(3)])
        assert (means - means.mean(0)).norm(dim=1).max() < 0.15
    zt, bt, _ = _mixture(1500, 1)
    zp, bp, _ = _mixture(3000, 2)  # the group probe trains here: samples the alignment was not fitted on
    raw = _probe(zp.numpy(), bp[:, 0].numpy(), zt.numpy(), bt[:, 0].numpy())
    aligned = _probe(align(zp, bp).numpy(), bp[:, 0].numpy(), align(zt, bt).numpy(), bt[:, 0].numpy())
    assert raw > 0.6  # negative control: the group is readable before (chance 1/3)
    assert aligned < 1 / 3 + 0.06
    # The classes survive.
    assert _probe(target.numpy(), y.numpy(), align(zt, bt).numpy(), _mixture(1500, 1)[2].numpy()) > 0.97


def test_continuous_attribute_is_chained_from_bin_to_bin() -> None:
    # Two clusters drift steadily with b; matching each bin to its neighbour keeps them apart at every b.
    g = torch.Generator().manual_seed(0)
    n = 4000
    y = torch.randint(0, 2, (n,), generator=g)
    b = torch.rand(n, generator=g) * 2 - 1
    base = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])[y]
    z = base + torch.stack([torch.zeros(n), 2.5 * b], 1) + 0.3 * torch.randn(n, 2, generator=g)
    align = fit_alignment(z, b[:, None], (Attribute("angle", "continuous"),), clusters=2, bins=8, maps="shift", seed=0)
    target = align(z, b[:, None])
    assert torch.corrcoef(torch.stack([target[:, 1], b]))[0, 1].abs() < 0.1  # raw: about 0.97
    assert torch.corrcoef(torch.stack([z[:, 1], b]))[0, 1].abs() > 0.9
    assert ((target[:, 0] > 0).long() == y).float().mean() > 0.99


def test_empty_like_rebuilds_the_shapes_of_a_state() -> None:
    z, b, _ = _mixture(600, 0)
    align = fit_alignment(z, b, GROUP, clusters=3, bins=8, maps="diagonal", seed=0)
    state = {f"alignment.{k}": v for k, v in align.state_dict().items()}
    copy = PiecewiseAlignment.empty_like(state, "alignment.")
    copy.load_state_dict(align.state_dict())
    torch.testing.assert_close(copy(z, b), align(z, b), rtol=0, atol=0)


def _shifted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 well-separated classes in 6-d, each of 3 groups shifting them by its own offset: the group is readable."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[8.0, 0, 0, 0, 0, 0], [0, 8.0, 0, 0, 0, 0], [0, 0, 8.0, 0, 0, 0]])
    offsets = torch.tensor([[0, 0, 0, 3.0, 0, 0], [0, 0, 0, 0, 3.0, 0], [0, 0, 0, 0, 0, 3.0]])
    y, b = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    return means[y] + offsets[b] + 0.5 * torch.randn(n, 6, generator=g), b.float()[:, None]


def _loader(n: int = 512) -> DataLoader:
    z, b = _shifted(n, 0)
    return DataLoader(TensorDataset(z, b), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_fit_distils_the_target_and_leaves_it_out_of_the_model(tmp_path) -> None:
    torch.manual_seed(0)
    enc = DebiasedEncoder(torch.nn.Identity(), None, GROUP, residual=True)
    history = enc.fit(_loader(), config=FitConfig(epochs=20, lr=3e-3, align_weight=100.0, progress=False))
    assert len(history.align) == len(history.loss) and min(history.align) > 0
    assert np.mean(history.align[-8:]) < 0.6 * np.mean(history.align[:8])
    off = DebiasedEncoder(torch.nn.Identity(), None, GROUP, residual=True)
    assert set(off.fit(_loader(), config=FitConfig(epochs=1, progress=False)).align) == {0.0}  # control: term off
    assert not hasattr(enc.heads, "alignment")
    assert not any("alignment" in k for k in enc.state_dict())
    enc.save_pretrained(tmp_path / "m")
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "m", backbone=torch.nn.Identity())
    x = _shifted(32, 5)[0]
    torch.testing.assert_close(loaded(x), enc(x), rtol=0, atol=0)


def test_resume_keeps_the_alignment_and_refuses_a_changed_config(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    cfg = dict(epochs=2, align_weight=10.0, align_every=5, progress=False, checkpoint_dir=ckpt, checkpoint_every=4)
    torch.manual_seed(0)
    full = DebiasedEncoder(torch.nn.Identity(), None, GROUP, residual=True)
    full.fit(_loader(), config=FitConfig(**{**cfg, "checkpoint_dir": str(tmp_path / "full")}))
    torch.manual_seed(0)
    part = DebiasedEncoder(torch.nn.Identity(), None, GROUP, residual=True)
    part.fit(_loader(), config=FitConfig(**cfg, max_steps=6))
    resumed = DebiasedEncoder(torch.nn.Identity(), None, GROUP, residual=True)
    resumed.fit(_loader(), config=FitConfig(**cfg, resume=True))
    x = _shifted(32, 5)[0]
    torch.testing.assert_close(resumed(x), full(x), rtol=0, atol=0)  # the target came back from the checkpoint
    other = DebiasedEncoder(torch.nn.Identity(), None, GROUP, residual=True)
    with pytest.raises(ValueError, match="written by a run with the alignment term, and this run has align_weight=0"):
        other.fit(_loader(), config=FitConfig(**{**cfg, "align_weight": 0.0}, resume=True))


@pytest.mark.parametrize("kwargs, match", [
    ({"align_weight": -1.0}, "align_weight"),
    ({"align_maps": "affine"}, "align_maps"),
    ({"align_shrinkage": 1.5}, "align_shrinkage"),
    ({"align_shrinkage": "ledoit"}, "align_shrinkage"),
    ({"align_bins": 1}, "align_bins"),
    ({"align_clusters": 0}, "align_clusters"),
])
def test_bad_alignment_options_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FitConfig(**kwargs)


def test_the_suite_measures_the_presets() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from leakage import ALIGNED

    from dmm_wrap import HeadConfig

    head, fit = HeadConfig.aligned(), FitConfig.aligned()
    assert {k: getattr(head, k) if k in HeadConfig.__dataclass_fields__ else getattr(fit, k) for k in ALIGNED} == ALIGNED


def test_a_plain_h_theta_is_warned_about() -> None:
    enc = DebiasedEncoder(torch.nn.Identity(), None, GROUP)
    with pytest.warns(UserWarning, match="residual"):
        enc.fit(_loader(128), config=FitConfig(epochs=1, align_weight=1.0, progress=False))


def test_the_piece_count_is_the_most_common_silhouette_choice_over_groups() -> None:
    # Five groups of 3 well-separated blobs, except the first, whose third blob is two: the silhouette score of the
    # first group alone says 4 pieces (what fit_alignment used before), the groups together say 3.
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    xs, gs = [], []
    for g in range(5):
        rows = centres[rng.integers(0, 3, 600)] + rng.normal(size=(600, 2))
        if g == 0:
            third = rows[:, 1] > 10
            rows[third, 0] += np.where(rng.random(third.sum()) < 0.5, -6.0, 6.0)
        xs.append(rows)
        gs.append(np.full(600, g))
    x, groups = np.concatenate(xs), np.concatenate(gs)
    assert choose_clusters(x[groups == 0], seed=0) == 4  # negative control: one group's choice
    assert [choose_clusters(x[groups == g], seed=0) for g in range(1, 5)] == [3] * 4
    assert choose_pieces(x, groups, list(range(5)), seed=0) == 3
    b = torch.from_numpy(groups).float()[:, None]
    align = fit_alignment(torch.from_numpy(x), b, (Attribute("group", "categorical", 5),), clusters=None, bins=8,
                          maps="full", seed=0)
    assert align.stages[0].centroids.shape[1] == 3


@pytest.mark.parametrize("kind", ["geometric", "harmonic"])
def test_the_mean_target_is_the_groups_mean_covariance_plus_the_spread_of_their_means(kind: str) -> None:
    # Closed form on diagonal covariances, per coordinate: exp(sum(w log var)) or 1 / sum(w / var), plus
    # sum(w (mu - mean)^2), weights by rows; a group without an estimated covariance enters the spread only.
    # Full matrices give the same as variances, and the spread off the diagonal.
    var = np.array([[1.0, 4.0], [0.25, 4.0], [9.0, 1.0]])
    means = np.array([[0.0, 1.0], [2.0, 1.0], [5.0, -3.0]])
    counts, estimated = np.array([1.0, 3.0, 4.0]), np.array([True, True, False])
    w = counts / counts.sum()
    inner = np.array([0.25, 0.75])
    middle = np.exp(inner @ np.log(var[:2])) if kind == "geometric" else 1 / (inner @ (1 / var[:2]))
    expected = middle + w @ (means - w @ means) ** 2
    np.testing.assert_allclose(mean_target(means, var, counts, estimated, kind), expected)
    full = mean_target(means, np.stack([np.diag(v) for v in var]), counts, estimated, kind)
    np.testing.assert_allclose(np.diag(full), expected)
    spread = (means - w @ means).T * w @ (means - w @ means)
    np.testing.assert_allclose(full - np.diag(np.diag(full - spread)), spread, atol=1e-12)
    one = np.array([[2.0, 0.5], [0.5, 1.0]])  # one group: its own covariance
    np.testing.assert_allclose(mean_target(means[:1], one[None], counts[:1], estimated[:1], kind), one)
    with pytest.raises(ValueError, match="at least one group"):
        mean_target(means, var, counts, np.zeros(3, bool), kind)


def _blurred(n: int, seed: int, thin: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 classes in 6-d; group 1 is "blurred": its variation in the last 3 coordinates is `thin` of group 0's."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * 3
    y, b = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    scale = torch.ones(2, 6)
    scale[1, 3:] = thin
    return means[y] + torch.randn(n, 6, generator=g) * scale[b], b.float()[:, None], y


def test_mean_targets_narrow_the_thick_group_instead_of_stretching_the_thin_one() -> None:
    # The pooled piece is thick where either group is, so the blurred group's map multiplies its variation there
    # (and any new row's deviation) by about 6; the geometric and harmonic means keep that gain lower and still
    # hide the group from a fresh probe (raw features: the negative control).
    z, b, _ = _blurred(3000, 1)
    zp, bp, _ = _blurred(3000, 3)
    zt, bt, _ = _blurred(1500, 4)
    assert _probe(zp.numpy(), bp[:, 0].numpy(), zt.numpy(), bt[:, 0].numpy()) > 0.9
    gains = {}
    for target in ("pooled", "geometric", "harmonic"):
        align = fit_alignment(z, b, (Attribute("group", "categorical", 2),), clusters=3, bins=8, maps="full", seed=0,
                              shrinkage="oas", target=target)
        gains[target] = float(torch.linalg.eigvalsh(align.stages[0].linear[1]).max())
        if target != "pooled":
            assert _probe(align(zp, bp).numpy(), bp[:, 0].numpy(), align(zt, bt).numpy(), bt[:, 0].numpy()) < 0.58
    print(gains)
    assert gains["pooled"] > 4 > gains["geometric"] > gains["harmonic"] and gains["harmonic"] < 1.5, gains
