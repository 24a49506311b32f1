"""Cache assembly: finished chunks -> manifest, errors table and metadata (the cache's last step).

Everything here is a pure function of the chunk contents and the job's config: a resumed run, a
single run, and ``--shard i/n`` runs joined by :func:`merge_parts` give identical caches.
``metadata.json`` is written last; its presence means the cache is complete.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict

import numpy as np
import pandas as pd

from . import cache as cache_io
from .config import ConfigError, PreprocessConfig
from .files import atomic_copy, atomic_file, atomic_write_json
from .labels import SUBTYPES, read_rsna_labels
from .markers import chunks_to_retry, retry_path
from .acquisition import COLUMNS as ACQUISITION_COLUMNS
from .splits import GROUP_UNIT, SPLIT_METHOD, assign_splits, check_fractions, split_fingerprints
from .windowing import parse_windows


# Settings that change the pixels or the chunking: a rerun must match them to resume.
PIXEL_SETTINGS = ("size", "windows", "window_mode", "files_per_shard", "hash_ids", "hash_salt", "modalities")


def job_record(config: PreprocessConfig, files: int, fingerprint: str, unlisted: dict | None = None) -> dict:
    return {
        "settings": {k: getattr(config, k) for k in PIXEL_SETTINGS},
        "config": asdict(config),
        "input_fingerprint": fingerprint,
        "files": files,
        "chunks": (files + config.files_per_shard - 1) // config.files_per_shard,
        "unlisted": {"files": int(sum((unlisted or {}).values())), "by_suffix": dict(sorted((unlisted or {}).items()))},
    }


def check_or_write_job(parts: str, record: dict) -> None:
    """Record the job in ``parts/job.json``, or refuse when the folder holds another job's chunks."""
    path = os.path.join(parts, cache_io.JOB_FILE)
    if os.path.exists(path):
        old = cache_io.read_job_record(parts)
        # A setting that an older job record lacks (added since) does not block resuming it.
        new = {**record, "settings": {k: v for k, v in record["settings"].items() if k in old["settings"]}}
        for key in ("settings", "input_fingerprint"):
            if json.dumps(old[key], sort_keys=True) != json.dumps(new[key], sort_keys=True):
                raise ConfigError(
                    f"{parts}: holds chunks of another job ({key} differ: {old[key]} vs {record[key]}); "
                    "use a new --out or delete it"
                )
        return
    atomic_write_json(path, record)


def merge_parts(out: str, part_dirs: list[str]) -> None:
    """Bring chunks of other ``--shard`` outputs into ``out/parts`` (hard links, else copies)."""
    parts = os.path.join(out, cache_io.PARTS)
    os.makedirs(parts, exist_ok=True)
    for other in part_dirs:
        other_parts = os.path.join(other, cache_io.PARTS)
        record = cache_io.read_job_record(other_parts)
        check_or_write_job(parts, record)
        for name in sorted(os.listdir(other_parts)):
            if not name.startswith(cache_io.CHUNK_PREFIX) or not name.endswith(".json"):
                continue
            stem = name[: -len(".json")]
            chunk = int(stem[len(cache_io.CHUNK_PREFIX):])
            if os.path.exists(retry_path(other_parts, chunk)):  # before the .json, as the worker writes them
                atomic_copy(retry_path(other_parts, chunk), retry_path(parts, chunk))
            for suffix in (".npy", ".json"):  # .json last: it marks the chunk complete
                src, dst = os.path.join(other_parts, stem + suffix), os.path.join(parts, stem + suffix)
                if os.path.exists(dst) or os.path.abspath(src) == os.path.abspath(dst):
                    continue
                try:
                    os.link(src, dst)
                except OSError:
                    atomic_copy(src, dst)


def finalize_cache(out: str, labels: str | None = None) -> dict:
    """Join finished chunks into the manifest, errors table and metadata.

    Raises:
        ConfigError: when chunks are missing (names the first few and what to run).
    """
    parts = os.path.join(out, cache_io.PARTS)
    record = cache_io.read_job_record(parts)
    config = PreprocessConfig(**record["config"])
    labels = labels or config.labels or None
    missing = [c for c in range(record["chunks"]) if not cache_io.chunk_done(parts, c)]
    if missing:
        raise ConfigError(
            f"{out}: {len(missing)} of {record['chunks']} chunks not done (e.g. {missing[:5]}); "
            "run the remaining `medmoco preprocess --shard i/n` jobs, then preprocess-merge"
        )
    retry = sorted(chunks_to_retry(parts))
    if retry:
        raise ConfigError(
            f"{out}: {len(retry)} chunks (e.g. {retry[:5]}) hold inputs their source could not serve (errors.csv "
            "says which and why); rerun the preprocess job(s) that made them when it answers, then preprocess-merge")
    rows, errors = [], []
    for chunk in range(record["chunks"]):
        info = cache_io.read_chunk_json(parts, chunk)
        for row, rec in enumerate(info["records"]):
            rows.append({**rec, "shard": chunk, "row": row})
        errors.extend(info["errors"])
    columns = ["image_id", "patient_id", "study_uid", "series_uid", "z", "source", "shard", "row", "notes",
               *ACQUISITION_COLUMNS.values()]
    manifest = pd.DataFrame(rows, columns=columns)
    for column in ACQUISITION_COLUMNS.values():  # absent for volumes and caches' older chunks
        manifest[column] = manifest[column].astype(object).fillna("").astype(str)
    manifest["notes"] = manifest["notes"].astype(object).fillna("").astype(str)  # e.g. what a decoder printed for the file
    duplicated = manifest.duplicated("image_id")
    for rec in manifest[duplicated].itertuples():
        errors.append({"source": rec.source, "reason": f"duplicate image id {rec.image_id}; first copy kept"})
    manifest = manifest[~duplicated].reset_index(drop=True)
    manifest["z"] = manifest["z"].astype(float)
    label_summary, unmatched = "no labels given", None
    for name in SUBTYPES:
        manifest[name] = np.uint8(0)
    manifest["labeled"] = False
    if labels:
        table, report = read_rsna_labels(labels)
        manifest, matched = attach_labels(manifest, table)
        label_summary = report.summary() + f"; {int(manifest['labeled'].sum())} cached images labeled " \
            f"({matched['sop']} by SOPInstanceUID, {matched['stem']} by file name), " \
            f"{len(table) - matched['sop'] - matched['stem']} labeled ids not in the cache"
        if len(table) and not manifest["labeled"].any():
            unmatched = (str(table.index[0]), manifest["image_id"].iloc[0] if len(manifest) else "",
                         _stem(manifest["source"].iloc[0]) if len(manifest) else "")
    for name in SUBTYPES:
        manifest[name] = manifest[name].astype(np.uint8)
    _write_errors_table(out, errors)
    if manifest.empty:
        examples = "; ".join(f"{e['source']}: {e['reason'][:120]}" for e in errors[:3])
        raise NothingCached(f"{out}: none of the {len(errors)} inputs is a usable image, so there is no cache; every "
                            f"reason is in {os.path.join(out, cache_io.ERRORS)} (e.g. {examples})")
    manifest = cache_io.series_order(manifest)
    manifest = assign_splits(manifest, config.split_fractions, config.seed, config.label_fraction)
    with atomic_file(os.path.join(out, cache_io.MANIFEST)) as handle:
        manifest.to_parquet(handle, index=False)
    windows = [asdict(w) for w in parse_windows(config.windows)]
    metadata = {
        "format": cache_io.CACHE_FORMAT,
        "windows": windows, "window_mode": config.window_mode, "size": config.size,
        "channels": [w["name"] for w in windows],
        "pad_value_hu": -1024.0,
        "resize": "area when shrinking, bilinear when enlarging; none at native size",
        "input_fingerprint": record["input_fingerprint"],
        "label_fraction": config.label_fraction,
        "hash_ids": config.hash_ids,
        "images": int(len(manifest)),
        "skipped": int(len(errors)),
        "labels": label_summary,
        "unlisted_inputs": record.get("unlisted", {}),
        "modalities": list(config.modalities),
        "versions": _versions(),
    }
    _record_splits(metadata, manifest, config.split_fractions, config.seed)
    atomic_write_json(os.path.join(out, cache_io.METADATA), metadata)
    if unmatched is not None:
        raise LabelsUnmatched(
            f"labels {labels}: none of its {len(table)} image ids matches a cached image, by SOPInstanceUID or by file "
            f"name (a label id: {unmatched[0]!r}; an image: SOPInstanceUID {unmatched[1]!r}, file {unmatched[2]!r}). "
            "The cache is written without labels; give the labels of these images and rerun the same command "
            "(nothing is decoded again)")
    return metadata


def write_errors(out: str) -> int:
    """errors.csv of the chunks stored so far, without finalizing (a run whose input stopped
    answering: the table says what is missing). Returns its number of rows."""
    parts = os.path.join(out, cache_io.PARTS)
    record = cache_io.read_job_record(parts)
    errors = [e for c in range(record["chunks"]) if cache_io.chunk_done(parts, c)
              for e in cache_io.read_chunk_json(parts, c)["errors"]]
    _write_errors_table(out, errors)
    return len(errors)


def _write_errors_table(out: str, errors: list[dict]) -> None:
    # Every field quoted: member names of an archive may hold commas, quotes or a carriage return.
    with atomic_file(os.path.join(out, cache_io.ERRORS), "w") as handle:
        pd.DataFrame(errors, columns=["source", "reason"]).sort_values("source", kind="mergesort").to_csv(
            handle, index=False, quoting=csv.QUOTE_ALL)


class NothingCached(RuntimeError):
    """Every input was rejected: errors.csv is written, there is no cache."""


class LabelsUnmatched(RuntimeError):
    """A labels file was given and none of its ids matches an image."""


def _stem(source: str) -> str:
    name = os.path.basename(source)
    return name[:-4] if name.lower().endswith(".dcm") else name


def attach_labels(manifest: pd.DataFrame, table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Labels of ``table`` (indexed by image id) on ``manifest`` rows: by SOPInstanceUID (the
    manifest's ``image_id``; in RSNA the two coincide), else by the file name's stem (outside
    RSNA, label files are often keyed by file names). Returns the frame and how many matched how."""
    manifest = manifest.copy()
    by_sop = manifest["image_id"].isin(table.index).to_numpy()
    stems = manifest["source"].map(_stem)
    used = set(manifest.loc[by_sop, "image_id"])
    by_stem = ~by_sop & stems.isin(table.index).to_numpy() & ~stems.isin(used).to_numpy()
    keys = np.where(by_sop, manifest["image_id"], np.where(by_stem, stems, ""))
    found = by_sop | by_stem
    manifest.loc[found, list(SUBTYPES)] = table.loc[keys[found], list(SUBTYPES)].to_numpy()
    manifest["labeled"] = found
    return manifest, {"sop": int(by_sop.sum()), "stem": int(by_stem.sum())}


def _record_splits(metadata: dict, manifest: pd.DataFrame, fractions: dict, seed: int) -> None:
    """The split settings, counts and fingerprints in ``metadata``, and the cache fingerprint
    (preprocessing, input, labels and splits: it changes when any of them does)."""
    metadata.update({"split_fractions": dict(fractions), "seed": int(seed), "split_method": SPLIT_METHOD,
                     "group_unit": GROUP_UNIT,
                     "split_counts": {k: int(v) for k, v in manifest["split"].value_counts().items()},
                     "split_fingerprints": split_fingerprints(manifest, SUBTYPES)})
    # the assignment itself (each split's fingerprint), not only the settings that made it: two
    # assignments from the same settings (another method, a fixed bug) are two caches
    identity = {"windows": metadata["windows"], "window_mode": metadata["window_mode"], "size": metadata["size"],
                "input": metadata["input_fingerprint"], "labels": metadata["labels"], "splits": metadata["split_fractions"],
                "split_method": metadata["split_method"], "seed": metadata["seed"],
                "assignment": metadata["split_fingerprints"]}
    metadata["cache_fingerprint"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def resplit_cache(out: str, fractions: dict, seed: int) -> dict:
    """New patient-grouped splits for a finished cache, without decoding anything again.

    The manifest's ``split`` and ``in_label_subset`` columns are rewritten (atomically, then
    ``metadata.json``, which records the fractions and seed); a cache written before the ``val``
    split existed gets one this way. Rerunning the same command gives the same cache.

    Raises:
        FileNotFoundError: when ``out`` is not a finished cache.
        ValueError: for bad fractions.
    """
    fractions = check_fractions(fractions)
    cache = cache_io.open_cache(out)
    metadata = dict(cache.metadata)
    previous = {"split_fractions": metadata.get("split_fractions"), "seed": metadata.get("seed"),
                # caches split before stratification recorded no method
                "split_method": metadata.get("split_method", "patients, unstratified")}
    manifest = assign_splits(cache.manifest, fractions, seed, float(metadata.get("label_fraction", 0.2)))
    with atomic_file(os.path.join(out, cache_io.MANIFEST)) as handle:
        manifest.to_parquet(handle, index=False)
    metadata["split_history"] = list(metadata.get("split_history", [])) + [previous]
    _record_splits(metadata, manifest, fractions, seed)
    atomic_write_json(os.path.join(out, cache_io.METADATA), metadata)
    return metadata


def _versions() -> dict:
    import numpy
    import pydicom

    from . import __version__

    return {"dicom_preprocess": __version__, "pydicom": pydicom.__version__, "numpy": numpy.__version__}
