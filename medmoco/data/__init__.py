"""Datasets over the CT cache and their samplers."""
from .datasets import CacheSliceDataset, ContrastiveDataset, EpochSampler, LabeledDataset

__all__ = ["CacheSliceDataset", "ContrastiveDataset", "EpochSampler", "LabeledDataset"]
