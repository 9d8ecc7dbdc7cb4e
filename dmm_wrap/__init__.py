"""dmm_wrap: DeepMinMax debiasing of frozen vision backbones (Han, Wang, Long, Peng, AAAI-22)."""

__version__ = "0.1.0"

from . import distributed  # noqa: E402
from .backbones import BackboneSpec, create_backbone  # noqa: E402
from .checkpoint import TrainingInterrupted  # noqa: E402
from .config import Attribute, ConfigError, FitConfig, HeadConfig  # noqa: E402
from .data import SYNTHETIC_ATTRIBUTES, ImageCSVDataset, SyntheticDigits, camelyon17  # noqa: E402
from .hub import push_folder_to_hub  # noqa: E402
from .inference import Preprocessing  # noqa: E402
from .model import DebiasedEncoder  # noqa: E402
from .pretrained import load_digits_encoder  # noqa: E402
from .trainer import FitHistory  # noqa: E402

_LAZY = {"audit": "leakage", "AuditConfig": "leakage", "AuditReport": "leakage"}
"""Public names imported on first use: the audit needs scikit-learn, which `import dmm_wrap` does not load."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Attribute", "AuditConfig", "AuditReport", "BackboneSpec", "ConfigError", "DebiasedEncoder", "FitConfig",
           "FitHistory",
           "HeadConfig", "ImageCSVDataset", "Preprocessing", "SYNTHETIC_ATTRIBUTES", "SyntheticDigits",
           "TrainingInterrupted", "__version__", "audit", "camelyon17", "create_backbone", "distributed",
           "load_digits_encoder", "push_folder_to_hub"]
