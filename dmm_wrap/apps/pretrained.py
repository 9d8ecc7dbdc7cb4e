"""The digits encoder shipped with dmm_wrap: a small timm ResNet whose features carry the digit and its nuisances.

It was trained by examples/train_digits_encoder.py on `SyntheticDigits` to classify the digit AND to predict the
rotation, stroke width and site, so its features hold the sensitive attributes DeepMinMax should remove. The weights
ship in dmm_wrap/assets/ as safetensors with a sha256 checksum; nothing is downloaded. Importing this module registers
the encoder (`register_pretrained`), so a heads-only save on it loads without a download.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torch import nn

from ..backbones import BackboneSpec, create_backbone, freeze, register_pretrained, tag_backbone

DIGITS_ENCODER_ARCH = "test_resnet"
"""timm architecture of the digits encoder (373k parameters)."""

DIGITS_ENCODER_TAG = "dmm_wrap-digits"
"""`BackboneSpec.pretrained_tag` of the digits encoder: its weights are the file shipped with dmm_wrap."""

DIGITS_ENCODER_LAYER: str | None = None
"""Layer to hook: None, the pooled output (96 features). It gives the best held-out digit linear probe (0.981 vs
0.976 for layer3) and carries every nuisance linearly (site 1.00, rotation R^2 0.97, width R^2 0.91)."""

DIGITS_IMAGE_SIZE = 32
"""Side of the square `SyntheticDigits` images the encoder was trained on."""

DIGITS_ENCODER_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits_test_resnet.safetensors"
"""The shipped weights; their sha256 is in the .sha256 file next to them."""

_REPRODUCE = "python examples/train_digits_encoder.py --out-dir dmm_wrap/assets"


def digits_encoder_spec() -> BackboneSpec:
    """The rebuild spec attached to the digits encoder."""
    return BackboneSpec("timm", DIGITS_ENCODER_ARCH, pretrained_tag=DIGITS_ENCODER_TAG, kwargs={"num_classes": 0})


def load_digits_encoder(weights: str | os.PathLike | None = None, sha256: str | None = None) -> nn.Module:
    """Build the frozen digits encoder (timm test_resnet) with the shipped, checksum-verified weights.

    Args:
        weights: a safetensors file of the encoder; None uses the file shipped with dmm_wrap.
        sha256: the expected hex digest; None reads it from the ".sha256" file next to `weights`.

    Returns:
        The encoder in eval mode with gradients off, tagged with `digits_encoder_spec()`. Its pooled output has 96
        features; hook `DIGITS_ENCODER_LAYER` for the features the shipped configs debias.

    Example:
        >>> encoder = load_digits_encoder()
        >>> enc = DebiasedEncoder(encoder, DIGITS_ENCODER_LAYER, SYNTHETIC_ATTRIBUTES, input_size=(3, 32, 32))
    """
    path = Path(weights) if weights is not None else DIGITS_ENCODER_WEIGHTS
    if not path.is_file():
        hint = (f"The shipped file is missing from the installation: reinstall dmm_wrap or regenerate it with "
                f"`{_REPRODUCE}`." if weights is None else "Pass the path of a digits encoder .safetensors file.")
        raise ValueError(f"Digits encoder weights {str(path)!r} not found. {hint}")
    if sha256 is None:
        checksum_file = path.with_suffix(".sha256")
        if not checksum_file.is_file():
            raise ValueError(f"No checksum for {str(path)!r}: expected {str(checksum_file)!r} holding its hex sha256, "
                             "or pass sha256=HEX.")
        sha256 = (checksum_file.read_text().split() or [""])[0]
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.strip().lower():
        raise ValueError(f"Checksum mismatch for {str(path)!r}: sha256 is {digest}, expected {sha256.strip()}. The "
                         f"file is corrupted or was replaced; reinstall dmm_wrap or regenerate it with `{_REPRODUCE}`.")
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        state = load_safetensors(data)
    except SafetensorError as err:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file ({err}).") from err
    model = create_backbone(f"timm:{DIGITS_ENCODER_ARCH}", num_classes=0)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{str(path)!r} does not hold timm {DIGITS_ENCODER_ARCH} weights (num_classes=0): "
                         f"{err}") from err
    return tag_backbone(freeze(model), digits_encoder_spec())


# No preprocessing: it was trained on SyntheticDigits tensors, which are generated already normalised.
register_pretrained(DIGITS_ENCODER_TAG, load_digits_encoder, preprocessing=None)


__all__ = ["DIGITS_ENCODER_ARCH", "DIGITS_ENCODER_TAG", "DIGITS_ENCODER_LAYER", "DIGITS_IMAGE_SIZE",
           "DIGITS_ENCODER_WEIGHTS", "digits_encoder_spec", "load_digits_encoder"]
