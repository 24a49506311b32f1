"""The CT cache: memory-mapped uint8 shards, a manifest, an errors table and metadata.

Layout of a cache directory::

    metadata.json         windows, size, versions, input fingerprint, counts (written last:
                          its presence means the cache is complete)
    manifest.parquet      one row per image: image_id, patient_id, study_uid, series_uid, z,
                          source, shard, row, notes, six labels, labeled, split,
                          in_label_subset, slice_index, series_length, prev_index, next_index
    errors.csv            source, reason: every input that is not in the cache
    parts/chunk_NNNNNN.npy    uint8 (n, C, size, size), opened with np.load(mmap_mode="r")
    parts/chunk_NNNNNN.json   the chunk's records and errors; written after its .npy, so a
                              chunk is complete exactly when its .json exists
    parts/job.json        the job's settings and input listing fingerprint

Reading a sample is a slice of a memory map: no copy, no decode (``c[i]`` returns a read-only
view; copy it before writing into it).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np
import pandas as pd

from .files import atomic_file, atomic_write_json
from .labels import SUBTYPES

CHUNK_PREFIX = "chunk_"
METADATA = "metadata.json"
MANIFEST = "manifest.parquet"
ERRORS = "errors.csv"
PARTS = "parts"
JOB_FILE = "job.json"  # in parts/: the job's settings and input fingerprint
CACHE_FORMAT = 1


def chunk_stem(parts_dir: str, chunk: int) -> str:
    return os.path.join(parts_dir, f"{CHUNK_PREFIX}{chunk:06d}")


def write_chunk(parts_dir: str, chunk: int, pixels: np.ndarray, records: list[dict], errors: list[dict]) -> None:
    """Store one finished chunk: pixels first, then the .json that marks it complete."""
    stem = chunk_stem(parts_dir, chunk)
    pixels = np.ascontiguousarray(pixels)
    with atomic_file(f"{stem}.npy") as handle:
        # The .npy format written by hand: np.save on a real file uses ndarray.tofile, which
        # reports a full disk as "N requested and M written" without errno ENOSPC.
        np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(pixels))
        handle.write(pixels.data)
    atomic_write_json(f"{stem}.json", {"chunk": chunk, "records": records, "errors": errors})


def read_job_record(parts_dir: str) -> dict:
    with open(os.path.join(parts_dir, JOB_FILE)) as handle:
        return json.load(handle)


def chunk_done(parts_dir: str, chunk: int) -> bool:
    stem = chunk_stem(parts_dir, chunk)
    return os.path.exists(f"{stem}.json") and os.path.exists(f"{stem}.npy")


def read_chunk_json(parts_dir: str, chunk: int) -> dict:
    with open(f"{chunk_stem(parts_dir, chunk)}.json") as handle:
        return json.load(handle)


def series_order(manifest: pd.DataFrame) -> pd.DataFrame:
    """Add slice_index, series_length, prev_index, next_index (neighbours clamp at series ends).

    Slices are ordered by ImagePositionPatient[2] within (study, series); RSNA has no
    InstanceNumber, and gantry tilt makes z the convention rather than exact geometry.
    """
    frame = manifest.reset_index(drop=True)
    order = frame.sort_values(["study_uid", "series_uid", "z", "image_id"], kind="mergesort").index.to_numpy()
    keys = frame.loc[order, ["study_uid", "series_uid"]]
    group = (keys != keys.shift()).any(axis=1).cumsum().to_numpy()
    slice_index = np.zeros(len(frame), dtype=np.int32)
    length = np.zeros(len(frame), dtype=np.int32)
    prev_index = np.zeros(len(frame), dtype=np.int64)
    next_index = np.zeros(len(frame), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends):
        members = order[start:end]
        slice_index[members] = np.arange(end - start)
        length[members] = end - start
        prev_index[members] = np.r_[members[0], members[:-1]]
        next_index[members] = np.r_[members[1:], members[-1]]
    frame["slice_index"] = slice_index
    frame["series_length"] = length
    frame["prev_index"] = prev_index
    frame["next_index"] = next_index
    return frame


class CTCache:
    """Random access to a finished cache.

    ``len(c)``, ``c[i]`` -> uint8 (C, H, W) (read-only view), ``c.manifest`` (pandas, one row per
    image, ``image_id`` column), ``c.metadata`` (dict), ``c.neighbours(i)``, ``c.stack(i)``.
    Picklable for DataLoader workers: shards are reopened lazily in each process.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        meta_path = os.path.join(self.root, METADATA)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"cache {root}: no such directory; run `medmoco preprocess --out {root}` first")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(
                f"cache {root}: {METADATA} missing, the cache is incomplete; rerun the same "
                "`medmoco preprocess` command (it resumes) or `medmoco preprocess-merge`"
            )
        with open(meta_path) as handle:
            self.metadata = json.load(handle)
        self.manifest = pd.read_parquet(os.path.join(self.root, MANIFEST))
        self._shard = self.manifest["shard"].to_numpy(np.int64)
        self._row = self.manifest["row"].to_numpy(np.int64)
        self._prev = self.manifest["prev_index"].to_numpy(np.int64)
        self._next = self.manifest["next_index"].to_numpy(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return len(self._shard)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.metadata["windows"]), self.metadata["size"], self.metadata["size"])

    @property
    def fingerprint(self) -> str:
        return self.metadata["cache_fingerprint"]

    def _map(self, shard: int) -> np.ndarray:
        pixels = self._maps.get(shard)
        if pixels is None:
            pixels = np.load(f"{chunk_stem(os.path.join(self.root, PARTS), shard)}.npy", mmap_mode="r")
            self._maps[shard] = pixels
        return pixels

    def __getitem__(self, index: int) -> np.ndarray:
        return self._map(self._shard[index])[self._row[index]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def neighbours(self, index: int, context: int = 1) -> np.ndarray:
        """Indices of slices s-context .. s+context of ``index``'s series (clamped at the ends)."""
        before, after = [index], [index]
        for _ in range(context):
            before.append(self._prev[before[-1]])
            after.append(self._next[after[-1]])
        return np.array(before[:0:-1] + after, dtype=np.int64)

    def stack(self, index: int, context: int = 1) -> np.ndarray:
        """2.5D input: the windows of slices s-context..s+context as channels, uint8 (C*(2k+1), H, W)."""
        if context == 0:
            return np.asarray(self[index])
        return np.concatenate([self[i] for i in self.neighbours(index, context)], axis=0)

    def labels(self, indices: Any = None) -> np.ndarray:
        """The six subtype labels as float32 (N, 6)."""
        frame = self.manifest if indices is None else self.manifest.iloc[indices]
        return np.array(frame[list(SUBTYPES)].to_numpy(np.float32))  # writable copy

    def indices(self, split: str | None = None, labeled: bool | None = None, subset: bool = False) -> np.ndarray:
        """Row indices of a split (``unsupervised``/``train``/``test``), optionally labeled / in the label subset."""
        mask = np.ones(len(self), dtype=bool)
        if split is not None:
            if split not in set(self.manifest["split"]):
                known = sorted(set(self.manifest["split"]))
                raise ValueError(f"cache {self.root}: split {split!r} has no images (splits present: {known})")
            mask &= self.manifest["split"].to_numpy() == split
        if labeled is not None:
            mask &= self.manifest["labeled"].to_numpy() == labeled
        if subset:
            mask &= self.manifest["in_label_subset"].to_numpy()
        return np.flatnonzero(mask)

    def errors(self) -> pd.DataFrame:
        return pd.read_csv(os.path.join(self.root, ERRORS), dtype=str, keep_default_na=False)


def open_cache(root: str) -> CTCache:
    """Open a finished cache (see :class:`CTCache`)."""
    return CTCache(root)
