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
from .files import atomic_copy, atomic_write_json
from .labels import SUBTYPES, read_rsna_labels
from .splits import label_subset, patient_splits
from .windowing import parse_windows


# Settings that change the pixels or the chunking: a rerun must match them to resume.
PIXEL_SETTINGS = ("size", "windows", "window_mode", "files_per_shard", "hash_ids", "hash_salt")


def job_record(config: PreprocessConfig, files: int, fingerprint: str) -> dict:
    return {
        "settings": {k: getattr(config, k) for k in PIXEL_SETTINGS},
        "config": asdict(config),
        "input_fingerprint": fingerprint,
        "files": files,
        "chunks": (files + config.files_per_shard - 1) // config.files_per_shard,
    }


def check_or_write_job(parts: str, record: dict) -> None:
    """Record the job in ``parts/job.json``, or refuse when the folder holds another job's chunks."""
    path = os.path.join(parts, cache_io.JOB_FILE)
    if os.path.exists(path):
        old = cache_io.read_job_record(parts)
        for key in ("settings", "input_fingerprint"):
            if json.dumps(old[key], sort_keys=True) != json.dumps(record[key], sort_keys=True):
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
    rows, errors = [], []
    for chunk in range(record["chunks"]):
        info = cache_io.read_chunk_json(parts, chunk)
        for row, rec in enumerate(info["records"]):
            rows.append({**rec, "shard": chunk, "row": row})
        errors.extend(info["errors"])
    columns = ["image_id", "patient_id", "study_uid", "series_uid", "z", "source", "shard", "row", "notes"]
    manifest = pd.DataFrame(rows, columns=columns)
    manifest["notes"] = manifest["notes"].astype(object).fillna("").astype(str)  # e.g. what a decoder printed for the file
    duplicated = manifest.duplicated("image_id")
    for rec in manifest[duplicated].itertuples():
        errors.append({"source": rec.source, "reason": f"duplicate image id {rec.image_id}; first copy kept"})
    manifest = manifest[~duplicated].reset_index(drop=True)
    manifest["z"] = manifest["z"].astype(float)
    label_summary = "no labels given"
    unknown_labeled = 0
    for name in SUBTYPES:
        manifest[name] = np.uint8(0)
    manifest["labeled"] = False
    if labels:
        table, report = read_rsna_labels(labels)
        known = manifest["image_id"].isin(table.index)
        manifest.loc[known, list(SUBTYPES)] = table.loc[manifest.loc[known, "image_id"], list(SUBTYPES)].to_numpy()
        manifest["labeled"] = known.to_numpy()
        unknown_labeled = int((~table.index.isin(manifest["image_id"])).sum())
        label_summary = report.summary() + f"; {int(known.sum())} cached images labeled, " \
            f"{unknown_labeled} labeled ids not in the cache"
    for name in SUBTYPES:
        manifest[name] = manifest[name].astype(np.uint8)
    manifest = cache_io.series_order(manifest)
    group = manifest["patient_id"].where(manifest["patient_id"] != "", manifest["study_uid"])
    manifest["split"] = patient_splits(group, config.split_fractions, config.seed) if len(manifest) else []
    manifest["in_label_subset"] = False
    pool = np.flatnonzero((manifest["split"] == "train").to_numpy() & manifest["labeled"].to_numpy())
    if len(pool):
        chosen = label_subset(manifest["any"].iloc[pool], config.label_fraction, config.seed)
        manifest.loc[pool[chosen], "in_label_subset"] = True
    manifest.to_parquet(os.path.join(out, cache_io.MANIFEST), index=False)
    # Every field quoted: member names of an archive may hold commas, quotes or a carriage return.
    pd.DataFrame(errors, columns=["source", "reason"]).sort_values("source", kind="mergesort").to_csv(
        os.path.join(out, cache_io.ERRORS), index=False, quoting=csv.QUOTE_ALL
    )
    windows = [asdict(w) for w in parse_windows(config.windows)]
    settings = {"windows": windows, "window_mode": config.window_mode, "size": config.size}
    fingerprint = hashlib.sha256(
        json.dumps({**settings, "input": record["input_fingerprint"], "labels": label_summary,
                    "splits": config.split_fractions, "seed": config.seed}, sort_keys=True).encode()
    ).hexdigest()[:16]
    metadata = {
        "format": cache_io.CACHE_FORMAT,
        **settings,
        "channels": [w["name"] for w in windows],
        "pad_value_hu": -1024.0,
        "resize": "area when shrinking, bilinear when enlarging; none at native size",
        "input_fingerprint": record["input_fingerprint"],
        "cache_fingerprint": fingerprint,
        "split_fractions": config.split_fractions,
        "label_fraction": config.label_fraction,
        "seed": config.seed,
        "hash_ids": config.hash_ids,
        "images": int(len(manifest)),
        "skipped": int(len(errors)),
        "split_counts": {k: int(v) for k, v in manifest["split"].value_counts().items()},
        "labels": label_summary,
        "versions": _versions(),
    }
    atomic_write_json(os.path.join(out, cache_io.METADATA), metadata)
    return metadata


def _versions() -> dict:
    import numpy
    import pydicom

    from . import __version__

    return {"dicom_preprocess": __version__, "pydicom": pydicom.__version__, "numpy": numpy.__version__}
