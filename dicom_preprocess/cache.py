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
import signal
import threading
from typing import Any, Iterator

import numpy as np
import pandas as pd

from .files import AtomicFile, atomic_write_json, leftover_temporaries
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
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8:  # the cache's format; ChunkWriter would not use such rows
        raise ValueError(f"chunk {chunk}: pixels are {pixels.dtype}, the cache stores uint8")
    writer = ChunkWriter(parts_dir, chunk, pixels.shape[1:], len(pixels), rows=pixels, streaming=False)
    writer.count = len(pixels)
    writer.finish(records, errors)


class ChunkWriter:
    """One chunk's pixels, stored while the chunk is still being decoded.

    The decoder encodes each slice straight into :meth:`next_row`. When an input is complete
    (:meth:`commit`), a writer thread copies its rows to the chunk's temporary ``.npy`` and
    syncs them (``fdatasync``) in batches of ~8 MB, so that writing and syncing 200 MB per chunk overlap
    the decoding instead of following it (measured: 0.52 ms per file when written and fsynced at
    the end of the chunk, as long as decoding one file). :meth:`finish` writes what is left, the
    ``.npy`` header with the final row count, syncs, renames the file into place and only then
    writes the ``.json`` that marks the chunk complete: a chunk is still either absent or whole,
    whenever the process is killed. Until then the file exists only as ``chunk_N.npy.tmp<pid>``.

    Rows of an input that fails half-way (a volume) are dropped with :meth:`truncate`; they were
    never committed, so the writer thread has not read them. ``rows`` may be passed in to reuse
    one buffer from chunk to chunk: a fresh 200 MB buffer per chunk cost ~0.2 ms of page faults
    per file on its first touch.

    Raises:
        OSError: from :meth:`commit` or :meth:`finish`, when the writer thread failed (ENOSPC).
    """

    BATCH_BYTES = 8 * 2**20

    def __init__(self, parts_dir: str, chunk: int, row_shape: tuple, capacity: int, rows: np.ndarray | None = None,
                 streaming: bool = True):
        self.row_shape = tuple(row_shape)
        if rows is None or rows.shape[1:] != self.row_shape or len(rows) < capacity or rows.dtype != np.uint8:
            rows = np.empty((max(1, capacity),) + self.row_shape, dtype=np.uint8)
        self.rows = rows
        self.row_bytes = int(np.prod(self.row_shape))
        self.chunk, self.parts_dir = chunk, parts_dir
        # numpy leaves room for 21 digits of the first axis in a v1.0 header ("so that the array
        # header can be modified in-place"), so the data offset does not depend on the row count.
        self.data_offset = len(_npy_header(0, self.row_shape))
        self.count = 0  # rows filled (the next row's index)
        self._committed = 0  # rows of complete inputs: the writer thread may copy [written, committed)
        self._written = 0
        self._closing = False
        self._error: OSError | None = None
        self._lock = threading.Condition()
        self._batch_rows = max(1, self.BATCH_BYTES // self.row_bytes)
        self._file = AtomicFile(f"{chunk_stem(parts_dir, chunk)}.npy")  # rows go in with pwrite on its fd
        self.tmp, self.fd = self._file.tmp, self._file.handle.fileno()
        self._thread = None
        if streaming:
            self._thread = threading.Thread(target=self._write_batches, name=f"chunk-{chunk}-writer", daemon=True)
            self._thread.start()

    # -- the decoder's side --------------------------------------------------------------------
    def next_row(self) -> np.ndarray:
        """The (C, H, W) uint8 row the next slice is encoded into."""
        if self.count == len(self.rows):  # volumes: more slices than inputs
            grown = np.empty((2 * len(self.rows),) + self.row_shape, dtype=np.uint8)
            grown[: self.count] = self.rows[: self.count]
            with self._lock:  # the writer thread takes its reference to the rows under the lock
                self.rows = grown
        self.count += 1
        return self.rows[self.count - 1]

    def truncate(self, count: int) -> None:
        """Drop the rows from ``count`` on (an input that failed after some of its slices)."""
        self.count = max(self._committed, min(self.count, count))

    def commit(self) -> None:
        """The rows filled so far are final: the writer thread may store them."""
        with self._lock:
            if self._error is not None:
                raise self._error
            self._committed = self.count
            if self._committed - self._written >= self._batch_rows:
                self._lock.notify()

    def finish(self, records: list[dict], errors: list[dict]) -> None:
        """Store the rest, put the .npy in place, then the .json that marks the chunk complete."""
        self.commit()
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        self._store(self.rows, self._written, self.count)
        _pwrite_all(self.fd, _npy_header(self.count, self.row_shape), 0)
        os.ftruncate(self.fd, self.data_offset + self.count * self.row_bytes)
        self._file.commit()
        atomic_write_json(f"{chunk_stem(self.parts_dir, self.chunk)}.json",
                          {"chunk": self.chunk, "records": records, "errors": errors}, compact=True)

    def abort(self) -> None:
        """Stop the writer thread and remove the temporary file (after an error)."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        self._file.discard()

    # -- the writer thread -----------------------------------------------------------------------
    def _write_batches(self) -> None:
        if hasattr(signal, "pthread_sigmask"):  # the decoder's SIGALRM time bound is for the main thread
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        while True:
            with self._lock:
                while not self._closing and self._committed - self._written < self._batch_rows:
                    self._lock.wait()
                if self._closing:
                    return  # finish() stores the tail in the caller's thread
                rows, start, stop = self.rows, self._written, self._committed
            try:
                self._store(rows, start, stop)
                os.fdatasync(self.fd)
            except OSError as err:
                with self._lock:
                    self._error = err
                return
            with self._lock:
                self._written = stop

    def _store(self, rows: np.ndarray, start: int, stop: int) -> None:
        if stop > start:
            _pwrite_all(self.fd, rows[start:stop], self.data_offset + start * self.row_bytes)


def _npy_header(count: int, row_shape: tuple) -> bytes:
    """The .npy v1.0 header of a uint8 (count, *row_shape) C-order array."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": (count,) + tuple(row_shape)})
    return buffer.getvalue()


def _pwrite_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until all of ``data`` is written (a write may be short). Written by hand
    rather than through ``ndarray.tofile``, which reports a full disk as "N requested and M
    written" without errno ENOSPC (the job's StorageFull needs the errno)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def remove_partial_chunks(parts_dir: str, chunks) -> None:
    """Delete what a killed run left of ``chunks`` it had not finished (``chunk_N.npy.tmp<pid>``:
    up to 200 MB each, never read). One listing of the folder for all of them: a job resumes with
    hundreds of chunks pending."""
    names = os.listdir(parts_dir)
    for chunk in chunks:
        for suffix in (".npy", ".json"):
            for name in leftover_temporaries(f"{chunk_stem(parts_dir, chunk)}{suffix}", names):
                try:
                    os.unlink(os.path.join(parts_dir, name))
                except FileNotFoundError:
                    pass


def read_job_record(parts_dir: str) -> dict:
    with open(os.path.join(parts_dir, JOB_FILE)) as handle:
        return json.load(handle)


def chunk_done(parts_dir: str, chunk: int) -> bool:
    stem = chunk_stem(parts_dir, chunk)
    return os.path.exists(f"{stem}.json") and os.path.exists(f"{stem}.npy")


def undo_chunk(parts_dir: str, chunk: int) -> None:
    """Mark a stored chunk not done (its .json goes; its .npy stays until a new one replaces it)."""
    try:
        os.remove(f"{chunk_stem(parts_dir, chunk)}.json")
    except FileNotFoundError:
        pass


def read_chunk_json(parts_dir: str, chunk: int) -> dict:
    with open(f"{chunk_stem(parts_dir, chunk)}.json") as handle:
        return json.load(handle)


def series_order(manifest: pd.DataFrame) -> pd.DataFrame:
    """Add slice_index, series_length, prev_index, next_index (neighbours clamp at series ends).

    Slices are ordered by ImagePositionPatient[2] within (study, series); RSNA has no
    InstanceNumber. Within a series of one orientation whose slices step along the table, z and
    the position along the slice normal rise together whatever the gantry tilt (below 90 degrees):
    ``tests/test_real_series.py`` checks that on 12 real RSNA series tilted up to 22 degrees.
    Slices sharing a position are kept, next to each other, in image id order.
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

    @property
    def group_unit(self) -> str:
        """What :meth:`groups` returns, as recorded in metadata.json (caches made before it was
        recorded were split the same way)."""
        from .splits import GROUP_UNIT

        return self.metadata.get("group_unit", GROUP_UNIT)

    def groups(self, rows: Any = None) -> np.ndarray:
        """The unit the splits kept together for each of ``rows`` (all rows when None): the patient,
        else the study. The only grouping a statistic (bootstrap, counts, comparison) should read."""
        from .splits import group_ids

        frame = self.manifest if rows is None else self.manifest.iloc[np.asarray(rows)]
        return group_ids(frame)

    def errors(self) -> pd.DataFrame:
        return pd.read_csv(os.path.join(self.root, ERRORS), dtype=str, keep_default_na=False)


def open_cache(root: str) -> CTCache:
    """Open a finished cache (see :class:`CTCache`)."""
    return CTCache(root)
