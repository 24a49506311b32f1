"""Datasets over the CT cache, their samplers, and the choice of training rows."""
from .datasets import CacheSliceDataset, ContrastiveDataset, EpochSampler, LabeledDataset
from .selection import train_indices

__all__ = ["CacheSliceDataset", "ContrastiveDataset", "EpochSampler", "LabeledDataset", "train_indices"]
