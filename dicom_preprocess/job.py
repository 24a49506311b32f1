"""The preprocessing job: inputs -> chunks -> worker processes -> cache.

Inputs are listed, sorted by name and cut into chunks of ``files_per_shard``. Each chunk is
processed by one worker and written atomically (pixels, then the .json that marks it done), so a
job killed at any moment (kill -9, full disk) loses at most the chunks in flight, and the same
command resumes with the missing chunks. Everything downstream of the chunks (manifest order,
series order, splits) is a pure function of the chunk contents and the config: a resumed run, a
single run, and ``--shard i/n`` runs joined by ``preprocess-merge`` give identical caches.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from . import cache as cache_io
from .config import ConfigError, PreprocessConfig, parse_shard
from .encoding import SliceEncoder
from .labels import SUBTYPES, check_label_header, read_rsna_labels
from .reader import SkipImage, read_dicom, read_volume
from .sources import InputArchive, Source
from .splits import label_subset, patient_splits
from .windowing import parse_windows

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
# Settings that change the pixels or the chunking: a rerun must match them to resume.
PIXEL_SETTINGS = ("size", "windows", "window_mode", "files_per_shard", "hash_ids", "hash_salt")


@dataclass
class JobSummary:
    out: str
    files: int
    chunks: int
    chunks_done_before: int
    cached: int
    skipped: int
    seconds: float
    finalized: bool

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds if self.seconds else float("nan")


def hash_id(value: str, salt: str) -> str:
    """Salted, stable pseudonym for a patient/study/series id (``--hash-ids``)."""
    if not value:
        return value
    return "H_" + hashlib.sha256(f"{salt}\0{value}".encode()).hexdigest()[:16]


STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
MAX_REASON = 300


def printable_reason(reason: str) -> str:
    """One line of printable text: a reason may quote a decoder's message about a corrupt file."""
    text = "".join(c if c.isprintable() else "?" for c in str(reason))
    return text[:MAX_REASON] + ("..." if len(text) > MAX_REASON else "")


class StorageFull(RuntimeError):
    """The output filesystem is full (or a quota/file-size limit was hit); finished chunks are kept."""


class _FileTimeout(Exception):
    pass


def _on_alarm(signum, frame):  # pragma: no cover - signal handler
    raise _FileTimeout()


class ChunkWorker:
    """Decodes and encodes the files of one chunk (one instance per worker process)."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.archive = InputArchive(config.input)
        self.encoder = SliceEncoder(parse_windows(config.windows), config.window_mode, config.size)
        self.use_alarm = hasattr(signal, "setitimer")
        self.parts = os.path.join(config.out, cache_io.PARTS)
        self.quarantine = read_quarantine(self.parts)
        # Failpoint for fault-injection tests: the worker kills itself (SIGKILL, as the OOM killer
        # would) when it reaches one of these inputs. Unset in normal use.
        self.kill_on = set(filter(None, os.environ.get("MEDMOCO_FAILPOINT_KILL_ON", "").split(",")))
        self.hang_on = set(filter(None, os.environ.get("MEDMOCO_FAILPOINT_HANG_ON", "").split(",")))
        self.slow_on = set(filter(None, os.environ.get("MEDMOCO_FAILPOINT_SLOW_ON", "").split(",")))
        self.in_worker_process = False  # set by _init_worker
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay the lazy start-up costs before any file is timed: torch (the resize of odd-sized
        slices) and the numba kernels' cache. A SIGALRM landing inside a half-done import leaves
        the interpreter broken for every later file, and a cold torch import from a network
        filesystem can take longer than file_timeout_s."""
        from .encoding import resize_square
        from .reader import CodeMap, Slice

        resize_square(np.zeros((1, 3, 3)), 2)
        probe = Slice("warm-up", "", "", "", 0.0, codes=np.zeros((512, 512), np.uint16),
                      code_map=CodeMap(False, 16, 1.0, -1024.0))
        self.encoder.encode(probe)

    def _slices(self, source: Source, data: bytes):
        if source.kind == "dicom":
            return [read_dicom(data, source.name)]
        path = self.archive.local_path(source)
        if path is not None:
            return list(read_volume(path, source.name))
        suffix = "".join(s for s in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr") if source.name.lower().endswith(s))[:7]
        with tempfile.NamedTemporaryFile(suffix=suffix or ".img") as handle:
            handle.write(data)
            handle.flush()
            return list(read_volume(handle.name, source.name))

    def process(self, chunk: int, sources: list[Source]) -> tuple[int, int, int]:
        """Process and store one chunk; returns (chunk, cached, skipped)."""
        config = self.config
        pixels, records, errors = [], [], []
        readable = [s for s in sources if not s.skip_reason and s.name not in self.quarantine]
        in_flight = _InFlight(self.parts, chunk)
        try:
            for source, data in self.archive.read_many(readable):
                in_flight.mark(source.name)
                if source.name in self.kill_on:
                    os.kill(os.getpid(), signal.SIGKILL)
                if source.name in self.hang_on:  # stuck where SIGALRM cannot reach, as inside C code
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                    time.sleep(3600)
                if isinstance(data, Exception):
                    errors.append({"source": source.name, "reason": f"unreadable ({type(data).__name__}: {data})"})
                    continue
                if len(data) > 256 * 2**20:
                    errors.append({"source": source.name, "reason": "file larger than 256 MB"})
                    continue
                if self.use_alarm:
                    previous = signal.signal(signal.SIGALRM, _on_alarm)
                    signal.setitimer(signal.ITIMER_REAL, config.file_timeout_s)
                try:
                    if source.name in self.slow_on:  # slow in Python code: SIGALRM reaches it
                        time.sleep(3600)
                    for image in self._slices(source, data):
                        tensor = self.encoder.encode(image)
                        ids = (image.patient_id, image.study_uid, image.series_uid)
                        if config.hash_ids:
                            ids = tuple(hash_id(v, config.hash_salt) for v in ids)
                        records.append({
                            "image_id": image.image_id, "patient_id": ids[0], "study_uid": ids[1],
                            "series_uid": ids[2], "z": image.z, "source": source.name,
                        })
                        pixels.append(tensor)
                except SkipImage as err:
                    errors.append({"source": source.name, "reason": str(err)})
                except _FileTimeout:
                    if self.in_worker_process:
                        # The alarm may have landed anywhere (inside an import, a C extension's
                        # Python glue): this interpreter is not trusted with another file. The
                        # parent sees the death and retries the chunk alone (job._run_in_processes).
                        in_flight.mark(source.name, hung=True)
                        os.kill(os.getpid(), signal.SIGKILL)
                    errors.append({"source": source.name, "reason": f"timed out after {config.file_timeout_s} s"})
                except MemoryError:
                    errors.append({"source": source.name, "reason": "out of memory while decoding"})
                except Exception as err:  # a reader bug must not end a 750k-file job
                    errors.append({"source": source.name, "reason": f"unexpected {type(err).__name__}: {err}"})
                finally:
                    if self.use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                        signal.signal(signal.SIGALRM, previous)
                    in_flight.idle()
            errors.extend({"source": s.name, "reason": s.skip_reason} for s in sources if s.skip_reason)
            errors.extend({"source": s.name, "reason": self.quarantine[s.name]} for s in sources
                          if not s.skip_reason and s.name in self.quarantine)
            errors = [{"source": e["source"], "reason": printable_reason(e["reason"])} for e in errors]
            channels = len(self.encoder.windows)
            stacked = np.stack(pixels) if pixels else np.zeros((0, channels, config.size, config.size), np.uint8)
            cache_io.write_chunk(self.parts, chunk, stacked, records, errors)
        finally:
            in_flight.close()
        _clear_in_flight(self.parts, chunk)
        return chunk, len(records), len(errors)


_WORKER: ChunkWorker | None = None


def _init_worker(config_dict: dict) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _WORKER = ChunkWorker(PreprocessConfig(**config_dict))
    _WORKER.in_worker_process = True


def _run_chunk(task: tuple[int, list[Source]]) -> tuple[int, int, int]:
    return _WORKER.process(*task)


QUARANTINE_FILE = "quarantine.json"
CRASH_REASON = ("the worker process died while decoding it twice (killed by the OS: out of memory, or a "
                "decoder crash); skipped")
HANG_REASON = "decoding it did not finish within {:.0f} s, twice (a decoder hung); skipped"


def _in_flight_path(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"inflight_{chunk:06d}.txt")


class _InFlight:
    """The input a worker is about to decode, in ``parts/inflight_<chunk>.txt`` (read back only
    after a worker died). One descriptor per chunk, overwritten in place with ``pwrite``: an
    ``open`` per file costs ~0.2 ms on some filesystems, a tenth of a slice's decode."""

    RECORD = 4096

    def __init__(self, parts: str, chunk: int):
        self.fd = os.open(_in_flight_path(parts, chunk), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.idle()

    def mark(self, name: str, hung: bool = False) -> None:
        """Decoding ``name`` starts now (the file's mtime is when; the watchdog reads both), or,
        with ``hung``, it ran past ``file_timeout_s``."""
        record = f"{os.getpid()}\t{'hung' if hung else 'decoding'}\t{name}".encode()[: self.RECORD - 1]
        os.pwrite(self.fd, record.ljust(self.RECORD, b"\0"), 0)

    def idle(self) -> None:
        """Between decodes (reading an archive member is not timed)."""
        os.pwrite(self.fd, b"\0" * self.RECORD, 0)

    def close(self) -> None:
        os.close(self.fd)


def _clear_in_flight(parts: str, chunk: int) -> None:
    try:
        os.remove(_in_flight_path(parts, chunk))
    except FileNotFoundError:
        pass


def _read_in_flight(parts: str, chunk: int) -> tuple[int, str, float, bool] | None:
    """(worker pid, input being decoded, since when, past its time bound) of a chunk, or None
    when it is not decoding."""
    path = _in_flight_path(parts, chunk)
    try:
        with open(path, "rb") as handle:
            text = handle.read().rstrip(b"\0").decode(errors="replace")
        since = os.path.getmtime(path)
    except FileNotFoundError:
        return None
    fields = text.split("\t", 2)
    if len(fields) != 3:
        return None
    return int(fields[0]), fields[2], since, fields[1] == "hung"


def read_quarantine(parts: str) -> dict:
    """Inputs that killed a worker process, with the reason recorded for them in errors.csv."""
    path = os.path.join(parts, QUARANTINE_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def _quarantine(parts: str, name: str, reason: str = CRASH_REASON) -> None:
    found = read_quarantine(parts)
    found[name] = reason
    cache_io.atomic_write_json(os.path.join(parts, QUARANTINE_FILE), found)


def _run_in_processes(config: PreprocessConfig, pending: list, workers: int, bar) -> None:
    """Chunks in worker processes, so that no input can take the job down or hang it.

    ``multiprocessing.Pool`` loses the task of a worker the OS kills (the OOM killer on a shared
    node) and its ``imap`` then waits forever; ``ProcessPoolExecutor`` reports it as
    ``BrokenProcessPool``. The chunks that were in flight are then run again one at a time in a
    fresh single-worker pool: a chunk that kills its worker when alone has its current input
    quarantined (``parts/quarantine.json``, recorded in errors.csv) and is run again without it.
    A transient kill (memory pressure from elsewhere) costs a retry and quarantines nothing.

    Watchdog: SIGALRM (``file_timeout_s``) cannot interrupt a decoder stuck inside C code, so the
    parent also reads each worker's in-flight marker and SIGKILLs a worker whose current decode
    has not finished after ``2 x file_timeout_s + 10`` s; from there the path is the one above.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    parts = os.path.join(config.out, cache_io.PARTS)
    ctx = mp.get_context("spawn")  # fork after torch/numba threads can deadlock
    sizes = {chunk: len(sources) for chunk, sources in pending}
    stall_s = 2 * config.file_timeout_s + 10
    todo, suspects, anonymous_crashes, skipped, hung = list(pending), [], 0, 0, set()
    while todo:
        batch = [next(t for t in todo if t[0] == suspects[0])] if suspects else todo
        with ProcessPoolExecutor(1 if suspects else workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(asdict(config),)) as pool:
            chunk_of = {pool.submit(_run_chunk, task): task[0] for task in batch}
            waiting = set(chunk_of)
            broken = False
            try:
                while waiting:
                    finished, waiting = wait(waiting, timeout=min(5.0, stall_s / 4), return_when=FIRST_COMPLETED)
                    for future in finished:
                        chunk, _, n_skip = future.result()
                        skipped += n_skip
                        bar.update(sizes[chunk])
                        bar.set_postfix(skipped=skipped, refresh=False)
                    for chunk in (chunk_of[future] for future in waiting):  # only chunks still running
                        state = _read_in_flight(parts, chunk)
                        if state and time.time() - state[2] > stall_s:
                            log.warning("%s: decoding for %.0f s; stopping its worker", state[1], time.time() - state[2])
                            hung.add(state[1])
                            try:
                                os.kill(state[0], signal.SIGKILL)
                            except ProcessLookupError:
                                pass
            except BrokenProcessPool:
                broken = True
        if not broken:
            done = {c for c, _ in batch}
        else:
            done = {c for c, _ in batch if cache_io.chunk_done(parts, c)}
            crashed = [c for c, _ in batch if c not in done and os.path.exists(_in_flight_path(parts, c))]
            state = _read_in_flight(parts, suspects[0]) if suspects else None
            if (suspects and state is None) or not (suspects or crashed):
                anonymous_crashes += 1  # died before or between inputs: nothing to blame
                if anonymous_crashes >= 3:
                    raise RuntimeError("worker processes keep dying outside any input; check the memory "
                                       "limit of the job (finished chunks are kept)")
            elif suspects:  # it ran alone: its current input killed (or hung) the worker
                name = state[1]
                if state[3]:  # past file_timeout_s: the worker ended itself
                    reason = HANG_REASON.format(config.file_timeout_s)
                elif name in hung:  # stopped by the watchdog
                    reason = HANG_REASON.format(stall_s)
                else:
                    reason = CRASH_REASON
                _quarantine(parts, name, reason)
                log.warning("%s: %s; recorded in errors.csv", name, reason)
            else:
                log.warning("a worker process died (chunks in flight: %s); running them again one at a time",
                            crashed)
                suspects = crashed
        todo = [t for t in todo if t[0] not in done]
        suspects = [c for c in suspects if c not in done]


def _job_record(config: PreprocessConfig, sources: list[Source], fingerprint: str) -> dict:
    return {
        "settings": {k: getattr(config, k) for k in PIXEL_SETTINGS},
        "config": asdict(config),
        "input_fingerprint": fingerprint,
        "files": len(sources),
        "chunks": (len(sources) + config.files_per_shard - 1) // config.files_per_shard,
    }


def _check_or_write_job(parts: str, record: dict) -> None:
    path = os.path.join(parts, JOB_FILE)
    if os.path.exists(path):
        with open(path) as handle:
            old = json.load(handle)
        for key in ("settings", "input_fingerprint"):
            if json.dumps(old[key], sort_keys=True) != json.dumps(record[key], sort_keys=True):
                raise ConfigError(
                    f"{parts}: holds chunks of another job ({key} differ: {old[key]} vs {record[key]}); "
                    "use a new --out or delete it"
                )
        return
    cache_io.atomic_write_json(path, record)


def run_preprocess(config: PreprocessConfig, progress: bool = True) -> JobSummary:
    """Run (or resume) a preprocessing job and finalize the cache when all chunks are done."""
    if not config.input:
        raise ConfigError("input: required (a folder, .zip or .tar/.tar.gz)")
    if not config.out:
        raise ConfigError("out: required (the cache directory)")
    if config.labels and not os.path.isfile(config.labels):
        raise ConfigError(f"labels {config.labels}: file not found")
    if config.labels:
        try:
            check_label_header(config.labels)  # now, not after hours of decoding
        except ValueError as err:
            raise ConfigError(f"labels {err}") from None
    started = time.perf_counter()
    archive = InputArchive(config.input)
    sources = archive.list()
    if not sources:
        raise ConfigError(f"input {config.input}: no DICOM, NIfTI or ITK files found")
    parts = os.path.join(config.out, cache_io.PARTS)
    os.makedirs(parts, exist_ok=True)
    record = _job_record(config, sources, archive.fingerprint(sources))
    _check_or_write_job(parts, record)
    size = config.files_per_shard
    chunks = [(c, sources[c * size : (c + 1) * size]) for c in range(record["chunks"])]
    index, count = parse_shard(config.shard) if config.shard else (0, 1)
    mine = [task for task in chunks if task[0] % count == index]
    pending = [task for task in mine if not cache_io.chunk_done(parts, task[0])]
    for chunk, _ in pending:  # markers left by a killed run say nothing about this one
        _clear_in_flight(parts, chunk)
    done_before = len(mine) - len(pending)
    files = sum(len(t[1]) for t in pending)
    cached = skipped = 0
    workers = config.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(pending)))
    bar = _progress(files, progress, f"preprocess ({workers} workers)")
    try:
        if workers == 1:
            worker = ChunkWorker(config)
            results = (worker.process(*task) for task in pending)
            _drain(results, pending, bar)
        else:
            _run_in_processes(config, pending, workers, bar)
        for chunk, _ in pending:
            info = cache_io.read_chunk_json(parts, chunk)
            cached += len(info["records"])
            skipped += len(info["errors"])
        finalized = False
        if count == 1 or _all_done(parts, record["chunks"]):
            finalize_cache(config.out, labels=config.labels or None)
            finalized = True
    except OSError as err:
        if err.errno not in STORAGE_FULL:
            raise
        done = sum(cache_io.chunk_done(parts, c) for c, _ in chunks)
        raise StorageFull(
            f"{config.out}: {err.strerror} while writing the cache; {done} of {record['chunks']} chunks are complete "
            "and kept (a partial chunk is never marked done). Free space and rerun the same command: it continues."
        ) from None
    finally:
        bar.close()
    return JobSummary(config.out, files, record["chunks"], done_before, cached, skipped,
                      time.perf_counter() - started, finalized)


def _drain(results, pending, bar) -> None:
    """Advance the progress bar (files/s, ETA, skipped) as chunks finish."""
    sizes = {chunk: len(sources) for chunk, sources in pending}
    skipped = 0
    for chunk, n_ok, n_skip in results:
        skipped += n_skip
        bar.update(sizes[chunk])
        bar.set_postfix(skipped=skipped, refresh=False)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc=desc, disable=not enabled, smoothing=0.1)


def _all_done(parts: str, n_chunks: int) -> bool:
    return all(cache_io.chunk_done(parts, c) for c in range(n_chunks))


def merge_parts(out: str, part_dirs: list[str]) -> None:
    """Bring chunks of other ``--shard`` outputs into ``out/parts`` (hard links, else copies)."""
    parts = os.path.join(out, cache_io.PARTS)
    os.makedirs(parts, exist_ok=True)
    for other in part_dirs:
        other_parts = os.path.join(other, cache_io.PARTS)
        with open(os.path.join(other_parts, JOB_FILE)) as handle:
            record = json.load(handle)
        _check_or_write_job(parts, record)
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
                    shutil.copyfile(src, dst + ".tmp")
                    os.replace(dst + ".tmp", dst)


def finalize_cache(out: str, labels: str | None = None) -> dict:
    """Join finished chunks into the manifest, errors table and metadata.

    Raises:
        ConfigError: when chunks are missing (names the first few and what to run).
    """
    parts = os.path.join(out, cache_io.PARTS)
    with open(os.path.join(parts, JOB_FILE)) as handle:
        record = json.load(handle)
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
    columns = ["image_id", "patient_id", "study_uid", "series_uid", "z", "source", "shard", "row"]
    manifest = pd.DataFrame(rows, columns=columns)
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
    cache_io.atomic_write_json(os.path.join(out, cache_io.METADATA), metadata)
    return metadata


def _versions() -> dict:
    import numpy
    import pydicom

    from . import __version__

    return {"dicom_preprocess": __version__, "pydicom": pydicom.__version__, "numpy": numpy.__version__}
