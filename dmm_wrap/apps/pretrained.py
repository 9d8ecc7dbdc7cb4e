"""The digits encoders shipped with dmm_wrap: small timm ResNets whose features carry the digit and its nuisances.

Both were trained by examples/train_digits_encoder.py on `SyntheticDigits`, and both predict the rotation, stroke
width and site, so their features hold the sensitive attributes DeepMinMax should remove:

- "digits" (`model.backbone: digits`) also classifies the digit: a linear probe reads it at about 0.98.
- "digits_label_free" never reads a digit label (an autoencoder, as the paper's InfoGAN discriminator was trained
  without labels): a linear probe reads the digit at about 0.89, below the ceiling.

The weights ship in dmm_wrap/assets/ as safetensors with a sha256 checksum; nothing is downloaded. Importing this
module registers both (`register_pretrained`), so a heads-only save on either loads without a download.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from torch import nn

from ..backbones import BackboneSpec, create_backbone, freeze, register_pretrained, tag_backbone

DIGITS_ENCODER_ARCH = "test_resnet"
"""timm architecture of the digits encoder (373k parameters)."""

DIGITS_ENCODER_TAG = "dmm_wrap-digits"
"""`BackboneSpec.pretrained_tag` of the "digits" encoder: its weights are the file shipped with dmm_wrap."""

DIGITS_ENCODER_LAYER: str | None = None
"""Layer to hook: None, the pooled output (96 features). For "digits" it gives the best held-out digit linear probe
(0.981 vs 0.976 for layer3) and carries every nuisance linearly (site 1.00, rotation R^2 0.97, width R^2 0.91); for
"digits_label_free", layer3 reads the digit better (0.90 vs 0.87), the pooled output keeps the two encoders alike."""

DIGITS_IMAGE_SIZE = 32
"""Side of the square `SyntheticDigits` images the encoders were trained on."""

_ASSETS = Path(__file__).resolve().parents[1] / "assets"


class DigitsEncoder(NamedTuple):
    """One shipped digits encoder."""

    name: str
    """`model.backbone` value and `load_digits_encoder(name=)`."""
    weights: Path
    """The shipped safetensors file; its sha256 is in the .sha256 file next to it."""
    tag: str
    """`BackboneSpec.pretrained_tag`, recorded by heads-only saves."""
    objective: str
    """examples/train_digits_encoder.py --objective that made it."""


DIGITS_ENCODERS: dict[str, DigitsEncoder] = {
    "digits": DigitsEncoder("digits", _ASSETS / "digits_test_resnet.safetensors", DIGITS_ENCODER_TAG, "supervised"),
    "digits_label_free": DigitsEncoder("digits_label_free", _ASSETS / "digits_label_free_test_resnet.safetensors",
                                       "dmm_wrap-digits-label-free", "label_free"),
}
"""The shipped digits encoders by name."""

DIGITS_ENCODER_WEIGHTS = DIGITS_ENCODERS["digits"].weights
"""The "digits" encoder's shipped weights."""


def _encoder(name: str) -> DigitsEncoder:
    if name not in DIGITS_ENCODERS:
        raise ValueError(f"Unknown digits encoder {name!r}; expected one of {sorted(DIGITS_ENCODERS)}.")
    return DIGITS_ENCODERS[name]


def _reproduce(name: str) -> str:
    return f"python examples/train_digits_encoder.py --objective {_encoder(name).objective} --out-dir dmm_wrap/assets"


def digits_encoder_spec(name: str = "digits") -> BackboneSpec:
    """The rebuild spec attached to the digits encoder `name`."""
    return BackboneSpec("timm", DIGITS_ENCODER_ARCH, pretrained_tag=_encoder(name).tag, kwargs={"num_classes": 0})


def load_digits_encoder(weights: str | os.PathLike | None = None, sha256: str | None = None, *,
                        name: str = "digits") -> nn.Module:
    """Build a frozen digits encoder (timm test_resnet) with the shipped, checksum-verified weights.

    Args:
        weights: a safetensors file of the encoder; None uses the file of `name` shipped with dmm_wrap.
        sha256: the expected hex digest; None reads it from the ".sha256" file next to `weights`.
        name: which encoder (`DIGITS_ENCODERS`): "digits" (trained with the digit labels) or "digits_label_free".

    Returns:
        The encoder in eval mode with gradients off, tagged with `digits_encoder_spec(name)`. Its pooled output has 96
        features; hook `DIGITS_ENCODER_LAYER` for the features the shipped configs debias.

    Example:
        >>> encoder = load_digits_encoder()
        >>> enc = DebiasedEncoder(encoder, DIGITS_ENCODER_LAYER, SYNTHETIC_ATTRIBUTES, input_size=(3, 32, 32))
    """
    encoder = _encoder(name)
    path = Path(weights) if weights is not None else encoder.weights
    if not path.is_file():
        hint = (f"The shipped file is missing from the installation: reinstall dmm_wrap or regenerate it with "
                f"`{_reproduce(name)}`." if weights is None else "Pass the path of a digits encoder .safetensors file.")
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
                         f"file is corrupted or was replaced; reinstall dmm_wrap or regenerate it with `{_reproduce(name)}`.")
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
    return tag_backbone(freeze(model), digits_encoder_spec(name))


# No preprocessing: they were trained on SyntheticDigits tensors, which are generated already normalised.
for _name, _enc in DIGITS_ENCODERS.items():
    register_pretrained(_enc.tag, functools.partial(load_digits_encoder, name=_name), preprocessing=None)


__all__ = ["DIGITS_ENCODER_ARCH", "DIGITS_ENCODER_TAG", "DIGITS_ENCODER_LAYER", "DIGITS_IMAGE_SIZE",
           "DIGITS_ENCODER_WEIGHTS", "DIGITS_ENCODERS", "DigitsEncoder", "digits_encoder_spec", "load_digits_encoder"]
