"""The shipped digits encoder: checksum-verified loading, frozen state, and what its features carry."""

from __future__ import annotations

import hashlib
import runpy
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from dmm_wrap.backbones import create_backbone, describe_backbone, pretrained_backbone
from dmm_wrap.apps.digits import SyntheticDigits
from dmm_wrap.core.hooks import FeatureExtractor
from dmm_wrap.apps.pretrained import (DIGITS_ENCODER_LAYER, DIGITS_ENCODER_WEIGHTS, DIGITS_ENCODERS, DIGITS_IMAGE_SIZE,
                                      digits_encoder_spec, load_digits_encoder)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small convolutions and probes on 2 busy cores run far faster on one thread (torch, OpenMP and BLAS).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return load_digits_encoder()


@pytest.fixture(scope="module")
def label_free_encoder() -> torch.nn.Module:
    return load_digits_encoder(name="digits_label_free")


@pytest.fixture(scope="module")
def digits():
    train = SyntheticDigits("train", 2000, image_size=DIGITS_IMAGE_SIZE, seed=11).generate()
    test = SyntheticDigits("test", 1000, image_size=DIGITS_IMAGE_SIZE, seed=11).generate()
    return train, test


@pytest.mark.parametrize("name, tag", [("digits", "dmm_wrap-digits"),
                                       ("digits_label_free", "dmm_wrap-digits-label-free")])
def test_shipped_weights_load_frozen_and_tagged(name: str, tag: str) -> None:
    weights = DIGITS_ENCODERS[name].weights
    assert weights.stat().st_size < 4_000_000
    expected = weights.with_suffix(".sha256").read_text().strip()
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == expected
    encoder = load_digits_encoder(name=name)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert describe_backbone(encoder) == digits_encoder_spec(name)
    assert describe_backbone(encoder).pretrained_tag == tag
    with torch.no_grad():
        z = encoder(torch.zeros(2, 3, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE))
    assert z.shape == (2, 96)
    # Loaded, not random: every tensor equals the file's.
    random_init = create_backbone("timm:test_resnet", num_classes=0)
    assert not torch.equal(encoder.conv1[0].weight, random_init.conv1[0].weight)
    # A heads-only save records the tag; the registry rebuilds the same encoder from it, without a download.
    rebuilt = pretrained_backbone(describe_backbone(encoder))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), encoder.state_dict().values()))


def test_the_two_encoders_differ_and_names_are_checked() -> None:
    a, b = load_digits_encoder(), load_digits_encoder(name="digits_label_free")
    assert not torch.equal(a.conv1[0].weight, b.conv1[0].weight)
    with pytest.raises(ValueError, match="Unknown digits encoder 'digitz'; expected one of"):
        load_digits_encoder(name="digitz")


def test_checksum_mismatch_is_detected(tmp_path: Path) -> None:
    weights = tmp_path / DIGITS_ENCODER_WEIGHTS.name
    shutil.copy(DIGITS_ENCODER_WEIGHTS, weights)
    shutil.copy(DIGITS_ENCODER_WEIGHTS.with_suffix(".sha256"), tmp_path)
    load_digits_encoder(weights)  # an intact copy loads
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="Checksum mismatch .* corrupted or was replaced"):
        load_digits_encoder(weights)
    with pytest.raises(ValueError, match="Checksum mismatch"):
        load_digits_encoder(DIGITS_ENCODER_WEIGHTS, sha256="0" * 64)
    weights.with_suffix(".sha256").unlink()
    with pytest.raises(ValueError, match="No checksum for .* or pass sha256=HEX"):
        load_digits_encoder(weights)
    with pytest.raises(ValueError, match="not found"):
        load_digits_encoder(tmp_path / "missing.safetensors")


def test_rejects_files_that_are_not_the_encoder(tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="does not hold timm test_resnet weights"):
        load_digits_encoder(other, sha256=digest)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_digits_encoder(garbage, sha256=hashlib.sha256(b"not a safetensors file").hexdigest())


def _features(backbone: torch.nn.Module, digits) -> tuple[np.ndarray, np.ndarray]:
    """Standardised features at DIGITS_ENCODER_LAYER of the train and test digits."""
    extractor = FeatureExtractor(backbone, DIGITS_ENCODER_LAYER)
    with torch.no_grad():
        ztr, zte = (extractor(split.images).numpy() for split in digits)
    scaler = StandardScaler().fit(ztr)
    return scaler.transform(ztr), scaler.transform(zte)


def _accuracy(ztr: np.ndarray, ytr: torch.Tensor, zte: np.ndarray, yte: torch.Tensor, max_iter: int = 3000) -> float:
    """Held-out accuracy of a logistic-regression probe."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(max_iter=max_iter).fit(ztr, ytr.numpy()).score(zte, yte.numpy())


def test_features_carry_the_digit_and_the_nuisances(encoder, digits) -> None:
    train, test = digits
    ztr, zte = _features(encoder, digits)
    # Measured on unseen source digits: digit 0.99, site 1.00, rotation R^2 0.97, width R^2 0.91.
    digit = _accuracy(ztr, train.labels, zte, test.labels)
    assert digit > 0.93  # chance 0.10
    assert _accuracy(ztr, train.attrs[:, 2], zte, test.attrs[:, 2]) > 0.98  # chance 0.33
    r2 = [LinearRegression().fit(ztr, train.attrs[:, k]).score(zte, test.attrs[:, k]) for k in (0, 1)]
    assert r2[0] > 0.9 and r2[1] > 0.8  # rotation, width; 0 = predicting the mean
    # Control: on a random-init encoder the same probe reads the digit far worse (measured 0.33), so the
    # training, not the probe, puts the digit in the features.
    torch.manual_seed(0)
    random_init = create_backbone("timm:test_resnet", num_classes=0).eval()
    rtr, rte = _features(random_init, digits)
    assert _accuracy(rtr, train.labels, rte, test.labels, max_iter=300) < digit - 0.3


def test_label_free_features_carry_the_nuisances_and_less_of_the_digit(label_free_encoder, digits) -> None:
    """The label-free encoder never read a digit label: a linear probe reads the digit well above chance but below
    the supervised encoder's (measured 0.87 vs 0.99 here), and every nuisance as well as the supervised one does."""
    train, test = digits
    ztr, zte = _features(label_free_encoder, digits)
    digit = _accuracy(ztr, train.labels, zte, test.labels)
    assert 0.6 < digit < 0.95  # chance 0.10; the room the debiasing should be able to use
    assert _accuracy(ztr, train.attrs[:, 2], zte, test.attrs[:, 2]) > 0.98  # chance 0.33
    r2 = [LinearRegression().fit(ztr, train.attrs[:, k]).score(zte, test.attrs[:, k]) for k in (0, 1)]
    assert r2[0] > 0.9 and r2[1] > 0.8
    # Control: the supervised encoder reads the digit better on the same samples with the same probe.
    str_, ste = _features(load_digits_encoder(), digits)
    assert _accuracy(str_, train.labels, ste, test.labels) > digit + 0.04


@pytest.mark.parametrize("objective, name, stem", [("supervised", "digits", "digits_test_resnet"),
                                                   ("label_free", "digits_label_free", "digits_label_free_test_resnet")])
def test_training_script_is_deterministic_and_writes_loadable_weights(objective: str, name: str, stem: str,
                                                                      tmp_path: Path, monkeypatch, capsys) -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "train_digits_encoder.py"
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        monkeypatch.setattr(sys, "argv", [str(script), "--objective", objective, "--epochs", "1", "--num-train", "128",
                                          "--num-test", "128", "--probe-train", "128", "--out-dir", str(out)])
        runpy.run_path(str(script), run_name="__main__")
        digests.append((out / f"{stem}.sha256").read_text().strip())
        assert sorted(p.name for p in out.iterdir()) == [f"{stem}.safetensors", f"{stem}.sha256"]
        encoder = load_digits_encoder(out / f"{stem}.safetensors", name=name)
        assert describe_backbone(encoder) == digits_encoder_spec(name)
    assert digests[0] == digests[1]  # same seed, same bytes
    printed = capsys.readouterr().out
    assert "held-out" in printed
    # Only the supervised objective reads the digit label (its loss and its temporary head's accuracy).
    assert ("digit CE" in printed) == (objective == "supervised")
    assert ("recon MSE" in printed) == (objective == "label_free")
