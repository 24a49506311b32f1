"""Datasets over the CT cache, their samplers, and the choice of training rows; a folder of raw
DICOM slices in series order (the MONAI bundle's datalist)."""
from .datasets import CacheSliceDataset, ContrastiveDataset, EpochSampler, LabeledDataset
from .dicom_folder import series_batches, series_datalist
from .selection import train_indices

__all__ = ["CacheSliceDataset", "ContrastiveDataset", "EpochSampler", "LabeledDataset", "train_indices", "series_batches",
           "series_datalist"]
