"""Data sources: batches as (images, attributes[, labels]), images listed in a CSV file or held in a Hugging Face
dataset, Camelyon17-WILDS."""

from .camelyon import CAMELYON17_ATTRIBUTES, Camelyon17Patches, camelyon17
from .hf import HFImageDataset, load_hf_splits
from .images import ImageCSVDataset, default_transform

__all__ = ["CAMELYON17_ATTRIBUTES", "Camelyon17Patches", "HFImageDataset", "ImageCSVDataset", "camelyon17",
           "default_transform", "load_hf_splits"]
