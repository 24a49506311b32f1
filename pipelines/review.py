"""Stage `medmoco review`: the registry as the review desk.

    medmoco review --name NAME                                     # candidates, and the release history
    medmoco review --compare 3 [--against champion] --cache DIR --out DIR [--split test] [--cases 8]
    medmoco review --compare 3 --input DICOM_FOLDER_OR_ARCHIVE --labels CSV --out DIR
    medmoco review --promote 3 --alias champion --cache DIR [--margin 0.005] [--force --reason TEXT]

Candidates are versions of ``<name>-candidates`` (`medmoco register`); released versions live in
``<name>``, where users load ``models:/<name>@champion`` (:mod:`medmoco.tracking.access`). A version
number names a candidate; an alias (``champion``) is looked up in ``<name>``, then in the candidates.

A comparison scores both models on the same images (:mod:`medmoco.comparison`): per-class AUC
differences with a paired patient-bootstrap interval and DeLong's p, the predictions of each
model, the table a reviewer reads, and montages of the cases to look at (:mod:`medmoco.cases`).
It is logged as one MLflow run in the experiment ``medmoco-review``, and both versions get a
``last_comparison_run`` tag. A promotion runs that comparison against the version holding the
alias on the cache's test split and, for a non-inferior candidate, copies it into ``<name>``
(``MlflowClient.copy_model_version``) and moves the alias there, recording who, when, on which
comparison and margin as tags of the released version.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile

from dicom_preprocess.config import ConfigError

from medmoco.tracking.access import (REVIEW_EXPERIMENT, PermissionRefused, candidates_name, current_user,  # noqa: F401
                                     explain_denied, is_permission_denied, released_name)

from .register import MODEL_NAME

DEFAULT_MARGIN = 0.005
RELEASE_ADVICE = "ask a release manager"


def add_review_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=MODEL_NAME, help="registered model")
    parser.add_argument("--compare", metavar="CANDIDATE", help="version number or alias to compare")
    parser.add_argument("--against", default="champion", metavar="REFERENCE", help="version or alias (champion)")
    parser.add_argument("--promote", metavar="VERSION", help="version to give --alias, after a comparison")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--cache", help="cache whose --split both models predict")
    parser.add_argument("--split", default="test")
    parser.add_argument("--input", help="raw DICOM folder or archive: each model's own preprocessing on it")
    parser.add_argument("--labels", help="RSNA long-format CSV for --input")
    parser.add_argument("--out", help="folder for comparison.json/.md, predictions and cases/")
    parser.add_argument("--cases", type=int, default=8, help="tiles per montage (0: no montages)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="non-inferiority margin in mean AUC")
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="promote even if not non-inferior (needs --reason)")
    parser.add_argument("--reason", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default="")


# --- versions and their models -----------------------------------------------------------------

def resolve_version(client, name: str, spec: str):
    """A model version from a version number (a candidate) or an alias (of ``<name>``, else of
    ``<name>-candidates``).

    Raises:
        ConfigError: naming the registered models and what was asked for.
    """
    spec = str(spec)
    candidates, released = candidates_name(name), released_name(name)
    if spec.isdigit():
        try:
            return client.get_model_version(candidates, spec)
        except Exception as err:
            if is_permission_denied(err):
                raise
            raise ConfigError(f"registered model {candidates!r} has no version {spec}") from None
    for model in (released, candidates):
        try:
            return client.get_model_version_by_alias(model, spec)
        except Exception as err:
            if is_permission_denied(err):
                raise
    raise ConfigError(f"neither {released!r} nor {candidates!r} has an alias {spec!r}")


def _label(version) -> str:
    """How a version is named in messages: ``rsna-ich-moco-candidates v3``."""
    return f"{version.name} v{version.version}"


def version_model_file(version, uri: str) -> str:
    """The classifier file (``model.pt``) a registered version was logged with (a released version
    is a copy: its source is the candidate's)."""
    from medmoco.tracking import fetch_artifact

    try:
        return fetch_artifact(f"models:/{version.name}/{version.version}", "model.pt", "", uri)
    except LookupError as err:
        raise ConfigError(f"{_label(version)}: {err}") from None


def _describe(info: dict) -> str:
    pre = info["preprocess"]
    windows = ", ".join(f"{w['name']} {w['center']:g}/{w['width']:g}" for w in pre["windows"])
    return f"windows {windows} ({pre.get('window_mode', 'linear')}), input {info['image_size']} px"


def cache_problems(metadata: dict, info: dict) -> list[str]:
    """Why a cache cannot serve a model as it was trained (empty when it can)."""
    pre = info["preprocess"]
    problems = []
    cached = [(w["name"], float(w["center"]), float(w["width"])) for w in metadata["windows"]]
    wanted = [(w["name"], float(w["center"]), float(w["width"])) for w in pre["windows"]]
    if cached != wanted:
        problems.append("other windows")
    if metadata.get("window_mode", "linear") != pre.get("window_mode", "linear"):
        problems.append("another window mode")
    if int(metadata["size"]) < int(info["image_size"]):
        problems.append(f"cached size {metadata['size']} px is smaller than the input size {info['image_size']} px")
    return problems


# --- the comparison ------------------------------------------------------------------------------

def _predict_cache_split(model_path: str, cache, split: str, device: str):
    from medmoco.engines.supervised import predict_rows
    from medmoco.models import load_classifier

    model, info = load_classifier(model_path)
    rows = cache.indices(split, labeled=True)
    probs = predict_rows(model.to(device), cache, rows, info["context"], info["image_size"], device)
    return model, info, rows, probs


def _predictions_on_the_same_dicoms(paths: dict, input_path: str, labels_csv: str, work: str, device: str):
    """Each model's own recorded preprocessing on the same raw DICOMs; the images both caches hold
    and the labels name. Returns (cache of the candidate, its rows, labels, {side: probs}, patients)."""
    import numpy as np

    from dicom_preprocess import SUBTYPES, open_cache
    from dicom_preprocess.labels import read_rsna_labels
    from medmoco.engines.supervised import predict_rows
    from medmoco.models import load_classifier

    from .evaluate import preprocess_like_model

    table, _ = read_rsna_labels(labels_csv)
    per_side = {}
    for side, path in paths.items():
        model, info = load_classifier(path)
        preprocess_like_model(info, input_path, os.path.join(work, side), workers=1)
        cache = open_cache(os.path.join(work, side))
        rows = cache.indices()
        probs = predict_rows(model.to(device), cache, rows, info["context"], info["image_size"], device)
        per_side[side] = (cache, dict(zip(cache.manifest["image_id"].to_numpy()[rows], range(len(rows)))), probs, rows)
    cache, positions, _, rows = per_side["candidate"]
    common = [i for i in cache.manifest["image_id"].to_numpy()[rows]
              if i in per_side["reference"][1] and i in table.index]
    if not common:
        raise ConfigError(f"--input {input_path}: no image is read by both models' preprocessing and labeled in "
                          f"{labels_csv}")
    probs = {side: np.stack([per_side[side][2][per_side[side][1][i]] for i in common]) for side in per_side}
    chosen = np.array([rows[positions[i]] for i in common])
    labels = table.loc[common, list(SUBTYPES)].to_numpy(np.float32)
    return cache, chosen, labels, probs, cache.groups(chosen)


def compare_versions(name: str, candidate: str, reference: str, out: str, cache_dir: str | None = None,
                     split: str = "test", input_path: str | None = None, labels_csv: str | None = None,
                     cases: int = 8, replicates: int = 2000, level: float = 0.95, seed: int = 0,
                     device: str = "cpu", tracking_uri: str = "", margin: float | None = None) -> dict:
    """Score two registered versions on the same images and write the comparison to ``out``.

    Raises:
        ConfigError: unknown versions, a cache that cannot serve both models (naming both
            settings), or no images in common.
    """
    from dicom_preprocess import open_cache
    from medmoco.cases import write_cases
    from medmoco.comparison import compare_predictions, markdown, non_inferior
    from medmoco.config import BootstrapConfig
    from medmoco.tracking import client as mlflow_client
    from medmoco.tracking import resolve_tracking_uri

    from .evaluate import write_submission

    BootstrapConfig(replicates, level, seed)
    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow_client(uri)
    with explain_denied("read", f"registered model {released_name(name)} or {candidates_name(name)}", "READ",
                        "ask an admin for the reviewer role"):
        versions = {"candidate": resolve_version(client, name, candidate),
                    "reference": resolve_version(client, name, reference)}
        if (versions["candidate"].name, versions["candidate"].version) == \
                (versions["reference"].name, versions["reference"].version):
            raise ConfigError(f"--compare {candidate} and --against {reference} are the same version "
                              f"({_label(versions['candidate'])})")
        paths = {side: version_model_file(v, uri) for side, v in versions.items()}
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medmoco-review-") as work:
        if input_path:
            if not labels_csv:
                raise ConfigError("--input needs --labels (an RSNA long-format CSV of the same images)")
            cache, rows, labels, probs, patients = _predictions_on_the_same_dicoms(paths, input_path, labels_csv, work,
                                                                                   device)
            from medmoco.models import load_classifier

            model, info = load_classifier(paths["candidate"])
            source = {"input": os.path.abspath(input_path), "labels": os.path.abspath(labels_csv)}
        else:
            if not cache_dir:
                raise ConfigError("give --cache DIR (both models predict its --split) or --input DICOMS --labels CSV")
            try:
                cache = open_cache(cache_dir)
            except FileNotFoundError as err:
                raise ConfigError(f"cache: {err}") from None
            if split not in set(cache.manifest["split"]):
                raise ConfigError(f"cache {cache_dir} has no split {split!r} (has {sorted(set(cache.manifest['split']))})")
            from medmoco.models.export import read_weights

            infos = {side: read_weights(path) for side, path in paths.items()}
            refused = {side: cache_problems(cache.metadata, info) for side, info in infos.items()}
            if any(refused.values()):
                cache_desc = _describe({"preprocess": cache.metadata, "image_size": cache.metadata["size"]})
                parts = [f"{side} {_label(versions[side])} ({_describe(infos[side])}): {'; '.join(p)}"
                         for side, p in refused.items() if p]
                raise ConfigError(f"cache {cache_dir} ({cache_desc.replace('input', 'cached at')}) cannot serve "
                                  f"both models as they were trained: {' / '.join(parts)}. Compare on raw DICOMs "
                                  "instead: --input DICOM_FOLDER_OR_ARCHIVE --labels CSV")
            model, info, rows, cand_probs = _predict_cache_split(paths["candidate"], cache, split, device)
            _, _, _, ref_probs = _predict_cache_split(paths["reference"], cache, split, device)
            probs = {"candidate": cand_probs, "reference": ref_probs}
            labels = cache.labels(rows)
            patients = cache.groups(rows)
            source = {"cache": os.path.abspath(cache_dir), "cache_fingerprint": cache.fingerprint,
                      "split_fingerprint": cache.metadata.get("split_fingerprints", {}).get(split, "")}
        comparison = compare_predictions(labels, probs["candidate"], probs["reference"], patients, replicates, level,
                                         seed)
        comparison.update({
            side: {"version": int(v.version), "registered_model": v.name, "model_uri": f"models:/{v.name}/{v.version}"}
            for side, v in versions.items()})
        comparison.update({"split": split if not input_path else "input", **source})
        if margin is not None:
            ok, why = non_inferior(comparison, margin)
            comparison.update({"margin": margin, "non_inferior": ok, "decision": why})
        ids = cache.manifest["image_id"].to_numpy()[rows]
        write_submission(ids, probs["candidate"], os.path.join(out, "predictions_candidate.csv"))
        write_submission(ids, probs["reference"], os.path.join(out, "predictions_reference.csv"))
        write_cases(os.path.join(out, "cases"), model, info, cache, rows, labels, probs["candidate"],
                    probs["reference"], cases, device)
    with open(os.path.join(out, "comparison.json"), "w") as handle:
        json.dump(comparison, handle, indent=1)
    with open(os.path.join(out, "comparison.md"), "w") as handle:
        handle.write(markdown(comparison))
    comparison["run_id"] = _log_comparison(client, uri, name, versions, comparison, out)
    return comparison


def _log_comparison(client, uri: str, name: str, versions: dict, comparison: dict, out: str) -> str | None:
    """One MLflow run in ``medmoco-review``; both versions get ``last_comparison_run``."""
    from medmoco.tracking import MlflowTracker

    cand, ref = versions["candidate"], versions["reference"]
    with explain_denied("write", f"experiment {REVIEW_EXPERIMENT}", "EDIT",
                        "trainers and release managers log comparisons"):
        tracker = MlflowTracker(uri, REVIEW_EXPERIMENT, f"{_label(cand)} vs {_label(ref)}",
                                tags={"stage": "review", "registered_model": released_name(name)})
        tracker.log_params({"candidate_uri": comparison["candidate"]["model_uri"],
                            "reference_uri": comparison["reference"]["model_uri"], "split": comparison["split"],
                            "cache_fingerprint": comparison.get("cache_fingerprint", ""),
                            "split_fingerprint": comparison.get("split_fingerprint", ""),
                            "input": comparison.get("input", ""),
                            **{f"bootstrap_{k}": v for k, v in comparison["method"].items()}})
        mean = comparison["mean"]
        metrics = {"delta_auc_mean": mean["delta"], "auc_mean_candidate": mean["auc_candidate"],
                   "auc_mean_reference": mean["auc_reference"]}
        if mean["delta_ci"]:
            metrics["delta_auc_mean_ci_low"], metrics["delta_auc_mean_ci_high"] = mean["delta_ci"]
        for cls, c in comparison["classes"].items():
            metrics[f"delta_auc_{cls}"] = c["delta"]
            metrics[f"p_value_{cls}"] = c["p_value"]
        tracker.log_metrics({k: v for k, v in metrics.items() if v is not None}, 0)
        for entry in sorted(os.listdir(out)):
            tracker.log_artifact(os.path.join(out, entry), "comparison" if entry != "cases" else None)
        tracker.finish("FINISHED")
    for v in (cand, ref):
        with explain_denied("write", f"registered model {v.name}", "EDIT", RELEASE_ADVICE):
            client.set_model_version_tag(v.name, v.version, "last_comparison_run", tracker.run_id or "")
    return tracker.run_id


# --- promotion -------------------------------------------------------------------------------------

class PromotionRefused(ConfigError):
    """The candidate is not non-inferior to the alias holder (exit 2)."""


def promote(name: str, version: str, alias: str = "champion", cache_dir: str | None = None, split: str = "test",
            margin: float = DEFAULT_MARGIN, force: bool = False, reason: str = "", out: str | None = None,
            tracking_uri: str = "", cases: int = 8, replicates: int = 2000, level: float = 0.95, seed: int = 0,
            device: str = "cpu") -> dict:
    """Release candidate ``version`` as ``<name>@alias`` when it is non-inferior to the holder.

    The comparison runs on ``cache_dir``'s ``split``; with no holder the candidate is released
    without one. Releasing copies the candidate into ``<name>`` and moves the alias to the copy,
    whose tags record who promoted it, when, the candidate it came from, the comparison run, the
    margin and decision, and ``--force --reason`` when used.

    Returns:
        ``{"message", "comparison" (or None), "released_version"}``.

    Raises:
        PromotionRefused: with the table and the reason, when not non-inferior and not forced.
        PermissionRefused: when the server refuses the user (one line: who, what, which resource).
        ConfigError: --force without --reason, no cache, unknown versions.
    """
    from medmoco.tracking import client as mlflow_client

    released, candidates = released_name(name), candidates_name(name)
    client = mlflow_client(tracking_uri)
    with explain_denied("read", f"registered model {candidates}", "READ", "ask an admin for a role"):
        target = resolve_version(client, name, version)
    if target.name != candidates:
        raise ConfigError(f"--promote {version}: {_label(target)} is not a candidate; promote a version of {candidates}")
    if force and not reason:
        raise ConfigError("--force needs --reason (it is recorded on the released version)")
    try:
        current = client.get_model_version_by_alias(released, alias)
    except Exception as err:
        if is_permission_denied(err):
            raise PermissionRefused(f"user {current_user()} may not read registered model {released} "
                                    "(needs READ; ask an admin for a role)") from None
        current = None
    comparison, decision = None, "no previous holder: nothing to compare with"
    if current is not None:
        if current.tags.get("source_candidate_version") == str(target.version):
            return {"message": f"{released}@{alias} is already candidate {target.version} ({_label(current)})",
                    "comparison": None, "released_version": int(current.version)}
        if not cache_dir:
            raise ConfigError(f"--promote needs --cache DIR: candidate {target.version} is compared with {alias} "
                              f"({_label(current)}) on its {split} split before it is released")
        out = out or os.path.join("review", f"{released}-candidate{target.version}-vs-v{current.version}")
        from medmoco.comparison import markdown

        comparison = compare_versions(name, target.version, alias, out, cache_dir, split, cases=cases,
                                      replicates=replicates, level=level, seed=seed, device=device,
                                      tracking_uri=tracking_uri, margin=margin)
        decision = comparison["decision"]
        if not comparison["non_inferior"] and not force:
            raise PromotionRefused(f"{markdown(comparison)}\ncandidate {target.version} is not promoted to {alias}: "
                                   f"{decision} (comparison run {comparison['run_id']}, {out}); "
                                   "use --force --reason TEXT to override")
    audit = {"promoted_by": current_user(),
             "promoted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "promoted_to": alias, "source_registered_model": candidates, "source_candidate_version": str(target.version),
             "comparison_run": comparison["run_id"] if comparison else "none: no previous holder",
             "margin": f"{margin:g}", "decision": decision,
             "replaced_version": str(current.version) if current is not None else ""}
    if comparison:
        audit["delta_auc_mean"] = f"{comparison['mean']['delta']:+.6f}"
        audit["delta_ci"] = json.dumps(comparison["mean"]["delta_ci"])
    if force and comparison and not comparison["non_inferior"]:
        audit["force_reason"] = reason
    with explain_denied("write", f"registered model {released}", "EDIT", RELEASE_ADVICE):
        copy = client.copy_model_version(f"models:/{candidates}/{target.version}", released)
        for key, value in audit.items():
            client.set_model_version_tag(released, copy.version, key, str(value))
        client.set_registered_model_alias(released, alias, copy.version)
    try:  # a note on the candidate for whoever reads it there (release managers may only read candidates)
        client.set_model_version_tag(candidates, target.version, "released_as", f"{released} v{copy.version}")
    except Exception as err:
        if not is_permission_denied(err):
            raise
    verdict = "FORCED: " + reason if "force_reason" in audit else ("non-inferior" if comparison else "first holder")
    delta = (f"; mean AUC delta {comparison['mean']['delta']:+.4f} CI {comparison['mean']['delta_ci']}, comparison "
             f"run {comparison['run_id']}" if comparison else "")
    return {"message": f"{released}@{alias} -> {released} v{copy.version} (candidate {target.version}; {verdict}"
                       f"{delta}; promoted by {audit['promoted_by']})",
            "comparison": comparison, "released_version": int(copy.version)}


# --- the list ----------------------------------------------------------------------------------------

def versions_table(name: str, tracking_uri: str = "", alias: str = "champion") -> list[dict]:
    """The candidates: each one's test mean AUC with its interval and what it was measured on;
    those whose test split differs from the released ``alias``'s (else the newest candidate's) are
    marked not comparable."""
    from medmoco.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    candidates, released = candidates_name(name), released_name(name)
    with explain_denied("read", f"registered model {candidates}", "READ", "ask an admin for a role"):
        try:
            model = client.get_registered_model(candidates)
        except Exception as err:
            if is_permission_denied(err):
                raise
            raise ConfigError(f"registered model {candidates!r}: not found (register a fine-tuning run first)") from None
        versions = sorted(client.search_model_versions(f"name='{candidates}'"), key=lambda v: int(v.version))
    aliases: dict[str, list[str]] = {}
    for a, v in (model.aliases or {}).items():
        aliases.setdefault(str(v), []).append(a)
    try:
        anchor = client.get_model_version_by_alias(released, alias)
    except Exception:
        anchor = versions[-1] if versions else None
    anchor_split = anchor.tags.get("test_split_fingerprint", "") if anchor else ""
    anchor_name = _label(anchor) if anchor else ""
    rows = []
    for v in versions:
        t = v.tags
        split = t.get("test_split_fingerprint", "")
        low, high = _num(t.get("auc_mean_ci_low")), _num(t.get("auc_mean_ci_high"))
        auc = _num(t.get("auc_mean"))
        rows.append({"candidate": int(v.version), "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                     "mode": t.get("mode", ""), "fraction": t.get("label_fraction", ""),
                     "test AUC mean [95% CI]": f"{auc:.3f} [{low:.3f}, {high:.3f}]" if low == low else f"{auc:.3f}",
                     "test split": split[:8] or "?", "cache": t.get("cache_fingerprint", "")[:8],
                     "comparable": "yes" if split and split == anchor_split else f"no: other test split than {anchor_name}",
                     "released as": t.get("released_as", ""),
                     "date": datetime.datetime.fromtimestamp(v.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")})
    return rows


def release_history(name: str, tracking_uri: str = "", alias: str = "champion") -> tuple[list[dict], list[str]]:
    """The released versions (version, source candidate, promoted by, when, mean-AUC delta with its
    interval, comparison run) and warnings: a holder of ``alias`` with no promotion record was moved
    outside medmoco (the MLflow UI, a script)."""
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
    rows, warnings = [], []
    for v in sorted(client.search_model_versions(f"name='{released}'"), key=lambda v: int(v.version)):
        t = v.tags
        ci = json.loads(t["delta_ci"]) if t.get("delta_ci", "null") not in ("", "null") else None
        delta = t.get("delta_auc_mean", "")
        rows.append({"released": int(v.version), "aliases": holders.get(str(v.version), ""),
                     "source candidate": t.get("source_candidate_version", "?"),
                     "promoted by": t.get("promoted_by", "?"), "when": t.get("promoted_at", "?"),
                     "delta mean AUC [CI]": f"{float(delta):+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if delta and ci
                     else ("first holder" if t.get("comparison_run", "").startswith("none") else "?"),
                     "forced": t.get("force_reason", ""), "comparison run": "" if t.get("comparison_run", "").startswith("none")
                     else t.get("comparison_run", "")[:8]})
        if alias in holders.get(str(v.version), "").split(",") and "promoted_by" not in t:
            warnings.append(f"WARNING: {released}@{alias} is v{v.version}, which has no promotion record: the alias was "
                            "moved outside `medmoco review --promote` (no comparison, no margin, no recorded user)")
    return rows, warnings


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no versions)"
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(cols)]
    line = lambda items: "  ".join(s.ljust(w) for s, w in zip(items, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(row) for row in cells])


def run_review(args: argparse.Namespace) -> int:
    from medmoco.comparison import markdown

    if args.compare:
        if not args.out:
            raise ConfigError("--compare needs --out DIR")
        comparison = compare_versions(args.name, args.compare, args.against, args.out, args.cache, args.split,
                                      args.input, args.labels, args.cases, args.replicates, args.level, args.seed,
                                      args.device, args.tracking_uri)
        print(markdown(comparison))
        print(f"-> {args.out} (comparison.json, comparison.md, predictions_*.csv, cases/); MLflow run "
              f"{comparison['run_id']} in {REVIEW_EXPERIMENT}")
    if args.promote is not None:
        try:
            result = promote(args.name, args.promote, args.alias, args.cache, args.split, args.margin, args.force,
                             args.reason, args.out, args.tracking_uri, args.cases, args.replicates, args.level,
                             args.seed, args.device)
        except PromotionRefused as err:
            table, _, reason = str(err).rpartition("\n")
            print(table)
            raise PromotionRefused(reason) from None
        if result["comparison"] is not None:
            print(markdown(result["comparison"]))
        print(result["message"])
    print_review(args.name, args.tracking_uri, args.alias)
    return 0


def print_review(name: str, tracking_uri: str = "", alias: str = "champion") -> None:
    """The candidates table, then the release history with its warnings."""
    print(f"candidates ({candidates_name(name)}):")
    print(format_table(versions_table(name, tracking_uri, alias)))
    rows, warnings = release_history(name, tracking_uri, alias)
    print(f"\nreleased ({released_name(name)}; users load models:/{released_name(name)}@{alias}):")
    print(format_table(rows) if rows else "(nothing released yet)")
    for line in warnings:
        print(line)
