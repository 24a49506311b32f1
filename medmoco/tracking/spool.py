"""The tracking spool: MLflow calls that could not be sent, kept in order in the run directory,
and their replay (``medmoco tracking-replay --run-dir RUN_DIR``)."""
from __future__ import annotations

import json
import os
import shutil

from dicom_preprocess.files import atomic_write_text

SPOOL_FILE = "mlflow_spool.jsonl"
SPOOL_DONE_FILE = "mlflow_spool.done"
SPOOL_ARTIFACTS = "mlflow_spool_artifacts"


class Spool:
    """Tracking calls that could not be sent, in order, as JSON lines in a run directory.

    ``mlflow_spool.done`` holds how many lines were already sent, written after each one, so a
    replay killed half-way resumes after the last call that reached the store.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, SPOOL_FILE)
        self.done_path = os.path.join(run_dir, SPOOL_DONE_FILE)

    def append(self, op: dict) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        if op["op"] == "log_artifact":  # keep a copy: the original may be a temporary file
            keep = os.path.join(self.run_dir, SPOOL_ARTIFACTS, f"{self.count():06d}")
            os.makedirs(keep, exist_ok=True)
            target = os.path.join(keep, os.path.basename(op["path"].rstrip("/")))
            (shutil.copytree if os.path.isdir(op["path"]) else shutil.copyfile)(op["path"], target)
            op = {**op, "path": target}
        with open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell():
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a line torn by a kill: end it, it is skipped on reading
                    handle.write(b"\n")
            handle.write((json.dumps(op) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())

    def ops(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as handle:
            lines = handle.read().splitlines()
        ops = []
        for line in lines:
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:  # torn by a kill: the call it held was never acknowledged
                continue
        return ops

    def done(self) -> int:
        try:
            with open(self.done_path) as handle:
                return int(handle.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def mark_done(self, count: int) -> None:
        atomic_write_text(self.done_path, str(count))

    def count(self) -> int:
        return len(self.ops())

    def pending(self) -> list[dict]:
        return self.ops()[self.done():]

    def clear(self) -> None:
        for path in (self.path, self.done_path):
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(os.path.join(self.run_dir, SPOOL_ARTIFACTS), ignore_errors=True)


def replay_spool(run_dir: str, uri: str = "") -> dict:
    """Send what a run left in ``run_dir/mlflow_spool.jsonl`` (``medmoco tracking-replay``).

    Raises:
        FileNotFoundError: when ``run_dir`` holds no spool.
        ConnectionError: when the store is still unreachable (nothing is lost; run it again).
    """
    spool = Spool(run_dir)
    pending = spool.pending()
    if not pending:
        raise FileNotFoundError(f"{run_dir}: no spooled MLflow calls ({SPOOL_FILE} missing or all sent)")
    from .tracker import MlflowTracker

    tracker = MlflowTracker(uri or pending[0].get("uri", ""), "", run_dir=run_dir, start=False)
    if not tracker._flush():
        raise ConnectionError(f"MLflow at {tracker.uri} is still unreachable; {len(spool.pending())} calls kept "
                              f"in {spool.path}")
    return {"sent": len(pending), "run_id": tracker.run_id, "uri": tracker.uri}
