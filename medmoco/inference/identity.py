"""What a model is, for the outputs that name it (a DICOM SR's algorithm identification): a name,
a version and the sha256 of the very file that made the predictions.

The digest is the one unambiguous part: a name and a version are labels (a registered version's
name and number; ``runs:/ID`` and a plain path have none of their own), while the sha256 of
``model.pt`` identifies the weights, thresholds and preprocessing byte for byte, the same digest
the registry records at registration (:mod:`medmoco.registry.integrity`).
"""
from __future__ import annotations

from dataclasses import dataclass

UNREGISTERED = "unregistered"


@dataclass(frozen=True)
class ModelIdentity:
    """``name`` and ``version`` as a reader sees them; ``sha256`` of the model file (hex)."""

    name: str
    version: str
    sha256: str


def model_identity(spec: str, path: str, info: dict, tracking_uri: str = "") -> ModelIdentity:
    """The identity of the model ``spec`` resolved to ``path`` (:func:`resolve_model`).

    Args:
        spec: what the user passed: a path, ``runs:/ID`` or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        path: the local ``model.pt`` it resolved to.
        info: the file's payload without its state dicts (``arch``, ``format``, ...).

    A registered version is named by its registered name and version number (an alias is looked
    up, so the SR says which version the alias pointed to when it ran); anything else by
    ``medmoco-<arch>[-series]`` and a version of ``runs:/ID`` or ``unregistered``.
    """
    from medmoco.registry.integrity import sha256_file

    digest = sha256_file(path)
    if spec.startswith("models:/"):
        from medmoco.registry.integrity import get_version
        from medmoco.tracking import client as mlflow_client
        from medmoco.tracking import resolve_tracking_uri

        version = get_version(mlflow_client(resolve_tracking_uri(tracking_uri)), spec)
        return ModelIdentity(str(version.name), str(version.version), digest)
    name = f"medmoco-{info.get('arch', 'classifier')}" + ("-series" if info.get("series") else "")
    version = spec if spec.startswith("runs:/") else UNREGISTERED
    return ModelIdentity(name, version, digest)

