"""dmm_wrap: DeepMinMax debiasing of frozen vision backbones (Han, Wang, Long, Peng, AAAI-22)."""

__version__ = "0.1.0"

from .backbones import BackboneSpec, create_backbone  # noqa: E402
from .config import Attribute, FitConfig, HeadConfig  # noqa: E402
from .model import DebiasedEncoder  # noqa: E402
from .trainer import FitHistory  # noqa: E402

__all__ = ["Attribute", "BackboneSpec", "DebiasedEncoder", "FitConfig", "FitHistory", "HeadConfig", "create_backbone",
           "__version__"]
