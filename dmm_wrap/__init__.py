"""dmm_wrap: DeepMinMax debiasing of frozen vision backbones (Han, Wang, Long, Peng, AAAI-22)."""

from .version import __version__  # noqa: E402

from .train import distributed  # noqa: E402
from .backbones import BackboneSpec, create_backbone  # noqa: E402
from .train.checkpoint import TrainingInterrupted  # noqa: E402
from .config import Attribute, ConfigError, FitConfig, HeadConfig  # noqa: E402
from .apps.digits import SYNTHETIC_ATTRIBUTES, SyntheticDigits  # noqa: E402
from .data import HFImageDataset, ImageCSVDataset, camelyon17  # noqa: E402
from .io.hub import push_folder_to_hub  # noqa: E402
from .inference import Preprocessing  # noqa: E402
from .model import DebiasedEncoder  # noqa: E402
from .apps.pretrained import load_digits_encoder  # noqa: E402
from .train.loop import FitHistory  # noqa: E402

_LAZY = {"audit": "apps.leakage", "AuditConfig": "apps.leakage", "AuditReport": "apps.leakage"}
"""Public names imported on first use: the audit needs scikit-learn, which `import dmm_wrap` does not load."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Attribute", "AuditConfig", "AuditReport", "BackboneSpec", "ConfigError", "DebiasedEncoder", "FitConfig",
           "FitHistory",
           "HFImageDataset", "HeadConfig", "ImageCSVDataset", "Preprocessing", "SYNTHETIC_ATTRIBUTES", "SyntheticDigits",
           "TrainingInterrupted", "__version__", "audit", "camelyon17", "create_backbone", "distributed",
           "load_digits_encoder", "push_folder_to_hub"]
