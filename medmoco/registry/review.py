"""Reviewing registered versions: two models scored on the same images, and the candidates list.

A version number names a candidate (a version of ``<name>-candidates``); an alias (``champion``)
is looked up in ``<name>``, then in the candidates. Each model is fetched whole and its files are
checked against the digests recorded when it was registered (:mod:`.integrity`) before it is loaded.

A comparison scores both models on the same images (:mod:`medmoco.comparison`): per-class AUC
differences with a paired patient-bootstrap interval and DeLong's p, the predictions of each
model, the table a reviewer reads, and montages of the cases to look at (:mod:`medmoco.cases`).
`medmoco review --compare` logs it as one MLflow run in ``medmoco-review``; a promotion logs it
into its release run (:mod:`.release`).
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile

from dicom_preprocess.config import ConfigError

from .access import explain_denied, is_permission_denied
from .names import REVIEW_EXPERIMENT, candidates_name, released_name

RELEASE_ADVICE = "ask a release manager"


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
    from .integrity import get_version

    return get_version(client, f"models:/{released}@{spec}")  # the released model's alias, else the candidates'



def _label(version) -> str:
    """How a version is named in messages: ``rsna-ich-moco-candidates v3``."""
    return f"{version.name} v{version.version}"


def decision_split(cache, split: str | None) -> tuple[str, str]:
    """The split a promotion decides on, and a warning ('' when none): the cache's ``release``
    split when it has one, else ``test``. A release chosen on ``test`` makes the champion's test
    figure a selected maximum, and each decision spends the test split a little more."""
    present = set(cache.manifest["split"])
    if split:
        return split, ""
    if "release" in present:
        return "release", ""
    return "test", ("WARNING: the cache has no `release` split, so this promotion decides on `test` (the champion's "
                    "test figure becomes a selected maximum); give releases their own patients with `medmoco split "
                    "--cache DIR --fractions unsupervised=...,train=...,val=...,test=...,release=0.05`")


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

    from medmoco.inference import preprocess_like_model

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
                     device: str = "cpu", tracking_uri: str = "", margin: float | None = None,
                     fetched: dict | None = None, log: bool = True, min_groups: int | None = None) -> dict:
    """Score two registered versions on the same images and write the comparison to ``out``.

    Args:
        fetched: ``{"candidate", "reference": FetchedVersion}`` already downloaded and checked (a
            promotion passes them, so that the bytes it compares are the bytes it releases);
            default: fetched here.
        log: log the comparison as a run of ``medmoco-review`` (a promotion logs it in its release run).
        min_groups: the fewest positive and negative patients (units) a class needs for an interval
            (default 10, :mod:`medmoco.intervals`); below it the class's interval is withheld.

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

    from medmoco.inference import write_submission
    from medmoco.predictions import write_predictions

    from .integrity import fetch_version

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
        fetched = fetched or {side: fetch_version(v, uri) for side, v in versions.items()}
        paths = {side: f.model_file for side, f in fetched.items()}
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
                                         seed, **({} if min_groups is None else {"min_groups": min_groups}))
        comparison.update({
            side: {"version": int(v.version), "registered_model": v.name, "model_uri": f"models:/{v.name}/{v.version}"}
            for side, v in versions.items()})
        comparison.update({"split": split if not input_path else "input", **source})
        if margin is not None:
            ok, why = non_inferior(comparison, margin)
            comparison.update({"margin": margin, "non_inferior": ok, "decision": why})
        ids = cache.manifest["image_id"].to_numpy()[rows]
        for side in ("candidate", "reference"):  # Kaggle CSV, and every figure's inputs at full precision
            write_submission(ids, probs[side], os.path.join(out, f"predictions_{side}.csv"))
            write_predictions(os.path.join(out, f"predictions_{side}.parquet"), ids, patients,
                              comparison["split"], labels, probs[side])
        write_cases(os.path.join(out, "cases"), model, info, cache, rows, labels, probs["candidate"],
                    probs["reference"], cases, device)
    with open(os.path.join(out, "comparison.json"), "w") as handle:
        json.dump(comparison, handle, indent=1)
    with open(os.path.join(out, "comparison.md"), "w") as handle:
        handle.write(markdown(comparison))
    comparison["run_id"] = _log_comparison(client, uri, name, versions, comparison, out) if log else None
    comparison["fetched"] = fetched
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
                     "mode": t.get("mode", "") + ("+series" if t.get("head") == "series" else ""),
                     "fraction": t.get("label_fraction", ""),
                     "test AUC mean [95% CI]": f"{auc:.3f} [{low:.3f}, {high:.3f}]" if low == low else f"{auc:.3f}",
                     "test split": split[:8] or "?", "cache": t.get("cache_fingerprint", "")[:8],
                     "comparable": "yes" if split and split == anchor_split else f"no: other test split than {anchor_name}",
                     "released as": t.get("released_as", ""),
                     "date": datetime.datetime.fromtimestamp(v.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")})
    return rows


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
