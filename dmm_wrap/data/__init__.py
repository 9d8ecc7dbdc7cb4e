"""Data sources: batches as (images, attributes[, labels]), images listed in a CSV file, Camelyon17-WILDS."""

from .camelyon import CAMELYON17_ATTRIBUTES, Camelyon17Patches, camelyon17
from .images import ImageCSVDataset, default_transform

__all__ = ["CAMELYON17_ATTRIBUTES", "Camelyon17Patches", "ImageCSVDataset", "camelyon17", "default_transform"]
