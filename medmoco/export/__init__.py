"""What leaves medmoco for other systems: the model as a MONAI bundle (:mod:`.bundle`, whose network
is :class:`.network.BundleClassifier`; a ``models:/`` model is described by the registry,
:mod:`medmoco.registry.history`) and DICOM Structured Reports of predictions (:mod:`.sr`).
Importable without MLflow; :mod:`.sr` needs highdicom, imported only there."""
from .bundle import export_bundle

__all__ = ["export_bundle"]
