"""The leakage audit: a planted nonlinear attribute is found, independent features pass, every source kind gives the
same numbers, and the files (audit.json, audit.md, the model card) say what was measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_site_problem
from dmm_wrap import Attribute, AuditConfig, AuditReport, DebiasedEncoder, audit
from dmm_wrap.config import EvalConfig

ATTRS = [Attribute("site", "categorical", 3), Attribute("tilt", "continuous")]
# (32,) hidden units with 100 iterations stopped early on the rings below, at chance: a probe too weak to find the
# leakage would pass anything, so the probes here are the smallest that find it reliably.
PROBES = EvalConfig(mlp_hidden=(64,), mlp_max_iter=200, leace=False, tsne_samples=0)


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, 8] and attributes [n, 2]: the site is the radius of a ring in dims 0-1 (centred, so no linear
    probe can read it), the tilt is dim 2 plus noise; dims 3-7 are noise."""
    rng = np.random.default_rng(seed)
    site, tilt = rng.integers(0, 3, n), rng.normal(size=n)
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = 1.0 + 1.5 * site + 0.2 * rng.normal(size=n)
    x = rng.normal(size=(n, 8))
    x[:, 0], x[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    x[:, 2] = tilt + 0.3 * rng.normal(size=n)
    return x.astype(np.float32), np.stack([site, tilt], 1).astype(np.float32)


@pytest.fixture(scope="module")
def planted_report() -> AuditReport:
    z, b = planted(2000, 0)
    independent, _ = planted(2000, 1)  # the same kind of features, drawn independently of b
    return audit((z, independent), b, attributes=ATTRS, probes=PROBES)


def test_planted_nonlinear_attribute_leaks(planted_report: AuditReport) -> None:
    site = planted_report.features["raw"]["site"]
    assert site.leakage.metric == "balanced_accuracy" and site.leakage.chance == pytest.approx(1 / 3)
    assert site.leakage.mlp > 0.9  # measured 0.966; chance 0.333
    assert site.leakage.linear < site.leakage.chance + 0.05  # the rings are invisible to a linear probe...
    assert site.verdict == "leaks" and site.threshold == pytest.approx(1 / 3 + 0.05)  # ...but not to the audit
    tilt = planted_report.features["raw"]["tilt"]
    assert tilt.leakage.metric == "r2" and tilt.leakage.mlp > 0.8 and tilt.verdict == "leaks"
    assert planted_report.verdicts("raw") == {"site": "leaks", "tilt": "leaks"}


def test_independent_features_are_removed(planted_report: AuditReport) -> None:
    """Negative control: features independent of B are at chance for both probes."""
    site, tilt = planted_report.features["debiased"]["site"], planted_report.features["debiased"]["tilt"]
    assert abs(site.leakage.mlp - 1 / 3) < 0.05 and abs(site.leakage.linear - 1 / 3) < 0.05
    assert tilt.leakage.mlp < 0.05 and tilt.leakage.linear < 0.05
    assert planted_report.main_features == "debiased"
    assert planted_report.verdicts() == {"site": "removed", "tilt": "removed"}
    assert (planted_report.train_samples, planted_report.test_samples) == (1400, 600)  # test_fraction 0.3


def test_stricter_criteria_change_the_verdict(planted_report: AuditReport) -> None:
    z, b = planted(2000, 0)
    strict = audit({"z": z}, {"site": b[:, 0], "tilt": b[:, 1]}, attributes=ATTRS, probes=PROBES,
                   config=AuditConfig(margin=0.7, max_r2=0.95))
    assert list(strict.features) == ["z"] and strict.verdicts() == {"site": "removed", "tilt": "removed"}
    # the same probes as the default audit: only the thresholds moved
    assert strict.features["z"]["site"].leakage == planted_report.features["raw"]["site"].leakage


def test_encoder_callable_and_precomputed_features_agree(mlp_backbone: nn.Module) -> None:
    x, _, s = make_site_problem(600, 0)
    b = torch.stack([s.float(), x[:, 3] + 0.1 * torch.randn(600, generator=torch.Generator().manual_seed(1))], 1)
    loader = DataLoader(TensorDataset(x, b), batch_size=100)
    enc = DebiasedEncoder(mlp_backbone, None, ATTRS, input_size=(16,))
    enc.train()
    report = audit(enc, loader, probes=PROBES)
    assert enc.training  # the mode is restored
    assert list(report.features) == ["raw", "debiased"] and report.train_samples + report.test_samples == 600
    assert report.features["raw"]["site"].verdict == "leaks"
    assert audit(enc, loader, probes=PROBES).to_dict()["features"] == report.to_dict()["features"]  # repeatable

    with torch.no_grad():
        z = enc.features(x)
    by_callable = audit(enc.features, loader, attributes=ATTRS, probes=PROBES)
    precomputed = audit(z, b, attributes=ATTRS, probes=PROBES)
    for other in (by_callable, precomputed):
        for name in ("site", "tilt"):
            assert other.features["features"][name].leakage.mlp == pytest.approx(
                report.features["raw"][name].leakage.mlp, abs=1e-6)


def test_separate_test_loader(mlp_backbone: nn.Module) -> None:
    x, _, s = make_site_problem(500, 0)
    b = torch.stack([s.float(), x[:, 3]], 1)
    enc = DebiasedEncoder(mlp_backbone, None, ATTRS, input_size=(16,))
    train = DataLoader(TensorDataset(x[:300], b[:300]), batch_size=64)
    test = DataLoader(TensorDataset(x[300:], b[300:]), batch_size=64)
    report = audit(enc, train, test_loader=test, probes=PROBES)
    assert (report.train_samples, report.test_samples, report.split) == (300, 200, "a separate test set")
    z = enc.features(x).detach().numpy()
    report = audit(z[:300], b[:300], test_loader=b[300:], test_features=z[300:], attributes=ATTRS, probes=PROBES)
    assert (report.train_samples, report.test_samples) == (300, 200)


def test_write_json_markdown_and_model_card(planted_report: AuditReport, tmp_path: Path,
                                            mlp_backbone: nn.Module) -> None:
    planted_report.write(tmp_path / "plain")
    data = json.loads((tmp_path / "plain/audit.json").read_text())
    assert {"model", "attributes", "samples", "split", "criteria", "features", "verdicts", "main_features",
            "wall_seconds"} <= set(data)
    assert data["verdicts"] == {"site": "removed", "tilt": "removed"}
    assert set(data["features"]["raw"]["site"]) == {"metric", "chance", "linear", "mlp", "threshold", "verdict"}
    assert AuditReport.from_dict(data).to_dict() == data
    md = (tmp_path / "plain/audit.md").read_text()
    assert "| raw Z       | site      | balanced accuracy | 0.333  |" in md and "- **site**: removed" in md
    assert not (tmp_path / "plain/README.md").exists()  # no saved model there: no card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left

    enc = DebiasedEncoder(mlp_backbone, None, ATTRS, input_size=(16,))
    enc.save_pretrained(tmp_path / "model")
    planted_report.write(tmp_path / "model")
    card = ModelCard.load(tmp_path / "model/README.md").text
    assert "## Leakage audit" in card and "| `site` | balanced accuracy | 0.3333 | 0.3833 |" in card
    enc.save_pretrained(tmp_path / "model")  # the same weights again: the card keeps the audit
    assert "## Leakage audit" in (tmp_path / "model/README.md").read_text()
    DebiasedEncoder.from_pretrained(tmp_path / "model", backbone=mlp_backbone)  # the folder still loads


def test_card_leaves_out_an_audit_of_other_weights(tmp_path: Path, mlp_backbone: nn.Module,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    x, _, s = make_site_problem(200, 0)
    b = torch.stack([s.float(), x[:, 3]], 1)
    enc = DebiasedEncoder(mlp_backbone, None, ATTRS, input_size=(16,))
    enc.save_pretrained(tmp_path / "m")
    sha = json.loads((tmp_path / "m/config.json").read_text())["weights_sha256"]
    report = audit(enc, DataLoader(TensorDataset(x, b), batch_size=100), probes=PROBES)
    report = AuditReport.from_dict({**report.to_dict(), "model": {"source": "m", "weights_sha256": sha}})
    report.write(tmp_path / "m")
    assert "## Leakage audit" in (tmp_path / "m/README.md").read_text()
    with torch.no_grad():
        next(iter(enc.heads.parameters())).add_(1.0)  # other weights, saved into the same folder
    enc.save_pretrained(tmp_path / "m")
    assert "## Leakage audit" not in (tmp_path / "m/README.md").read_text()
    assert "audits other weights" in caplog.text


def test_bad_input_is_named(mlp_backbone: nn.Module) -> None:
    z, b = planted(100, 0)
    with pytest.raises(ValueError, match="Pass attributes="):
        audit(z, b)
    with pytest.raises(ValueError, match="100 rows but their attributes 90"):
        audit(z, b[:90], attributes=ATTRS)
    with pytest.raises(ValueError, match="test_features and test_loader together"):
        audit(z, b, test_loader=b, attributes=ATTRS)
    with pytest.raises(TypeError, match="Cannot audit a int"):
        audit(3, b, attributes=ATTRS)
    with pytest.raises(ValueError, match="shape \\[N, D\\]"):
        audit(z[:, 0], b, attributes=ATTRS)
    with pytest.raises(ValueError, match="too few on a side"):
        audit(z[:5], b[:5], attributes=ATTRS)
    with pytest.raises(ValueError, match="must hold class ids in 0..2"):
        audit(z, np.c_[b[:, 0] + 3, b[:, 1]], attributes=ATTRS)
    enc = DebiasedEncoder(mlp_backbone, None, ATTRS, input_size=(16,))
    with pytest.raises(ValueError, match="differ from the encoder's"):
        audit(enc, [], attributes=ATTRS[:1])
    with pytest.raises(ValueError, match="AuditConfig.margin"):
        AuditConfig(margin=1.5)
