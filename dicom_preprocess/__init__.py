"""DICOM archives -> multi-window CT cache. Knows nothing of training.

    from dicom_preprocess import open_cache
    c = open_cache("cache/")
    len(c), c[0].shape, c.manifest.image_id[:3]
"""
__version__ = "0.1.0"

from .cache import CTCache, open_cache  # noqa: E402
from .labels import SUBTYPES  # noqa: E402
from .windowing import PRESET_WINDOWS, Window, parse_windows  # noqa: E402

__all__ = ["CTCache", "open_cache", "SUBTYPES", "PRESET_WINDOWS", "Window", "parse_windows", "__version__"]
