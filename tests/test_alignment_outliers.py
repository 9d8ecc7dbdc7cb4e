"""The alignment head's outlier radius (`fit_alignment_head(outliers=q)`): a row farther from its piece than the
fitting rows were keeps its features, so a site the head never saw is not moved by a seen site's maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dmm_wrap import Attribute, DebiasedEncoder
from dmm_wrap.apps.run_config import AlignHeadConfig
from dmm_wrap.core.alignment import PiecewiseAlignment
from dmm_wrap.io.serialization import file_sha256
from dmm_wrap.validation import ConfigError

SITES = Attribute("site", "categorical", 4)


def four_sites(n: int, seed: int, sites: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs [n, 8]: a 4-class content plus the tint of one of `sites` (of 4), behind which the frozen tanh encoder
    moves and reshapes each class per site; labels and sites."""
    fixed = torch.Generator().manual_seed(7)
    means, tint = torch.randn(4, 8, generator=fixed) * 2.0, torch.randn(4, 8, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    s = torch.tensor(sites)[torch.randint(0, len(sites), (n,), generator=g)]
    return means[y] + 0.5 * torch.randn(n, 8, generator=g) + tint[s], y, s


def backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 24))


def encoder() -> DebiasedEncoder:
    return DebiasedEncoder(backbone(), None, [SITES])


def fit(outliers: float | None) -> DebiasedEncoder:
    """The head fitted on sites 0-2 only."""
    x, _, s = four_sites(3000, 0, [0, 1, 2])
    enc = encoder()
    with pytest.warns(UserWarning, match=r"Classes \[3\] of 'site' are not in the sample.*outliers="):
        enc.fit_alignment_head(DataLoader(TensorDataset(x, s.float()[:, None]), batch_size=256), clusters=4,
                               outliers=outliers)
    return enc.eval()


@pytest.fixture(scope="module")
def heads() -> dict[str | None, DebiasedEncoder]:
    return {"none": fit(None), "0.99": fit(0.99)}


@torch.no_grad()
def unseen_site_task(enc: DebiasedEncoder, debiased: bool) -> float:
    """Accuracy on site 3 (never seen) of a logistic regression trained on sites 0-2's features."""
    xtr, ytr, _ = four_sites(3000, 1, [0, 1, 2])
    xte, yte, _ = four_sites(1000, 2, [3])
    out = enc if debiased else enc.features
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(out(xtr).numpy(), ytr.numpy())
    return float(clf.score(out(xte).numpy(), yte.numpy()))


@torch.no_grad()
def kept(enc: DebiasedEncoder, x: torch.Tensor) -> float:
    """Fraction of rows the head leaves as they are (beyond their piece's radius)."""
    heads = enc.heads
    z = (enc.features(x) - heads.feature_mean) / heads.feature_std
    return float((heads.h(z) == z).all(1).float().mean())


def test_an_unseen_site_keeps_its_features_and_its_task(heads) -> None:
    raw = unseen_site_task(heads["none"], debiased=False)
    mapped, guarded = unseen_site_task(heads["none"], True), unseen_site_task(heads["0.99"], True)
    print(f"unseen site task: raw {raw:.3f}, every row mapped {mapped:.3f}, outliers=0.99 {guarded:.3f}")
    assert guarded >= raw - 0.02
    # The control: a seen site's maps move the unseen site's rows away (every row mapped: 0.905 with the head's
    # geometric target, 0.766 with the pooled one, whose maps stretch further).
    assert guarded >= mapped + 0.05
    unseen, _, _ = four_sites(1000, 2, [3])
    seen, _, _ = four_sites(1000, 3, [0, 1, 2])
    assert kept(heads["0.99"], unseen) > 0.8
    assert kept(heads["0.99"], seen) < 0.05
    assert kept(heads["none"], unseen) == 0.0


def test_the_radius_is_each_pieces_quantile_of_its_rows(heads) -> None:
    x, _, _ = four_sites(3000, 0, [0, 1, 2])
    share = kept(heads["0.99"], x)  # the fitting rows: about 1% of each piece lies beyond its 0.99 quantile
    assert 0.002 <= share <= 0.015
    stage = heads["0.99"].heads.h.alignment.stages[0]
    assert torch.isfinite(stage.radius[:3]).all() and torch.isinf(stage.radius[3]).all()  # site 3: never fitted
    assert torch.isinf(heads["none"].heads.h.alignment.stages[0].radius).all()


@torch.no_grad()
def test_save_and_load_keep_the_radius_and_older_saves_map_every_row(heads, tmp_path: Path) -> None:
    x, _, _ = four_sites(500, 4, [0, 1, 2, 3])
    for name, enc in heads.items():
        enc.save_pretrained(tmp_path / name)
        assert torch.equal(DebiasedEncoder.from_pretrained(tmp_path / name, backbone=backbone())(x), enc(x))
    # A save written before pieces had a radius: no radius keys; it loads and maps every row, as it did.
    weights = tmp_path / "none" / "model.safetensors"
    state = load_file(weights)
    assert [k for k in state if k.endswith(".radius")]
    save_file({k: v for k, v in state.items() if not k.endswith(".radius")}, weights)
    config = json.loads((weights.parent / "config.json").read_text())
    config["weights_sha256"] = file_sha256(weights)  # as that save recorded its own weights
    (weights.parent / "config.json").write_text(json.dumps(config))
    assert torch.equal(DebiasedEncoder.from_pretrained(tmp_path / "none", backbone=backbone())(x), heads["none"](x))


@torch.no_grad()
def test_the_radius_exports_to_onnx_and_torch_export(heads, tmp_path: Path) -> None:
    """Kept and mapped rows alike (seen sites and the unseen one) through onnxruntime and torch.export."""
    ort = pytest.importorskip("onnxruntime")
    enc = heads["0.99"]
    x = torch.cat([four_sites(100, 5, [0, 1, 2])[0], four_sites(100, 6, [3])[0]])
    assert 0.3 < kept(enc, x) < 0.7  # both branches of the radius are exercised
    path = enc.export_onnx(tmp_path / "head.onnx", x[:4])
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, enc(x).numpy(), atol=1e-4)
    program = torch.export.export(enc.inference_module(), (x,))
    torch.testing.assert_close(program.module()(x), enc(x))


def test_a_state_without_radius_loads_strictly_with_every_row_mapped(heads) -> None:
    """Checkpoints and saves written before pieces had a radius (resume loads them strictly)."""
    alignment = heads["0.99"].heads.h.alignment
    state = {k: v for k, v in alignment.state_dict().items() if not k.endswith("radius")}
    fresh = PiecewiseAlignment.empty_like(state)
    fresh.load_state_dict(state)  # strict: no missing key
    assert torch.isinf(fresh.stages[0].radius).all()
    assert torch.equal(fresh.stages[0].centroids, alignment.stages[0].centroids)


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, True, "0.99"])
def test_a_bad_quantile_is_refused_with_what_was_expected(bad: object) -> None:
    x, _, s = four_sites(64, 0, [0, 1, 2])
    enc = encoder()
    with pytest.raises(ValueError, match=r"outliers must be None .* quantile in \(0, 1\]"):
        enc.fit_alignment_head(DataLoader(TensorDataset(x, s.float()[:, None]), batch_size=32), outliers=bad)
    assert enc.heads is None  # refused before the backbone pass: nothing was built
    if isinstance(bad, (int, float)) and not isinstance(bad, bool):
        with pytest.raises(ConfigError, match="outliers"):
            AlignHeadConfig(outliers=bad)
