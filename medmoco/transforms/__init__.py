"""Contrastive views: MONAI per-sample transforms (CPU workers) and a batched device path."""
from .views import AugmentConfig, BatchViewAugment, TwoViews, monai_view_transform

__all__ = ["AugmentConfig", "BatchViewAugment", "TwoViews", "monai_view_transform"]
