"""Transforms: contrastive views (MONAI per-sample and a batched device path) and the classifier's
inputs (supervised augmentation, evaluation preparation); raw DICOM slices to those inputs
(:mod:`.dicom`, the MONAI bundle's reader)."""
from .supervised import prepare_images, supervised_transform
from .views import AugmentConfig, BatchViewAugment, TwoViews, monai_view_transform

__all__ = ["AugmentConfig", "BatchViewAugment", "TwoViews", "monai_view_transform", "prepare_images",
           "supervised_transform"]
