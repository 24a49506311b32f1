"""Releases: a candidate promoted into ``<name>`` under the non-inferiority rule, each with a
record chained to the previous one (checked by :mod:`.history`).

A promotion, by a release manager:

1. checks, before any work, that the user may write ``<name>`` (a reviewer or trainer is told
   that promoting needs the release-manager role) and reads the non-inferiority margin from the
   admin's policy (:mod:`.policy`); another ``--margin`` makes the promotion forced, with a reason;
2. downloads the candidate (and the alias holder) and checks every file against the digests
   pinned at registration (:mod:`.integrity`);
3. compares the two on the same images (:mod:`.review`) and, for a non-inferior candidate,
4. uploads *those same bytes* to a new run of ``medmoco-releases`` with the comparison's evidence,
   registers them as a version of ``<name>`` (its source is that run: nothing a trainer may write)
   and writes the promotion record ``promotion.json`` there, then finishes the run. The
   ``medmoco-auth`` server app (:mod:`.auth_app`) seals a finished run of ``medmoco-releases``:
   nobody but an admin changes its files again.

Each promotion record carries the sha256 of the previous record of the same registered model, of
the released files and of the evidence (``comparison.json`` and both prediction files), and its own
digest is a tag of the released version. :func:`.history.verify_history` walks the whole chain: a changed
or removed record, a changed file, evidence or tag, and a version released without a record (the
plain API, the MLflow UI) are each named. MLflow's ``copy_model_version`` is not used: it copies no
bytes (the copy's source is the candidate's files, in an experiment every trainer may write).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile

from dicom_preprocess.config import ConfigError

from .access import PermissionRefused, explain_denied, is_permission_denied
from .integrity import DOWNLOAD_ONLY, FILES_TAG, fetch_version, sha256_file, sha256_json
from .history import RECORD_FILE, RECORD_TAG, RELEASE_RUN_TAG, _read_record, release_records
from .names import RELEASES_EXPERIMENT, candidates_name, current_user, released_name
from .policy import DEFAULT_MARGIN, read_policy  # noqa: F401  (DEFAULT_MARGIN: the stage shows it)
from .review import _label, compare_versions, decision_split, resolve_version

EVIDENCE = ("comparison.json", "predictions_candidate.csv", "predictions_reference.csv",
            "predictions_candidate.parquet", "predictions_reference.parquet")
# Tags of a candidate that describe its comparisons, not the model: not carried into a release.
_NOT_CARRIED = ("last_comparison_run", "released_as", FILES_TAG)


class PromotionRefused(ConfigError):
    """The candidate is not non-inferior to the alias holder (exit 2)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def require_release_manager(client, released: str) -> None:
    """Refuse, before any work, a user who may not write ``released``.

    The probe is a write that changes nothing (the registered model's own description written back):
    MLflow's server answers it as it would answer the release, and MLflow has no call that tells a
    user's permission on a registered model to anyone but an admin.

    Raises:
        PermissionRefused: promoting needs the release-manager role.
    """
    try:
        model = client.get_registered_model(released)
        client.update_registered_model(released, description=model.description or "")
    except Exception as err:
        if not is_permission_denied(err):
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")):
                client.create_registered_model(released)
                return
            raise
        raise PermissionRefused(f"user {current_user()} may not promote to {released}: promoting needs the "
                                "release-manager role (an admin grants it with `medmoco registry roles "
                                "--release-managers USER`)") from None


def _releases_experiment(client, uri: str) -> str:
    found = client.get_experiment_by_name(RELEASES_EXPERIMENT)
    if found is not None:
        return found.experiment_id
    from medmoco.tracking.store import artifact_root

    return client.create_experiment(RELEASES_EXPERIMENT, artifact_location=artifact_root(uri, RELEASES_EXPERIMENT))


def promote(name: str, version: str, alias: str = "champion", cache_dir: str | None = None, split: str | None = None,
            margin: float | None = None, force: bool = False, reason: str = "", out: str | None = None,
            tracking_uri: str = "", cases: int = 8, replicates: int = 2000, level: float = 0.95, seed: int = 0,
            device: str = "cpu", min_groups: int | None = None) -> dict:
    """Release candidate ``version`` as ``<name>@alias`` when it is non-inferior to the holder.

    Args:
        split: the cache split the comparison decides on; None: ``release`` when the cache has one,
            else ``test`` with a warning (:func:`.review.decision_split`).
        margin: None takes the policy's margin; another value makes the promotion forced (it needs
            ``force`` and ``reason``, and is recorded as such).

    Returns:
        ``{"message", "comparison" (or None), "released_version", "release_run"}``.

    Raises:
        PromotionRefused: with the table and the reason, when not non-inferior and not forced.
        PermissionRefused: when the user may not release (checked before anything is computed).
        IntegrityError: a file of either version differs from its recorded digest.
        ConfigError: --force without --reason, no cache, unknown versions.
    """
    from medmoco.tracking import client as mlflow_client
    from medmoco.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    released, candidates = released_name(name), candidates_name(name)
    client = mlflow_client(uri)
    with explain_denied("read", f"registered model {candidates}", "READ", "ask an admin for a role"):
        target = resolve_version(client, name, version)
    if target.name != candidates:
        raise ConfigError(f"--promote {version}: {_label(target)} is not a candidate; promote a version of {candidates}")
    require_release_manager(client, released)
    policy = read_policy(client, released)
    margin = policy.margin if margin is None else float(margin)
    forced_why = []
    if margin != policy.margin:
        forced_why.append(f"margin {margin:g} instead of the policy's {policy.margin:g} ({policy.source})")
    if (force or forced_why) and not reason:
        raise ConfigError(("--margin " + f"{margin:g} differs from the policy margin {policy.margin:g} of {released} "
                           f"({policy.source}): such a promotion is forced and needs --force --reason TEXT")
                          if forced_why else "--force needs --reason (it is recorded on the released version)")
    if forced_why and not force:
        raise ConfigError(f"--margin {margin:g} differs from the policy margin {policy.margin:g} of {released}: "
                          "add --force (with --reason) to promote under another margin")
    try:
        current = client.get_model_version_by_alias(released, alias)
    except Exception as err:
        if is_permission_denied(err):
            raise
        current = None
    if current is not None and current.tags.get("source_candidate_version") == str(target.version) and \
            current.tags.get("source_registered_model", candidates) == candidates:
        return {"message": f"{released}@{alias} is already candidate {target.version} ({_label(current)})",
                "comparison": None, "released_version": int(current.version), "release_run": None}
    if current is not None and not cache_dir:
        raise ConfigError(f"--promote needs --cache DIR: candidate {target.version} is compared with {alias} "
                          f"({_label(current)}) on its release (else test) split before it is released")
    if current is not None:
        from dicom_preprocess import open_cache

        try:
            split, warning = decision_split(open_cache(cache_dir), split)
        except FileNotFoundError as err:
            raise ConfigError(f"cache: {err}") from None
        if warning:
            print(warning, file=sys.stderr)
    work = tempfile.mkdtemp(prefix="medmoco-release-")
    try:
        return _release(client, uri, name, target, current, alias, cache_dir, split, margin, policy, force,
                        forced_why, reason, out, work, dict(cases=cases, replicates=replicates, level=level,
                                                            seed=seed, device=device, min_groups=min_groups))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _release(client, uri, name, target, current, alias, cache_dir, split, margin, policy, force, forced_why, reason,
             out, work, compare_settings) -> dict:
    from medmoco.comparison import markdown

    released, candidates = released_name(name), candidates_name(name)
    fetched = {"candidate": fetch_version(target, uri, os.path.join(work, "candidate"))}
    with explain_denied("write", f"experiment {RELEASES_EXPERIMENT}", "EDIT", "ask an admin for the release-manager role"):
        experiment = _releases_experiment(client, uri)
        run = client.create_run(experiment, run_name=f"{released} <- {_label(target)}",
                                tags={"stage": "release", "medmoco.registered_model": released,
                                      "medmoco.candidate": f"{candidates}/{target.version}", "medmoco.alias": alias})
    run_id = run.info.run_id
    comparison, decision = None, "no previous holder: nothing to compare with"
    try:
        if current is not None:
            fetched["reference"] = fetch_version(current, uri, os.path.join(work, "reference"))
            out = out or os.path.join("review", f"{released}-candidate{target.version}-vs-v{current.version}")
            comparison = compare_versions(name, target.version, alias, out, cache_dir, split, tracking_uri=uri,
                                          margin=margin, fetched=fetched, log=False, **compare_settings)
            comparison["run_id"] = run_id
            decision = comparison["decision"]
            client.log_artifacts(run_id, out, "comparison")
            client.set_tag(run_id, "medmoco.split_fingerprint", comparison.get("split_fingerprint", ""))
            client.set_tag(run_id, "medmoco.split", comparison.get("split", ""))
            if not comparison["non_inferior"] and not force:
                client.set_tag(run_id, "medmoco.decision", "refused")
                client.set_terminated(run_id, "FINISHED")
                raise PromotionRefused(f"{markdown(comparison)}\ncandidate {target.version} is not promoted to {alias}: "
                                       f"{decision} (release run {run_id}, {out}); use --force --reason TEXT to "
                                       "override")
        files = fetched["candidate"]
        for extra in DOWNLOAD_ONLY:
            if os.path.exists(os.path.join(files.directory, extra)):
                os.remove(os.path.join(files.directory, extra))
        client.log_artifacts(run_id, files.directory, "model")  # the bytes that were compared
        tags = {k: v for k, v in (target.tags or {}).items() if k not in _NOT_CARRIED}
        tags[FILES_TAG] = json.dumps(files.digests, sort_keys=True)
        with explain_denied("write", f"registered model {released}", "EDIT", "ask a release manager"):
            copy = client.create_model_version(released, f"{run.info.artifact_uri}/model", run_id=run_id, tags=tags,
                                               description=target.description)
        forced = bool(forced_why) or bool(force and comparison and not comparison["non_inferior"])
        record = _record(client, work, released, copy, target, current, alias, files.digests, comparison, out,
                         margin, policy, decision, forced, forced_why, reason)
        path = os.path.join(work, RECORD_FILE)
        with open(path, "w") as handle:
            json.dump(record, handle, indent=1, sort_keys=True)
        client.log_artifact(run_id, path)
        client.set_tag(run_id, "medmoco.decision", "released")
        client.set_tag(run_id, "medmoco.released_version", str(copy.version))
        client.set_terminated(run_id, "FINISHED")  # sealed from here on (medmoco-auth)
    except BaseException:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED")
        except Exception:
            pass
        raise
    audit = {"promoted_by": record["promoted_by"], "promoted_at": record["promoted_at"], "promoted_to": alias,
             "source_registered_model": candidates, "source_candidate_version": str(target.version),
             "comparison_run": run_id if comparison else "none: no previous holder", "margin": f"{margin:g}",
             "decision": decision, "replaced_version": str(current.version) if current is not None else "",
             RELEASE_RUN_TAG: run_id, RECORD_TAG: sha256_file(path)}
    if comparison:
        audit["delta_auc_mean"] = f"{comparison['mean']['delta']:+.6f}"
        audit["delta_ci"] = json.dumps(comparison["mean"]["delta_ci"])
    if forced:
        audit["force_reason"] = "; ".join(forced_why + [reason])
    with explain_denied("write", f"registered model {released}", "EDIT", "ask a release manager"):
        for key, value in audit.items():
            client.set_model_version_tag(released, copy.version, key, str(value))
        client.set_registered_model_alias(released, alias, copy.version)
    try:  # a note on the candidate for whoever reads it there
        client.set_model_version_tag(candidates, target.version, "released_as", f"{released} v{copy.version}")
    except Exception as err:
        if not is_permission_denied(err):
            raise
    verdict = "FORCED: " + audit["force_reason"] if forced else ("non-inferior" if comparison else "first holder")
    delta = (f"; mean AUC delta {comparison['mean']['delta']:+.4f} CI {comparison['mean']['delta_ci']}, release "
             f"run {run_id}" if comparison else "")
    return {"message": f"{released}@{alias} -> {released} v{copy.version} (candidate {target.version}; {verdict}"
                       f"{delta}; promoted by {audit['promoted_by']})",
            "comparison": comparison, "released_version": int(copy.version), "release_run": run_id}


def _record(client, work, released, copy, target, current, alias, digests, comparison, out, margin, policy, decision,
            forced, forced_why, reason) -> dict:
    """The promotion record, chained to the previous one of ``released``."""
    previous = None
    records = release_records(client, released)
    if records:
        last = records[-1]
        prior, digest = _read_record(client, last.info.run_id, os.path.join(work, "previous"))
        previous = {"run_id": last.info.run_id, "sha256": digest, "sequence": prior["sequence"]}
    evidence = None
    if comparison:
        evidence = {f"comparison/{f}": sha256_file(os.path.join(out, f)) for f in EVIDENCE}
    return {"format": 1, "sequence": (previous["sequence"] + 1) if previous else 1, "previous": previous,
            "registered_model": released, "version": str(copy.version), "alias": alias, "source": copy.source,
            "candidate": {"registered_model": target.name, "version": str(target.version),
                          "files_sha256": sha256_json(digests)},
            "files_sha256": digests, "evidence": evidence,
            "replaced_version": str(current.version) if current is not None else None,
            "split_fingerprint": (comparison or {}).get("split_fingerprint"),
            "split": (comparison or {}).get("split"), "method": (comparison or {}).get("method"),
            "delta_auc_mean": comparison["mean"]["delta"] if comparison else None,
            "delta_ci": comparison["mean"]["delta_ci"] if comparison else None,
            "margin": margin, "policy_margin": policy.margin, "policy_source": policy.source,
            "decision": decision, "forced": forced, "forced_because": forced_why, "reason": reason if forced else "",
            "promoted_by": current_user(), "promoted_at": _now()}


def plan_margin(name: str, cache_dir: str, margin: float | None = None, alias: str = "champion",
                split: str | None = None, tracking_uri: str = "", seed: int = 0, min_groups: int | None = None,
                n_sim: int = 100) -> dict:
    """`medmoco review --plan`: how often a candidate as good as ``<name>@alias`` would pass the
    non-inferiority rule at ``margin`` (the policy's when None) on the split a promotion decides on,
    simulated from that split's patients and the reference's own predictions (:func:`medmoco.margin.margin_plan`).

    Raises:
        ConfigError: no cache, no alias holder, or a cache that cannot serve it.
    """
    from dicom_preprocess import open_cache
    from medmoco.engines.supervised import predict_rows
    from medmoco.margin import margin_plan
    from medmoco.models import load_classifier
    from medmoco.tracking import client as mlflow_client
    from medmoco.tracking import resolve_tracking_uri

    if not cache_dir:
        raise ConfigError("--plan needs --cache DIR (the cache whose release, else test, split promotions decide on)")
    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow_client(uri)
    released = released_name(name)
    try:
        holder = client.get_model_version_by_alias(released, alias)
    except Exception as err:
        if is_permission_denied(err):
            raise
        raise ConfigError(f"--plan: {released} has no {alias!r} yet: nothing to plan against") from None
    if margin is None:
        margin = read_policy(client, released).margin
    try:
        cache = open_cache(cache_dir)
    except FileNotFoundError as err:
        raise ConfigError(f"cache: {err}") from None
    split, warning = decision_split(cache, split)
    if warning:
        print(warning, file=sys.stderr)
    model, info = load_classifier(fetch_version(holder, uri).model_file)
    rows = cache.indices(split, labeled=True)
    probs = predict_rows(model, cache, rows, info["context"], info["image_size"], "cpu")
    plan = margin_plan(probs, cache.labels(rows), cache.groups(rows), margin, n_sim=n_sim, seed=seed,
                       **({} if min_groups is None else {"min_groups": min_groups}))
    return {**plan, "split": split, "reference": _label(holder)}
