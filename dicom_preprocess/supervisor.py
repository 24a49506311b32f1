"""The supervisor: chunks in worker processes, so that no input can take the job down or hang it.

``multiprocessing.Pool`` loses the task of a worker the OS kills (the OOM killer on a shared node)
and its ``imap`` then waits forever; ``ProcessPoolExecutor`` reports it as ``BrokenProcessPool``.
The chunks that were in flight are then run again one at a time in a fresh single-worker pool: a
chunk that kills its worker when alone has its current input quarantined
(``parts/quarantine.json``, recorded in errors.csv) and is run again without it. A transient kill
(memory pressure from elsewhere) costs a retry and quarantines nothing.

Watchdog: SIGALRM (``file_timeout_s``) cannot interrupt a decoder stuck inside C code, so the
supervisor also reads each worker's in-flight marker and SIGKILLs a worker whose current decode
has not finished after ``2 x file_timeout_s + watchdog_grace_s`` s (10 s by default); from there
the path is the one above.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import asdict

from . import cache as cache_io
from .config import PreprocessConfig
from .markers import CRASH_REASON, HANG_REASON, in_flight_path, quarantine, read_in_flight
from .worker import init_worker, run_chunk

log = logging.getLogger(__name__)


def run_in_processes(config: PreprocessConfig, pending: list, workers: int, on_chunk_done) -> None:
    """Run ``pending`` ``(chunk, sources)`` tasks in ``workers`` processes until all are stored.

    Args:
        on_chunk_done: called with ``(chunk, skipped)`` as each chunk finishes (progress).

    Raises:
        RuntimeError: when worker processes keep dying outside any input (a memory limit).
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    parts = os.path.join(config.out, cache_io.PARTS)
    ctx = mp.get_context("spawn")  # fork after torch/numba threads can deadlock
    stall_s = 2 * config.file_timeout_s + config.watchdog_grace_s
    todo, suspects, anonymous_crashes, hung = list(pending), [], 0, set()
    while todo:
        batch = [next(t for t in todo if t[0] == suspects[0])] if suspects else todo
        with ProcessPoolExecutor(1 if suspects else workers, mp_context=ctx, initializer=init_worker,
                                 initargs=(asdict(config),)) as pool:
            chunk_of = {pool.submit(run_chunk, task): task[0] for task in batch}
            waiting = set(chunk_of)
            broken = False
            try:
                while waiting:
                    finished, waiting = wait(waiting, timeout=min(5.0, stall_s / 4), return_when=FIRST_COMPLETED)
                    for future in finished:
                        chunk, _, n_skip = future.result()
                        on_chunk_done(chunk, n_skip)
                    for chunk in (chunk_of[future] for future in waiting):  # only chunks still running
                        state = read_in_flight(parts, chunk)
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
            crashed = [c for c, _ in batch if c not in done and os.path.exists(in_flight_path(parts, c))]
            state = read_in_flight(parts, suspects[0]) if suspects else None
            if (suspects and state is None) or not (suspects or crashed):
                anonymous_crashes += 1  # died before or between inputs: nothing to blame
                if anonymous_crashes >= 3:
                    raise RuntimeError("worker processes keep dying outside any input; check the memory "
                                       "limit of the job (finished chunks are kept)")
                log.warning("a worker process died outside any input (%d of 3 such deaths allowed); running "
                            "the unfinished chunks again", anonymous_crashes)
            elif suspects:  # it ran alone: its current input killed (or hung) the worker
                name = state[1]
                if state[3]:  # past file_timeout_s: the worker ended itself
                    reason = HANG_REASON.format(config.file_timeout_s)
                elif name in hung:  # stopped by the watchdog
                    reason = HANG_REASON.format(stall_s)
                else:
                    reason = CRASH_REASON
                quarantine(parts, name, reason)
                log.warning("%s: %s; recorded in errors.csv", name, reason)
            else:
                log.warning("a worker process died (chunks in flight: %s); running them again one at a time",
                            crashed)
                suspects = crashed
        todo = [t for t in todo if t[0] not in done]
        suspects = [c for c in suspects if c not in done]
