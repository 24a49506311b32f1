"""What a registered version is made of, byte for byte: sha256 digests of its files.

A version's files are listed with their sha256 in the version tag ``medmoco.files_sha256`` (a JSON
object ``{relative path: hex digest}``), written when the version is created: by `medmoco register`
for a candidate, by a promotion for a released version (where the same list is also part of the
sealed promotion record, :mod:`.release`). :func:`fetch_version` downloads a version and checks
every file against that list before anything in it is loaded: a changed, missing or added file is
refused in one line naming it. MLflow itself checks nothing of the kind (a model version points to
files that whoever may write their experiment can replace); the ``medmoco-auth`` server app
(:mod:`.auth_app`) seals them on the server, and this check catches whatever reached the files
another way (the storage bucket, a file system).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass

from dicom_preprocess.config import ConfigError

FILES_TAG = "medmoco.files_sha256"
_CHUNK = 1 << 20  # 1 MiB reads: a model file is hashed without holding it in memory
# MLflow writes this file (the registered name and version) into every download of a models:/ URI
# (mlflow/store/artifact/models_artifact_repo.py): it is not part of what was registered.
DOWNLOAD_ONLY = frozenset({"registered_model_meta"})


class IntegrityError(ConfigError):
    """A file of a registered version differs from its recorded digest (exit 2, one line)."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value) -> str:
    """The digest of a JSON value in its canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_digests(root: str) -> dict[str, str]:
    """``{path relative to root (with /): sha256}`` of every file under ``root``."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if relative not in DOWNLOAD_ONLY:
                out[relative] = sha256_file(path)
    return out


def verify_files(root: str, recorded: dict[str, str], what: str) -> None:
    """Check the files under ``root`` against ``recorded``.

    Raises:
        IntegrityError: naming the first file that differs, is missing or is not in the record.
    """
    found = file_digests(root)
    for path in sorted(set(recorded) | set(found)):
        if path not in found:
            raise IntegrityError(f"{what}: file {path} is missing (it is in the recorded sha256 list); refusing to load it")
        if path not in recorded:
            raise IntegrityError(f"{what}: file {path} is not in the recorded sha256 list (added after registration); "
                                 "refusing to load it")
        if found[path] != recorded[path]:
            raise IntegrityError(f"{what}: file {path} has sha256 {found[path][:12]}..., recorded "
                                 f"{recorded[path][:12]}... (changed after registration); refusing to load it")


@dataclass
class FetchedVersion:
    """A registered version's files, downloaded and checked."""
    name: str
    version: str
    directory: str
    digests: dict
    verified: bool  # False: the version has no recorded digests (made outside medmoco)

    @property
    def model_file(self) -> str:
        for dirpath, _, files in os.walk(self.directory):
            if "model.pt" in files:
                return os.path.join(dirpath, "model.pt")
        raise ConfigError(f"models:/{self.name}/{self.version} holds no model.pt")


def recorded_digests(version) -> dict | None:
    text = (version.tags or {}).get(FILES_TAG)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise IntegrityError(f"models:/{version.name}/{version.version}: tag {FILES_TAG} is not a JSON list of "
                             "digests; refusing to load it") from None
    if not isinstance(value, dict):
        raise IntegrityError(f"models:/{version.name}/{version.version}: tag {FILES_TAG} is not a JSON object")
    return value


def get_version(client, spec: str):
    """The model version a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI names. An alias
    is looked up in NAME, then in NAME-candidates, as `medmoco review` does (`register` gives the
    alias ``candidate`` in the candidates: ``models:/rsna-ich-moco@candidate`` finds it).

    Raises:
        ConfigError: naming the URI and where it was looked for.
    """
    from .access import is_permission_denied
    from .names import candidates_name

    body = spec[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        for model in dict.fromkeys((name, candidates_name(name))):
            try:
                return client.get_model_version_by_alias(model, alias)
            except Exception as err:
                if is_permission_denied(err):
                    raise
        raise ConfigError(f"model {spec}: neither {name!r} nor {candidates_name(name)!r} has an alias {alias!r}")
    name, _, version = body.partition("/")
    try:
        return client.get_model_version(name, version)
    except Exception as err:
        if is_permission_denied(err):
            raise
        raise ConfigError(f"model {spec}: not found ({str(err)[:150]})") from None


def fetch_version(spec_or_version, tracking_uri: str = "", dst: str | None = None) -> FetchedVersion:
    """Download a registered version whole and check every file against its recorded digests.

    Args:
        spec_or_version: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or a ``ModelVersion``.
        dst: folder to download into (default: a new temporary folder).

    Raises:
        IntegrityError: a file differs from, or is missing in, or is added to the record.
        ConfigError: the version does not exist or cannot be downloaded.
    """
    import mlflow

    from medmoco.tracking import client as mlflow_client
    from medmoco.tracking import resolve_tracking_uri, tracking_uri_scope
    from medmoco.tracking.store import quiet_defaults

    quiet_defaults()
    uri = resolve_tracking_uri(tracking_uri)
    version = spec_or_version
    if isinstance(spec_or_version, str):
        version = get_version(mlflow_client(uri), spec_or_version)
    what = f"models:/{version.name}/{version.version}"
    recorded = recorded_digests(version)
    dst = dst or tempfile.mkdtemp(prefix="medmoco-model-")
    try:
        with tracking_uri_scope(uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=what, dst_path=dst, tracking_uri=uri,
                                                       registry_uri=uri)
    except Exception as err:
        raise ConfigError(f"cannot fetch {what} from MLflow at {uri} ({str(err)[:200]})") from None
    if recorded is None:
        print(f"WARNING: {what} has no recorded sha256 list ({FILES_TAG}): it was made outside medmoco or by an "
              "older medmoco; its files are not verified", file=sys.stderr)
        return FetchedVersion(version.name, str(version.version), local, file_digests(local), False)
    verify_files(local, recorded, what)
    return FetchedVersion(version.name, str(version.version), local, recorded, True)
