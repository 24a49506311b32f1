"""The preprocessing job: inputs -> chunks -> workers -> cache.

Inputs are listed, sorted by name and cut into chunks of ``files_per_shard``. Each chunk is
processed by one worker (:mod:`.worker`; several run under :mod:`.supervisor`) and written
atomically (pixels, then the .json that marks it done), so a job killed at any moment (kill -9,
full disk) loses at most the chunks in flight, and the same command resumes with the missing
chunks. When all are done, :mod:`.assembly` joins them into the cache.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, replace

from . import cache as cache_io
from .assembly import check_or_write_job, finalize_cache, job_record, merge_parts, write_errors  # noqa: F401 (API)
from .config import ConfigError, PreprocessConfig, parse_shard, usable_cpus
from .labels import check_label_header
from .markers import chunks_to_retry, clear_in_flight, clear_unavailable, read_unavailable
from .sources import SourceUnavailable, open_source

log = logging.getLogger(__name__)
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass
class JobSummary:
    """What a run did. ``files``, ``cached`` and ``skipped`` count this run's work (chunks decoded
    now); ``images`` and ``errors`` are the finished cache's counts (after duplicates of one image
    id were moved to the errors), None for a shard that leaves finalising to preprocess-merge."""

    out: str
    files: int
    chunks: int
    chunks_done_before: int
    cached: int
    skipped: int
    seconds: float
    finalized: bool
    images: int | None = None
    errors: int | None = None
    reused_files: int = 0

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds if self.seconds else float("nan")

    def line(self) -> str:
        """The console's one-line account of the run."""
        work = f"{self.files} files decoded in {self.seconds:.1f} s ({self.files_per_second:.0f} files/s)" \
            if self.files else f"nothing to decode ({self.seconds:.1f} s)"
        if self.reused_files:
            work += f"; {self.reused_files} files in {self.chunks_done_before} chunks reused from an earlier run"
        if not self.finalized:
            return f"{self.cached} images, {self.skipped} skipped in this shard ({work}); run preprocess-merge"
        return (f"cache complete: {self.images} images, {self.errors} inputs skipped ({work}): {self.out} "
                f"(reasons: {os.path.join(self.out, 'errors.csv')})")


class StorageFull(RuntimeError):
    """The output filesystem is full (or a quota/file-size limit was hit); finished chunks are kept."""


def run_preprocess(config: PreprocessConfig, progress: bool = True) -> JobSummary:
    """Run (or resume) a preprocessing job and finalize the cache when all chunks are done."""
    from .supervisor import run_in_processes
    from .worker import ChunkWorker

    if not config.input:
        raise ConfigError("input: required (a folder, .zip or .tar/.tar.gz)")
    if not config.out:
        raise ConfigError("out: required (the cache directory)")
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise ConfigError(f"out {config.out}: is a file; give a directory for the cache")
    if config.labels and not os.path.isfile(config.labels):
        raise ConfigError(f"labels {config.labels}: file not found")
    if config.labels:
        try:
            check_label_header(config.labels)  # now, not after hours of decoding
        except ValueError as err:
            raise ConfigError(f"labels {err}") from None
    started = time.perf_counter()
    try:
        archive = open_source(config.input)
    except (ValueError, ImportError) as err:
        raise ConfigError(str(err)) from None
    sources = archive.list()  # SourceUnavailable: a server that does not answer (nothing read yet)
    if not sources:
        raise ConfigError(f"input {config.input}: no DICOM, NIfTI or ITK files found")
    parts = os.path.join(config.out, cache_io.PARTS)
    try:
        os.makedirs(parts, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out {config.out}: cannot create the cache directory ({err.strerror})") from None
    record = job_record(config, len(sources), archive.fingerprint(sources), archive.unlisted)
    check_or_write_job(parts, record)
    size = config.files_per_shard
    chunks = [(c, sources[c * size : (c + 1) * size]) for c in range(record["chunks"])]
    index, count = parse_shard(config.shard) if config.shard else (0, 1)
    mine = [task for task in chunks if task[0] % count == index]
    clear_unavailable(parts)  # a server that was down in the last run is asked again
    retry = chunks_to_retry(parts)  # stored with inputs the source could not serve then
    pending = [task for task in mine if task[0] in retry or not cache_io.chunk_done(parts, task[0])]
    for chunk, _ in pending:  # markers and partial files left by a killed run say nothing about this one
        clear_in_flight(parts, chunk)
        if chunk in retry:  # not done until read again (the .npy stays until the new one replaces it)
            cache_io.undo_chunk(parts, chunk)
    cache_io.remove_partial_chunks(parts, [chunk for chunk, _ in pending])
    done_before = len(mine) - len(pending)
    files = sum(len(t[1]) for t in pending)
    cached = skipped = 0
    workers = config.workers or usable_cpus()
    workers = max(1, min(workers, len(pending)))
    config = replace(config, decode_threads=config.decode_threads or max(1, usable_cpus() // workers))
    bar = _progress(files, progress, f"preprocess ({workers} worker{'s' if workers != 1 else ''})")
    sizes = {chunk: len(chunk_sources) for chunk, chunk_sources in pending}
    state = {"skipped": 0}

    def on_chunk_done(chunk: int, n_skip: int) -> None:
        state["skipped"] += n_skip
        bar.update(sizes[chunk])
        bar.set_postfix(skipped=state["skipped"], refresh=False)

    try:
        if workers == 1:
            worker = ChunkWorker(config)
            for task in pending:
                chunk, _, n_skip = worker.process(*task)
                on_chunk_done(chunk, n_skip)
        else:
            run_in_processes(config, pending, workers, on_chunk_done)
        not_read = []
        for chunk, _ in pending:
            info = cache_io.read_chunk_json(parts, chunk)
            cached += len(info["records"])
            skipped += len(info["errors"])
            not_read += [e for e in info["errors"] if e.get("retry")]
        if not_read:
            raise _unavailable(config, parts, sources, not_read, record["chunks"])
        finalized, meta = False, None
        if count == 1 or all(cache_io.chunk_done(parts, c) for c in range(record["chunks"])):
            meta = finalize_cache(config.out, labels=config.labels or None)
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
    reused = sum(len(chunk_sources) for chunk, chunk_sources in mine if chunk not in sizes)
    return JobSummary(config.out, files, record["chunks"], done_before, cached, skipped,
                      time.perf_counter() - started, finalized, meta["images"] if meta else None,
                      meta["skipped"] if meta else None, reused)


def _unavailable(config: PreprocessConfig, parts: str, sources: list, not_read: list, chunks: int) -> SourceUnavailable:
    """The error of a run whose input stopped answering: every chunk is stored (what was read is
    kept), errors.csv lists what was not read, and no cache is finalized until a rerun reads it."""
    failed = {e["source"] for e in not_read}
    studies = sorted({s.location[0] for s in sources if s.name in failed and s.location})
    where = ""
    if studies:
        where = f" of {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} ({', '.join(studies[:5])}" + \
            (", ..." if len(studies) > 5 else "") + ")"
    if all(cache_io.chunk_done(parts, c) for c in range(chunks)):
        write_errors(config.out)
        listed = f"errors.csv lists them ({os.path.join(config.out, cache_io.ERRORS)})"
    else:
        listed = "the .json files of the chunks in parts/ list them"
    first = read_unavailable(parts) or not_read[0]["reason"]
    return SourceUnavailable(
        f"input {config.input}: {first}. {len(failed)} inputs{where} were not read; {listed}. What was read is "
        "kept and no cache is finalized: rerun the same command when the source answers (it reads only the "
        "chunks that lack inputs)")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc=desc, disable=not enabled, smoothing=0.1)
