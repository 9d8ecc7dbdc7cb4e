"""The alignment head (`DebiasedEncoder.fit_alignment_head`): a fitted alignment applied with the attribute predicted
from Z, that a fresh probe cannot read the site from, saved and loaded like any model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dmm_wrap import Attribute, DebiasedEncoder
from dmm_wrap.core.alignment import PredictedAlignment

SITE = Attribute("site", "categorical", 3)


def tinted_sites(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs [n, 8]: a 4-class content plus each of 3 sites' own tint (an offset of the input, as the quickstart's
    colour tint). Behind the frozen tanh encoder the tint moves and reshapes each class differently, so the site is
    entangled with the content in the features; labels and sites."""
    fixed = torch.Generator().manual_seed(7)
    means, tint = torch.randn(4, 8, generator=fixed) * 2.0, torch.randn(3, 8, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    y, s = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    return means[y] + 0.5 * torch.randn(n, 8, generator=g) + tint[s], y, s


def frozen_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 24))


def probes(train: np.ndarray, probe: np.ndarray, test: np.ndarray,
           data: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(task accuracy of a logistic regression trained on the train rows, site balanced accuracy of a fresh MLP probe
    trained on the probe rows, which the head was not fitted on), both scored on the test rows."""
    task = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train, data["ytr"])
    mlp = make_pipeline(StandardScaler(), MLPClassifier((128, 128), max_iter=300, early_stopping=True,
                                                        random_state=0)).fit(probe, data["spr"])
    return task.score(test, data["yte"]), balanced_accuracy_score(data["ste"], mlp.predict(test))


@pytest.fixture(scope="module")
def fitted() -> tuple[DebiasedEncoder, dict[str, torch.Tensor]]:
    xtr, ytr, s_tr = tinted_sites(3000, 0)
    xte, yte, s_te = tinted_sites(1500, 1)
    xpr, _, s_pr = tinted_sites(3000, 2)
    encoder = DebiasedEncoder(frozen_encoder(), None, [SITE])
    loader = DataLoader(TensorDataset(xtr, s_tr.float()[:, None]), batch_size=256)
    encoder.fit_alignment_head(loader)  # the silhouette score picks the 4 classes
    return encoder, {"xtr": xtr, "xte": xte, "ytr": ytr, "yte": yte, "str": s_tr, "ste": s_te, "xpr": xpr,
                     "spr": s_pr}


def _readings(fitted) -> tuple[tuple[float, float], tuple[float, float]]:
    encoder, data = fitted
    with torch.no_grad():
        raw = probes(*(encoder.features(data[k]).numpy() for k in ("xtr", "xpr", "xte")), data)
        debiased = probes(*(encoder(data[k]).numpy() for k in ("xtr", "xpr", "xte")), data)
    return raw, debiased


def test_the_head_lowers_the_site_reading_and_keeps_the_task(fitted) -> None:
    encoder, _ = fitted
    raw, debiased = _readings(fitted)
    assert raw[1] > 0.9  # negative control: the raw features give the site away
    assert debiased[1] < 0.5, debiased  # chance 1/3 (measured 0.397)
    assert debiased[0] >= raw[0] - 0.02 and debiased[0] > 0.95, (raw, debiased)
    assert isinstance(encoder.heads.h, PredictedAlignment)
    assert encoder.head_config.align_head_pieces == [4]


@pytest.mark.xfail(strict=True, reason="Quality target not met: a fresh MLP probe trained on samples the head was not "
                                       "fitted on reads the site at 0.397 (target <= chance + 0.05 = 0.383); with 8000 "
                                       "samples for both the head and the probe, 0.77 (README, 'Where the quality "
                                       "targets stand').")
def test_the_head_hides_the_site_from_a_fresh_probe(fitted) -> None:
    _, debiased = _readings(fitted)
    assert debiased[1] <= 1 / 3 + 0.05, debiased


def test_save_and_load_give_the_same_outputs(fitted, tmp_path: Path) -> None:
    encoder, data = fitted
    encoder.save_pretrained(tmp_path / "m")
    head = json.loads((tmp_path / "m" / "config.json").read_text())["head"]
    assert head["align_head_pieces"] == [4] and head["align_head_maps"] == "full"
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "m", backbone=frozen_encoder())
    with torch.no_grad():
        assert torch.equal(loaded(data["xte"]), encoder(data["xte"]))


def test_bad_input_is_refused_with_the_fix(fitted) -> None:
    encoder, data = fitted
    loader = DataLoader(TensorDataset(data["xtr"], data["str"].float()[:, None]), batch_size=256)
    with pytest.raises(ValueError, match="fitted alignment .*Build a new DebiasedEncoder"):
        encoder.fit(loader, epochs=1)
    both = DebiasedEncoder(frozen_encoder(), None, [SITE, Attribute("dose", "continuous")])
    with pytest.raises(ValueError, match=r"categorical attributes only; \['dose'\] are continuous"):
        both.fit_alignment_head(loader, joint=False)
    with pytest.raises(ValueError, match="bins must be an int >= 2"):
        both.fit_alignment_head(loader, bins=1)
    with pytest.raises(ValueError, match="joint must be True, False or None"):
        both.fit_alignment_head(loader, joint="yes")
    with pytest.raises(ValueError, match="samples must be an int >= 2"):
        DebiasedEncoder(frozen_encoder(), None, [SITE]).fit_alignment_head(loader, samples=1)
    with pytest.raises(ValueError, match="needs at least 2"):
        DebiasedEncoder(frozen_encoder(), None, [SITE]).fit_alignment_head([])
    with pytest.raises(ValueError, match=r"a list of one per stage \(1: one per attribute, or 1 for joint groups\), got \[2, 2\]"):
        DebiasedEncoder(frozen_encoder(), None, [SITE]).fit_alignment_head(loader, clusters=[2, 2])
    with pytest.raises(ValueError, match="maps must be one of"):
        DebiasedEncoder(frozen_encoder(), None, [SITE]).fit_alignment_head(loader, maps="ful")
    with pytest.raises(ValueError, match=r"target must be one of \('pooled', 'geometric', 'harmonic'\), got 'mean'"):
        DebiasedEncoder(frozen_encoder(), None, [SITE]).fit_alignment_head(loader, target="mean")
    for shrinkage in (1.5, "ledoit", True):
        with pytest.raises(ValueError, match=r'shrinkage must be a number in \[0, 1\] or "oas"'):
            DebiasedEncoder(frozen_encoder(), None, [SITE]).fit_alignment_head(loader, shrinkage=shrinkage)
    one_site = data["str"] == 0  # a loader ordered by site, read only as far as its first site
    ordered = [(data["xtr"][one_site][:300], data["str"][one_site][:300].float()[:, None])]
    with pytest.raises(ValueError, match=r"only class \[0\] of 'site'.*Shuffle the loader"):
        DebiasedEncoder(frozen_encoder(), None, [SITE]).fit_alignment_head(ordered)
    two_sites = data["str"] < 2
    partial = [(data["xtr"][two_sites], data["str"][two_sites].float()[:, None])]
    with pytest.warns(UserWarning, match=r"Classes \[2\] of 'site' are not in the sample"):
        DebiasedEncoder(frozen_encoder(), None, [SITE]).fit_alignment_head(partial)


def test_gradients_reach_the_features(fitted) -> None:
    """As through the MLP: within a piece the map is affine, so saliency through the head works."""
    encoder, data = fitted
    z = encoder.features(data["xte"][:16]).requires_grad_(True)
    encoder.debias(z).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_onnx_export_matches(fitted, tmp_path: Path) -> None:
    """The head exports (no cdist: the pieces are found by squared distances) and onnxruntime gives its outputs."""
    ort = pytest.importorskip("onnxruntime")
    encoder, data = fitted
    path = encoder.export_onnx(tmp_path / "head.onnx", data["xte"][:4])
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: data["xte"][:200].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, encoder(data["xte"][:200]).numpy(), atol=1e-4)


def test_streamed_moments_reproduce_the_fit_and_do_not_depend_on_batching() -> None:
    """refit_maps from the moments of the very rows a stage was fitted on gives back its means and maps (closed form:
    the same mean and shrunk covariance, summed batch by batch about each piece's centroid), whether the rows are
    added at once or in batches of 37; for full, diagonal and shift maps, onto the pooled or the harmonic target."""
    from dmm_wrap.core.alignment import fit_alignment
    from dmm_wrap.core.moments import PieceMoments, refit_maps

    x, _, s = tinted_sites(2000, 3)
    z = frozen_encoder()(x).detach()
    z = (z - z.mean(0)) / z.std(0)
    for maps, shrinkage, target in (("full", 0.1, "pooled"), ("diagonal", 0.1, "pooled"), ("shift", 0.1, "pooled"),
                                    ("full", "oas", "pooled"), ("diagonal", "oas", "pooled"),
                                    ("full", "oas", "geometric"), ("diagonal", 0.1, "geometric"),
                                    ("full", 0.1, "harmonic"), ("diagonal", "oas", "harmonic")):
        stage = fit_alignment(z, s.float()[:, None], (SITE,), 4, 8, maps, 0, shrinkage, target=target).stages[0]
        fitted = {k: v.clone() for k, v in stage.state_dict().items()}
        at_once, batched = PieceMoments(stage), PieceMoments(stage)
        at_once.add(stage, z, s)
        for i in range(0, len(z), 37):
            batched.add(stage, z[i:i + 37], s[i:i + 37])
        assert torch.allclose(at_once.squares, batched.squares, atol=1e-9)
        refit_maps(stage, batched, shrinkage, target)
        for key, value in stage.state_dict().items():
            assert torch.allclose(value, fitted[key], atol=1e-4), (maps, shrinkage, target, key)


@pytest.mark.parametrize("rows, dim", [(50, 20), (500, 64), (100, 128)])
def test_oas_shrinkage_equals_scikit_learns(rows: int, dim: int) -> None:
    """The OAS fraction computed from a covariance and its row count (what streamed moments give) equals
    scikit-learn's `oas` on the rows, for either normalisation of the covariance, and so does the shrunk matrix; it
    falls as rows grow against the dimension."""
    from sklearn.covariance import oas

    from dmm_wrap.core.alignment import oas_shrinkage, shrink_covariance

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, dim)) @ rng.standard_normal((dim, dim))
    reference, fraction = oas(x)
    biased = np.cov(x.T, bias=True)
    assert oas_shrinkage(biased, rows) == pytest.approx(fraction, rel=1e-10)
    assert oas_shrinkage(np.cov(x.T), rows) == pytest.approx(fraction, rel=1e-10)
    np.testing.assert_allclose(shrink_covariance(biased, "oas", rows), reference, rtol=1e-10, atol=1e-10)
    assert oas_shrinkage(biased, 100 * rows) < fraction
    variances = np.diag(biased)  # a diagonal covariance given as its variances alone, as diagonal maps keep it
    assert oas_shrinkage(variances, rows) == pytest.approx(oas_shrinkage(np.diag(variances), rows), rel=1e-12)
    with pytest.raises(ValueError, match="needs the row count"):
        shrink_covariance(biased, "oas")


def test_refit_needs_a_stage_fitted_in_this_process() -> None:
    from dmm_wrap.core.alignment import AlignmentStage
    from dmm_wrap.core.moments import PieceMoments, refit_maps

    stage = AlignmentStage(3, 2, 4, "full")
    with pytest.raises(ValueError, match="fitted in this process"):
        refit_maps(stage, PieceMoments(stage))


def test_streaming_the_rest_of_the_loader_reestimates_the_maps_from_every_row() -> None:
    """With stream=True the maps come from every row of the loader, the pieces from the first `samples`: the maps
    equal a refit of the sample's stage on all the rows' moments, and differ from stream=False's."""
    from dmm_wrap.core.moments import PieceMoments, refit_maps

    x, _, s = tinted_sites(4000, 4)
    loader = DataLoader(TensorDataset(x, s.float()[:, None]), batch_size=256)
    streamed, sampled = DebiasedEncoder(frozen_encoder(), None, [SITE]), DebiasedEncoder(frozen_encoder(), None, [SITE])
    streamed.fit_alignment_head(loader, clusters=4, samples=1024)
    sampled.fit_alignment_head(loader, clusters=4, samples=1024, stream=False)
    a, b = streamed.heads.h.alignment.stages[0], sampled.heads.h.alignment.stages[0]
    assert torch.equal(a.centroids, b.centroids) and not torch.allclose(a.linear, b.linear)
    with torch.no_grad():
        z = (sampled.features(x) - sampled.heads.feature_mean) / sampled.heads.feature_std
    moments = PieceMoments(b)
    moments.add(b, z, s)
    refit_maps(b, moments, "oas", "geometric")  # the head's defaults
    assert torch.allclose(a.linear, b.linear, atol=1e-5) and torch.allclose(a.target_mean, b.target_mean, atol=1e-5)
    with pytest.raises(ValueError, match="stream must be True or False"):
        sampled.fit_alignment_head(loader, stream="yes")  # type: ignore[arg-type]


DOSE = Attribute("dose", "continuous")


def tinted_doses(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tinted_sites` plus a continuous dose in [-1, 1] that moves the input along a fixed direction before the tanh
    encoder (entangled with the content as the site is); inputs, labels and attributes [n, 2] (site, dose)."""
    x, y, s = tinted_sites(n, seed)
    direction = torch.randn(8, generator=torch.Generator().manual_seed(8))
    dose = torch.rand(n, generator=torch.Generator().manual_seed(1000 + seed)) * 2 - 1
    return x + 1.5 * dose[:, None] * direction, y, torch.stack([s.float(), dose], 1)


@pytest.fixture(scope="module")
def joint_fitted() -> tuple[DebiasedEncoder, dict[str, torch.Tensor]]:
    xtr, ytr, btr = tinted_doses(6000, 0)
    xte, yte, bte = tinted_doses(1500, 1)
    xpr, _, bpr = tinted_doses(3000, 2)
    encoder = DebiasedEncoder(frozen_encoder(), None, [SITE, DOSE])
    encoder.fit_alignment_head(DataLoader(TensorDataset(xtr, btr), batch_size=256), clusters=4, bins=4)
    return encoder, {"xtr": xtr, "xte": xte, "xpr": xpr, "ytr": ytr, "yte": yte, "btr": btr, "bte": bte, "bpr": bpr}


def test_joint_groups_are_mixed_radix_ids_of_classes_and_quantile_bins() -> None:
    from dmm_wrap.core.joint import JointGroups

    b = torch.tensor([[0, 0.05], [1, 0.15], [2, 0.95], [1, 0.55], [0, 0.35], [2, 0.75], [0, 0.5], [1, 0.9]])
    joint = JointGroups.fit(b, (SITE, DOSE), bins=2)
    assert joint.sizes == [3, 2] and joint.count == 6 and joint.attribute().num_classes == 6
    edge = float(torch.quantile(b[:, 1].double(), 0.5))
    expected = b[:, 0].long() * 2 + (b[:, 1].double() >= edge).long()
    assert torch.equal(joint(b), expected)
    assert joint(torch.tensor([[2.0, 5.0], [0.0, -5.0]])).tolist() == [5, 0]  # beyond the sample: the outer bins


def test_the_joint_head_removes_a_categorical_and_a_continuous_attribute_and_keeps_the_task(joint_fitted) -> None:
    """Site and dose both reshape the content behind the encoder; the head aligns their joint groups (3 sites x 4
    dose bins), each predicted from Z. Fresh probes trained on rows the head never saw read both from raw Z (negative
    control) and far less from Z~."""
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor

    encoder, data = joint_fitted
    assert encoder.head_config.align_head_groups == [12] and encoder.head_config.align_head_pieces == [4]

    def readings(fn) -> tuple[float, float, float]:
        with torch.no_grad():
            tr, pr, te = (fn(data[k]).numpy() for k in ("xtr", "xpr", "xte"))
        task = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(tr, data["ytr"]).score(te, data["yte"])
        site = make_pipeline(StandardScaler(), MLPClassifier((128, 128), max_iter=300, early_stopping=True,
                                                             random_state=0)).fit(pr, data["bpr"][:, 0].long())
        dose = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(128, 128), max_iter=300, early_stopping=True,
                                                            random_state=0)).fit(pr, data["bpr"][:, 1])
        return (task, balanced_accuracy_score(data["bte"][:, 0].long(), site.predict(te)),
                r2_score(data["bte"][:, 1], dose.predict(te)))

    raw, debiased = readings(encoder.features), readings(encoder)
    assert raw[1] > 0.9 and raw[2] > 0.8, raw  # measured 0.995, 0.877
    assert debiased[1] < 0.45 and debiased[2] < 0.15, (raw, debiased)  # chance 1/3, R^2 0 (measured 0.385, 0.078)
    assert debiased[0] >= raw[0] - 0.02, (raw, debiased)
    # Control: a head for the site alone leaves the dose where raw Z has it.
    site_only = DebiasedEncoder(frozen_encoder(), None, [SITE])
    site_only.fit_alignment_head(DataLoader(TensorDataset(data["xtr"], data["btr"][:, :1]), batch_size=256), clusters=4)
    control = readings(site_only)
    assert control[2] > 0.6, control  # measured 0.864


def test_a_joint_head_saves_and_loads_with_its_group_count(joint_fitted, tmp_path: Path) -> None:
    encoder, data = joint_fitted
    encoder.save_pretrained(tmp_path / "m")
    head = json.loads((tmp_path / "m" / "config.json").read_text())["head"]
    assert head["align_head_groups"] == [12] and head["align_head_pieces"] == [4]
    card = (tmp_path / "m" / "README.md").read_text()  # the card says what h_theta is, not DeepMinMax's CLUB
    assert "alignment head" in card and "joint group" in card and "CLUB" not in card
    loaded = DebiasedEncoder.from_pretrained(tmp_path / "m", backbone=frozen_encoder())
    with torch.no_grad():
        assert torch.equal(loaded(data["xte"]), encoder(data["xte"]))
