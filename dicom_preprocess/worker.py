"""The chunk worker: decodes and encodes the files of one chunk and stores the chunk.

One :class:`ChunkWorker` lives in each worker process (or in the job's own process with
``--workers 1``). Every input of the chunk ends either in the chunk's pixels and records, or in
its errors with a one-line reason; nothing a file does (a reader bug, a decoder that never
returns, a message a C library prints) ends the chunk. Decodes are bounded by SIGALRM
(``file_timeout_s``); a decoder stuck where the alarm cannot reach is the supervisor's to stop.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from . import cache as cache_io
from .config import PreprocessConfig
from .encoding import SliceEncoder
from .markers import (InFlight, clear_in_flight, clear_retry, mark_for_retry, mark_unavailable, read_quarantine,
                      read_unavailable)
from .reader import SkipImage, read_dicom, read_volume
from .sources import Source, SourceUnavailable, open_source
from .windowing import parse_windows

MAX_REASON = 700  # two decoders' messages and what they printed
MAX_INPUT_BYTES = 256 * 2**20
RERUN = "a rerun of the same command reads it"  # what an input its source could not serve now is told


def hash_id(value: str, salt: str) -> str:
    """Salted, stable pseudonym for a patient/study/series id (``--hash-ids``)."""
    if not value:
        return value
    return "H_" + hashlib.sha256(f"{salt}\0{value}".encode()).hexdigest()[:16]


def printable_reason(reason: str) -> str:
    """One line of printable text: a reason may quote a decoder's message about a corrupt file."""
    text = "".join(c if c.isprintable() else "?" for c in str(reason))
    return text[:MAX_REASON] + ("..." if len(text) > MAX_REASON else "")


class _FileTimeout(BaseException):
    """SIGALRM's: a BaseException, so that no `except Exception` on the decode path (a decoder
    tried, then the next one) takes the alarm for a decoder's failure and carries on."""


def _on_alarm(signum, frame):  # pragma: no cover - signal handler
    raise _FileTimeout()


@dataclass(frozen=True)
class Failpoints:
    """Fault injection for tests, read from the environment once when a worker starts.

    ``MEDMOCO_FAILPOINT_KILL_ON``: the worker SIGKILLs itself (as the OOM killer would) on these
    inputs; ``_HANG_ON``: it blocks SIGALRM and sleeps, as a decoder stuck in C code would;
    ``_SLOW_ON``: it sleeps in Python, where SIGALRM reaches it. Comma-separated input names;
    unset in normal use, when :meth:`from_environment` returns None and the decode loop pays one
    ``is None`` test per file.
    """

    kill_on: frozenset
    hang_on: frozenset
    slow_on: frozenset

    @classmethod
    def from_environment(cls) -> "Failpoints | None":
        sets = [frozenset(filter(None, os.environ.get(f"MEDMOCO_FAILPOINT_{kind}_ON", "").split(",")))
                for kind in ("KILL", "HANG", "SLOW")]
        return cls(*sets) if any(sets) else None

    def before_decode(self, name: str) -> None:
        if name in self.kill_on:
            os.kill(os.getpid(), signal.SIGKILL)
        if name in self.hang_on:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)

    def during_decode(self, name: str) -> None:
        if name in self.slow_on:
            time.sleep(3600)


class DecoderMessages:
    """What C libraries (GDCM, OpenJPEG, libjpeg) print to stderr while a file is decoded.

    Such lines ("Unsupported JPEG data precision 12") carry no file name, and from several worker
    processes they interleave on the console. For the span of a chunk the process's file
    descriptor 2 points at a temporary file; :meth:`take` returns what the current input added
    (one ``fstat`` per file), so that the reason or the manifest's notes name the file.
    """

    def __init__(self):
        self._saved = None

    def __enter__(self) -> "DecoderMessages":
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self._seen = 0
        return self

    def take(self) -> str:
        size = os.fstat(2).st_size
        if size <= self._seen:
            return ""
        text = os.pread(2, min(size - self._seen, 4096), self._seen).decode(errors="replace")
        self._seen = size
        return " / ".join(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.close()


class ChunkWorker:
    """Decodes and encodes the files of one chunk (one instance per worker process)."""

    def __init__(self, config: PreprocessConfig, in_worker_process: bool = False):
        self.config = config
        self.archive = open_source(config.input)
        self.encoder = SliceEncoder(parse_windows(config.windows), config.window_mode, config.size)
        self.use_alarm = hasattr(signal, "setitimer")
        self.parts = os.path.join(config.out, cache_io.PARTS)
        self.quarantine = read_quarantine(self.parts)
        self.failpoints = Failpoints.from_environment()
        self.modalities = tuple(config.modalities) or None
        self.in_worker_process = in_worker_process
        self._rows = None  # the chunk buffer, kept from one chunk to the next
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay the lazy start-up costs before any file is timed: pydicom's, the compressed-pixel
        decoders' and the numba kernels' loading. A SIGALRM landing inside a half-done import leaves the interpreter broken for
        every later file, and a cold import from a network filesystem can take longer than
        file_timeout_s. (No torch: the resize of odd-sized slices is numpy.)"""
        import pydicom  # noqa: F401
        import pydicom.config  # noqa: F401

        from . import decoders
        from .encoding import resize_square
        from .reader import CodeMap, Slice

        decoders.set_threads(self.config.decode_threads or 1)
        decoders.warm_up()
        resize_square(np.zeros((1, 3, 3)), 2)
        for side in (512, 256):
            probe = Slice("warm-up", "", "", "", 0.0, codes=np.zeros((side, side), np.uint16),
                          code_map=CodeMap(False, 16, 1.0, -1024.0))
            self.encoder.encode(probe)

    def _slices(self, source: Source, data: bytes):
        if source.kind == "dicom":
            return [read_dicom(data, source.name, self.modalities)]
        path = self.archive.local_path(source)
        if path is not None:
            return list(read_volume(path, source.name))
        suffix = "".join(s for s in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
                         if source.name.lower().endswith(s))[:7]
        with tempfile.NamedTemporaryFile(suffix=suffix or ".img") as handle:
            handle.write(data)
            handle.flush()
            return list(read_volume(handle.name, source.name))

    def process(self, chunk: int, sources: list[Source]) -> tuple[int, int, int]:
        """Process and store one chunk; returns (chunk, cached, skipped)."""
        records, errors = [], []
        readable = [s for s in sources if not s.skip_reason and s.name not in self.quarantine]
        down = read_unavailable(self.parts)
        if down is not None:  # the input stopped answering earlier in this run: ask it nothing more
            errors.extend({"source": s.name, "reason": f"not read, the input stopped answering ({down}); {RERUN}",
                           "retry": True} for s in readable)
            readable = []
        row_shape = (len(self.encoder.windows), self.config.size, self.config.size)
        # The chunk's rows are written to disk by a thread while the chunk decodes (ChunkWriter)
        pixels = cache_io.ChunkWriter(self.parts, chunk, row_shape, len(readable), rows=self._rows)
        in_flight = InFlight(self.parts, chunk)
        try:
            with DecoderMessages() as messages:
                for source, data in self.archive.read_many(readable):
                    in_flight.mark(source.name)
                    try:
                        self._decode(source, data, pixels, records, errors, in_flight)
                    finally:
                        in_flight.idle()
                    pixels.commit()
                    said = messages.take()
                    if said:
                        if errors and errors[-1]["source"] == source.name:
                            errors[-1]["reason"] += f" (decoder said: {said})"
                        else:
                            for record in records:
                                if record["source"] == source.name:
                                    record["notes"] = "; ".join(filter(None, [record.get("notes", ""),
                                                                              f"decoder said: {said}"]))
            errors.extend({"source": s.name, "reason": s.skip_reason} for s in sources if s.skip_reason)
            errors.extend({"source": s.name, "reason": self.quarantine[s.name]} for s in sources
                          if not s.skip_reason and s.name in self.quarantine)
            errors = [{"source": e["source"], "reason": printable_reason(e["reason"]),
                       **({"retry": True} if e.get("retry") else {})} for e in errors]
            retry = sum(1 for e in errors if e.get("retry"))
            if retry:  # before the .json: a chunk stored with inputs to read again is never taken for done
                mark_for_retry(self.parts, chunk, retry)
            pixels.finish(records, errors)
            if not retry:
                clear_retry(self.parts, chunk)
        except BaseException:
            pixels.abort()
            raise
        finally:
            in_flight.close()
            self._rows = pixels.rows  # the next chunk fills the same (already faulted-in) buffer
        clear_in_flight(self.parts, chunk)
        return chunk, len(records), len(errors)

    def _decode(self, source: Source, data, pixels: cache_io.ChunkWriter, records: list, errors: list,
                in_flight: InFlight) -> None:
        """One input -> its slices added to ``pixels``/``records``, or one entry in ``errors``."""
        config = self.config
        if self.failpoints is not None:
            self.failpoints.before_decode(source.name)
        if isinstance(data, SourceUnavailable):  # a rerun reads it (its server is down now)
            errors.append({"source": source.name, "reason": f"{data}; {RERUN}", "retry": True})
            mark_unavailable(self.parts, str(data))
            return
        if isinstance(data, Exception):
            errors.append({"source": source.name, "reason": f"unreadable ({type(data).__name__}: {data})"})
            return
        if len(data) > MAX_INPUT_BYTES:
            errors.append({"source": source.name, "reason": "file larger than 256 MB"})
            return
        if self.use_alarm:
            previous = signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, config.file_timeout_s)
        first, complete = len(records), False
        try:
            if self.failpoints is not None:
                self.failpoints.during_decode(source.name)
            for image in self._slices(source, data):
                self.encoder.encode(image, out=pixels.next_row())
                ids = (image.patient_id, image.study_uid, image.series_uid)
                if config.hash_ids:
                    ids = tuple(hash_id(v, config.hash_salt) for v in ids)
                records.append({"image_id": image.image_id, "patient_id": ids[0], "study_uid": ids[1],
                                "series_uid": ids[2], "z": image.z, "source": source.name, **image.acquisition,
                                **({"notes": "; ".join(image.notes)} if image.notes else {})})
            complete = True
        except SkipImage as err:
            errors.append({"source": source.name, "reason": str(err)})
        except _FileTimeout:
            if self.in_worker_process:
                # The alarm may have landed anywhere (inside an import, a C extension's Python
                # glue): this interpreter is not trusted with another file. The supervisor sees
                # the death and retries the chunk alone (supervisor.run_in_processes).
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
            if not complete:  # an input is cached whole or not at all (a volume may fail half-way)
                pixels.truncate(first)
                del records[first:]


_WORKER: ChunkWorker | None = None


def init_worker(config_dict: dict) -> None:
    """ProcessPoolExecutor initializer: one ChunkWorker per worker process."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _WORKER = ChunkWorker(PreprocessConfig(**config_dict), in_worker_process=True)


def run_chunk(task: tuple[int, list[Source]]) -> tuple[int, int, int]:
    return _WORKER.process(*task)
