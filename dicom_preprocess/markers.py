"""The on-disk records a worker leaves for its supervisor: in-flight markers and the quarantine.

A worker writes which input it is decoding (``parts/inflight_<chunk>.txt``); the supervisor
reads it only when a worker died or stalls, to know which input to blame. Inputs that killed or
hung their worker twice are listed in ``parts/quarantine.json`` with the reason that ends up in
``errors.csv``. Both sides import this module; it imports neither of them.
"""
from __future__ import annotations

import json
import os

from .files import atomic_write_json

QUARANTINE_FILE = "quarantine.json"
CRASH_REASON = ("the worker process died while decoding it twice (killed by the OS: out of memory, or a "
                "decoder crash); skipped")
HANG_REASON = "decoding it did not finish within {:.0f} s, twice (a decoder hung); skipped"


def in_flight_path(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"inflight_{chunk:06d}.txt")


class InFlight:
    """The input a worker is about to decode, in ``parts/inflight_<chunk>.txt``. One descriptor per
    chunk, overwritten in place with ``pwrite``: an ``open`` per file costs ~0.2 ms on some
    filesystems, a tenth of a slice's decode."""

    RECORD = 4096

    def __init__(self, parts: str, chunk: int):
        self.fd = os.open(in_flight_path(parts, chunk), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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


def clear_in_flight(parts: str, chunk: int) -> None:
    try:
        os.remove(in_flight_path(parts, chunk))
    except FileNotFoundError:
        pass


def read_in_flight(parts: str, chunk: int) -> tuple[int, str, float, bool] | None:
    """(worker pid, input being decoded, since when, past its time bound) of a chunk, or None
    when it is not decoding."""
    path = in_flight_path(parts, chunk)
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


def quarantine(parts: str, name: str, reason: str = CRASH_REASON) -> None:
    found = read_quarantine(parts)
    found[name] = reason
    atomic_write_json(os.path.join(parts, QUARANTINE_FILE), found)


# -- an input that went away (a DICOMweb server down) -------------------------------------------
# A worker that gets SourceUnavailable for an input records it in its chunk's errors with
# ``retry``, writes ``parts/retry_<chunk>.txt`` before the chunk's .json (so a chunk stored with
# such errors is never taken for finished by a rerun, even if the worker dies between the two),
# and ``parts/unavailable.txt``: the workers then stop asking the input for the rest of the run
# (each chunk still stored, its inputs listed as not read). A rerun clears the latter and reads
# the chunks that have the former again.
UNAVAILABLE_FILE = "unavailable.txt"
RETRY_PREFIX = "retry_"


def retry_path(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"{RETRY_PREFIX}{chunk:06d}.txt")


def mark_for_retry(parts: str, chunk: int, count: int) -> None:
    atomic_write_json(retry_path(parts, chunk), {"inputs_not_read": count})


def clear_retry(parts: str, chunk: int) -> None:
    try:
        os.remove(retry_path(parts, chunk))
    except FileNotFoundError:
        pass


def chunks_to_retry(parts: str) -> set[int]:
    """Chunks stored with inputs their source could not serve (one listing of the folder)."""
    names = os.listdir(parts) if os.path.isdir(parts) else []
    return {int(n[len(RETRY_PREFIX):-4]) for n in names
            if n.startswith(RETRY_PREFIX) and n.endswith(".txt") and n[len(RETRY_PREFIX):-4].isdigit()}


def mark_unavailable(parts: str, reason: str) -> None:
    """The input stopped answering (the first worker to see it says why; later ones keep it)."""
    path = os.path.join(parts, UNAVAILABLE_FILE)
    if not os.path.exists(path):
        atomic_write_json(path, {"reason": reason})


def read_unavailable(parts: str) -> str | None:
    """Why the input stopped answering in this run, or None while it answers."""
    try:
        with open(os.path.join(parts, UNAVAILABLE_FILE)) as handle:
            return json.load(handle)["reason"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def clear_unavailable(parts: str) -> None:
    try:
        os.remove(os.path.join(parts, UNAVAILABLE_FILE))
    except FileNotFoundError:
        pass
