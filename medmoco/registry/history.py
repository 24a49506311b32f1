"""The release history of a registered model, and its check.

Each promotion's record (``promotion.json`` in its run of ``medmoco-releases``, :mod:`.release`)
carries the sha256 of the previous record of the same registered model: :func:`verify_history`
walks that chain against the registry and the files, and names the first record or version that
does not verify. A finished release run is sealed by the ``medmoco-auth`` server app, so earlier
records cannot be rewritten through MLflow; this check also catches what was changed around it
(the storage, the tags) and what was released outside medmoco.
"""
from __future__ import annotations

import json
import os
import tempfile

from .access import PermissionRefused, explain_denied, is_permission_denied
from .integrity import FILES_TAG, fetch_version, sha256_file
from .names import RELEASES_EXPERIMENT, current_user, released_name

RECORD_FILE = "promotion.json"
RECORD_TAG = "medmoco.record_sha256"  # on the released version: the digest of its promotion record
RELEASE_RUN_TAG = "medmoco.release_run"


def release_records(client, released: str) -> list:
    """The finished release runs of ``released`` (oldest first)."""
    found = client.get_experiment_by_name(RELEASES_EXPERIMENT)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id],
                              f"tags.`medmoco.registered_model` = '{released}' and tags.`medmoco.decision` = 'released'",
                              max_results=10000, order_by=["attributes.start_time ASC"])
    return [r for r in runs if r.info.status == "FINISHED"]


def _read_record(client, run_id: str, work: str) -> tuple[dict, str]:
    path = client.download_artifacts(run_id, RECORD_FILE, work)
    with open(path, "rb") as handle:
        data = handle.read()
    return json.loads(data), sha256_file(path)


def verify_history(name: str, tracking_uri: str = "") -> list[str]:
    """Check the chain of promotion records of ``<name>`` against the registry and the files.

    Returns:
        the problems, in release order (empty: the history verifies). The first names the first
        record or version that does not verify.
    """
    from medmoco.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    released = released_name(name)
    with explain_denied("read", f"experiment {RELEASES_EXPERIMENT} and registered model {released}", "READ",
                        "ask an admin for a role"):
        try:
            versions = {str(v.version): v for v in client.search_model_versions(f"name='{released}'")}
            aliases = dict(client.get_registered_model(released).aliases or {})
        except Exception as err:
            if is_permission_denied(err):
                raise
            versions, aliases = {}, {}
        holders = {}  # alias -> the version the newest record gave it
        problems, covered = [], set()
        previous_sha, previous_seq = None, 0
        with tempfile.TemporaryDirectory(prefix="medmoco-history-") as work:
            for run in release_records(client, released):
                run_id = run.info.run_id
                try:
                    record, digest = _read_record(client, run_id, os.path.join(work, run_id))
                except Exception as err:
                    problems.append(f"release run {run_id}: its {RECORD_FILE} cannot be read ({str(err)[:120]})")
                    continue
                label = f"record {record.get('sequence')} ({released} v{record.get('version')}, release run {run_id})"
                link = (record.get("previous") or {}).get("sha256")
                if record.get("sequence") != previous_seq + 1 or link != previous_sha:
                    problems.append(f"{label}: does not follow the previous record (a record was changed, removed "
                                    "or inserted)")
                previous_sha, previous_seq = digest, record.get("sequence", previous_seq + 1)
                version = versions.get(str(record.get("version")))
                if version is None:
                    problems.append(f"{label}: the version it released is gone")
                    continue
                covered.add(str(version.version))
                holders[record.get("alias", "")] = str(version.version)
                problems += _check_release(client, version, record, digest, label, run_id, work, tracking_uri)
    for alias, number in sorted(aliases.items()):
        if holders.get(alias) != str(number):
            given = f"the last promotion record gives it to v{holders[alias]}" if alias in holders else \
                "no promotion record gives it"
            problems.append(f"{released}@{alias} is v{number}, but {given}: the alias was moved outside medmoco")
    for number in sorted(set(versions) - covered, key=int):
        tags = versions[number].tags
        made = " (its promotion tags were written by hand)" if "promoted_by" in tags else ""
        problems.append(f"{released} v{number}: released outside medmoco, no promotion record{made}")
    return problems


def _check_release(client, version, record: dict, digest: str, label: str, run_id: str, work: str,
                   tracking_uri: str) -> list[str]:
    from .integrity import IntegrityError

    problems = []
    tags = version.tags or {}
    if tags.get(RECORD_TAG) != digest or tags.get(RELEASE_RUN_TAG) != run_id:
        problems.append(f"{label}: the version's tags {RECORD_TAG}/{RELEASE_RUN_TAG} do not name this record")
    if version.source != record.get("source"):
        problems.append(f"{label}: the version's source {version.source} is not the released files {record.get('source')}")
    if json.loads(tags.get(FILES_TAG, "null") or "null") != record.get("files_sha256"):
        problems.append(f"{label}: the version's {FILES_TAG} differs from the record")
    for path, expected in (record.get("evidence") or {}).items():
        try:
            local = client.download_artifacts(run_id, path, os.path.join(work, run_id, "evidence"))
            found = sha256_file(local)
        except Exception:
            found = "missing"
        if found != expected:
            problems.append(f"{label}: evidence {path} differs from the record")
    try:
        fetch_version(version, tracking_uri, os.path.join(work, run_id, "files"))
    except IntegrityError as err:
        problems.append(f"{label}: {err}")
    return problems


def decisions_by_split(name: str, tracking_uri: str = "") -> dict:
    """How many promotion decisions (released or refused after a comparison) each split has made,
    by split fingerprint: ``{fingerprint: {"split", "released", "refused"}}``. Every decision read on a
    split spends it a little: a lab that has decided many releases on one test split should say so."""
    from medmoco.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(RELEASES_EXPERIMENT)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], f"tags.`medmoco.registered_model` = '{released_name(name)}'",
                              max_results=10000)
    out: dict = {}
    for run in runs:
        tags = run.data.tags
        fingerprint = tags.get("medmoco.split_fingerprint")
        decision = tags.get("medmoco.decision")
        if not fingerprint or decision not in ("released", "refused"):
            continue  # a first holder (no comparison) decides on no split
        entry = out.setdefault(fingerprint, {"split": tags.get("medmoco.split", "?"), "released": 0, "refused": 0})
        entry[decision] += 1
    return out


def release_history(name: str, tracking_uri: str = "", alias: str = "champion") -> tuple[list[dict], list[str]]:
    """The released versions (version, source candidate, promoted by, when, mean-AUC delta with its
    interval, release run) and the history's problems (:func:`verify_history`)."""
    from medmoco.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    released = released_name(name)
    try:
        model = client.get_registered_model(released)
    except Exception as err:
        if is_permission_denied(err):
            raise PermissionRefused(f"user {current_user()} may not read registered model {released} "
                                    "(needs READ; ask an admin for a role)") from None
        return [], []
    holders = {str(v): a for a, v in (model.aliases or {}).items()}
    rows = []
    for v in sorted(client.search_model_versions(f"name='{released}'"), key=lambda v: int(v.version)):
        t = v.tags
        ci = json.loads(t["delta_ci"]) if t.get("delta_ci", "null") not in ("", "null") else None
        delta = t.get("delta_auc_mean", "")
        rows.append({"released": int(v.version), "aliases": holders.get(str(v.version), ""),
                     "source candidate": t.get("source_candidate_version", "?"),
                     "promoted by": t.get("promoted_by", "?"), "when": t.get("promoted_at", "?"),
                     "delta mean AUC [CI]": f"{float(delta):+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if delta and ci
                     else ("first holder" if t.get("comparison_run", "").startswith("none") else "?"),
                     "forced": t.get("force_reason", ""), "release run": t.get(RELEASE_RUN_TAG, "")[:8]})
    return rows, verify_history(name, tracking_uri)


def version_provenance(spec: str, tracking_uri: str = "") -> dict:
    """What the registry records of one ``models:/`` version, for whoever ships it (a MONAI bundle).

    An alias is pinned to its version first (``model_uri``: ``models:/NAME/VERSION``), so that the
    record and the files fetched afterwards from ``model_uri`` are of one version even if the alias
    moves meanwhile. A released version's promotion record (``promotion.json`` of its release run)
    is read and checked against the digest the version's tag holds and against its file digests.

    Returns:
        ``{"model_uri", "requested_uri", "registered_model", "version", "aliases", "source",
        "run_id", "files_sha256" (None: made outside medmoco, unverified), "tags" (without the
        digests), "promotion" (the record, None for a version that was not released through
        medmoco), "promotion_sha256"}``.

    Raises:
        IntegrityError: the promotion record differs from its digest on the version, or lists
            other files than the version's.
        ConfigError: the version does not exist.
    """
    from medmoco.tracking import client as mlflow_client

    from .integrity import IntegrityError, get_version, recorded_digests

    client = mlflow_client(tracking_uri)
    with explain_denied("read", f"model {spec}", "READ", "ask an admin for a role"):
        version = get_version(client, spec)
        pinned = f"models:/{version.name}/{version.version}"
        tags = dict(version.tags or {})
        digests = recorded_digests(version)
        record, record_sha = None, None
        run_id = tags.get(RELEASE_RUN_TAG)
        if run_id:
            with tempfile.TemporaryDirectory(prefix="medmoco-record-") as work:
                try:
                    record, record_sha = _read_record(client, run_id, work)
                except Exception as err:
                    if is_permission_denied(err):
                        raise
                    raise IntegrityError(f"{pinned}: its promotion record (release run {run_id}) cannot be read "
                                         f"({str(err)[:150]})") from None
    if run_id and record_sha != tags.get(RECORD_TAG):
        raise IntegrityError(f"{pinned}: its promotion record (release run {run_id}) has sha256 {record_sha[:12]}..., "
                             f"the version's tag {RECORD_TAG} says {str(tags.get(RECORD_TAG))[:12]}... (changed after "
                             "the release); refusing to use it")
    if record is not None and record.get("files_sha256") != digests:
        raise IntegrityError(f"{pinned}: the files its promotion record lists differ from the version's {FILES_TAG}; "
                             "refusing to use it")
    return {"model_uri": pinned, "requested_uri": spec, "registered_model": version.name,
            "version": str(version.version), "aliases": sorted(getattr(version, "aliases", None) or []),
            "source": version.source, "run_id": version.run_id, "files_sha256": digests,
            "tags": {k: v for k, v in sorted(tags.items()) if k != FILES_TAG},
            "promotion": record, "promotion_sha256": record_sha}
