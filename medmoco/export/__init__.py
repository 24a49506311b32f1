"""A trained medmoco model packaged for use outside medmoco: a MONAI bundle (:mod:`.bundle`), whose
network is :class:`.network.BundleClassifier`. Importable without MLflow; a ``models:/`` model is
described by the registry (:mod:`medmoco.registry.history`)."""
from .bundle import export_bundle

__all__ = ["export_bundle"]
