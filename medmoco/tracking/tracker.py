"""The MLflow run of a job: one tracker per job on rank 0, resilient to a store that goes away.

Only rank 0 tracks (every rank logging gives duplicate runs). Runs are addressed by id through
``MlflowClient`` rather than ``mlflow.start_run`` so that a resumed job reattaches to its own run
(``run_dir/mlflow_run_id``) and never to some other unfinished run (MONAI#6415).

A tracking server that goes away must not stop a multi-day job. When a call cannot reach the
store, the tracker warns once, appends the call to ``run_dir/mlflow_spool.jsonl`` and goes on;
every ``retry_s`` seconds it tries the store again and, once it answers, replays the spool in
order (metrics keep the timestamps and steps of when they were logged). Whatever is still
spooled when the job ends is replayed by ``medmoco tracking-replay --run-dir RUN_DIR``. A store
unreachable at start works the same: the run is created on replay, and ``run_dir/mlflow_run_id``
is written then.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Mapping

from dicom_preprocess.files import atomic_write_text

from .spool import Spool
from .store import HTTP_DEFAULTS, artifact_root, is_unreachable, resolve_tracking_uri

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id"


class NullTracker:
    """What ranks > 0 (and runs with tracking disabled) get: every call is a no-op."""

    run_id = None
    active = False

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def metric_history(self, keys) -> dict: return {}


class MlflowTracker(NullTracker):
    """One MLflow run: params, metrics, tags, artifacts; reattaches to ``run_id`` when given.

    Args:
        uri: tracking URI ("" -> ``MLFLOW_TRACKING_URI`` -> ``sqlite:///mlflow.db``).
        experiment: experiment name (created when missing).
        run_name, tags: of a new run.
        run_id: an existing run to continue (a resumed job).
        run_dir: where ``mlflow_run_id`` and the spool live; without it an unreachable store
            raises instead of spooling.
        retry_s: seconds between attempts to reach a store that went away.
    """

    active = True

    def __init__(self, uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 tags: Mapping[str, Any] | None = None, run_dir: str | None = None, retry_s: float = 30.0,
                 resume: bool = False, start: bool = True):
        from mlflow.tracking import MlflowClient

        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from .relocate import check_not_moved

        self.uri = resolve_tracking_uri(uri)
        check_not_moved(self.uri)  # a copied demo-run/ would log into the original's files
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = experiment
        self.run_dir = run_dir
        self.spool = Spool(run_dir) if run_dir else None
        self.retry_s = retry_s
        self.run_id = run_id
        self._offline_until = 0.0
        self._warned = False
        self._local_history: dict[str, list] = {}
        self._created: str | None = None  # the run a spooled create_run made, for the calls after it
        # Whether calls are waiting in the spool: read from disk once here, then kept in memory, so
        # a long outage does not re-read the growing spool at every call.
        leftover = self.spool.pending() if self.spool else []
        self._spooling = bool(leftover)
        if not start:  # replay only
            return
        pending_creation = False
        if leftover:
            # An earlier process of this run directory left calls behind: they go first.
            pending_creation = any(op["op"] == "create_run" for op in leftover)
            if self._flush():
                pending_creation = False
                if resume and run_id is None:
                    run_id = recorded_run_id(run_dir)
            self.run_id = run_id
        if run_id is not None:
            try:
                self._call({"op": "update_run", "status": "RUNNING"})
            except Exception as err:
                if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                from dicom_preprocess.config import ConfigError

                raise ConfigError(
                    f"{run_dir or 'this run'}: continues MLflow run {run_id}, which {self.uri} does not hold; "
                    "use the tracking URI of the job's first run, or delete "
                    f"{os.path.join(run_dir or '.', RUN_ID_FILE)} to start a new run") from None
        elif not (resume and pending_creation):  # else: continue the run whose creation is spooled
            self._call({"op": "create_run", "experiment": experiment, "run_name": run_name or "",
                        "tags": {k: str(v) for k, v in (tags or {}).items()}})

    # -- the calls -------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call({"op": "log_params", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [[k, float(v), now, int(step)] for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for key, value, _, at in items:
            self._local_history.setdefault(key, []).append((at, value))
        if items:
            self._call({"op": "log_metrics", "metrics": items})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call({"op": "set_tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call({"op": "log_artifact", "path": os.path.abspath(path), "artifact_path": artifact_path})

    def finish(self, status: str = "FINISHED") -> None:
        self._call({"op": "set_terminated", "status": status}, retry_now=True)
        if self._spooling:
            log.warning("MLflow at %s is unreachable: %d tracking calls are kept in %s; send them with "
                        "`medmoco tracking-replay --run-dir %s`", self.uri, len(self.spool.pending()),
                        self.spool.path, self.run_dir)

    def metric_history(self, keys) -> dict:
        """``{key: [(step, value), ...]}`` as logged in this run (this process's values when the
        store cannot be reached)."""
        if self.run_id and not self.offline:
            try:
                return {k: sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, k))
                        for k in keys}
            except Exception as err:
                if not is_unreachable(err):
                    raise
        return {k: sorted(self._local_history.get(k, [])) for k in keys}

    @property
    def offline(self) -> bool:
        return self._spooling

    # -- sending, spooling, replaying ----------------------------------------------------------
    def _call(self, op: dict, retry_now: bool = False) -> None:
        if op["op"] != "create_run":
            op = {**op, "run_id": self.run_id}  # None: the run of the create_run spooled before it
        if self._spooling:
            if retry_now or time.monotonic() >= self._offline_until:
                self._flush()
            if self._spooling:
                self.spool.append({**op, "uri": self.uri})
                return
        try:
            self._apply(op)
        except Exception as err:
            if not (self.spool and is_unreachable(err)):
                raise
            self._go_offline(err)
            self.spool.append({**op, "uri": self.uri})
            self._spooling = True

    def _go_offline(self, err: BaseException) -> None:
        self._offline_until = time.monotonic() + self.retry_s
        if not self._warned:
            log.warning("MLflow at %s is unreachable (%s); training goes on, tracking calls are kept in %s "
                        "and sent when it answers again (retry every %.0f s)", self.uri, str(err)[:160],
                        self.spool.path, self.retry_s)
            self._warned = True

    def _flush(self) -> bool:
        """Send the spooled calls in order; False (and offline again) when the store is still away."""
        ops, done = self.spool.ops(), self.spool.done()
        self._created = self.run_id or recorded_run_id(self.run_dir)
        for index in range(done, len(ops)):
            try:
                self._apply(ops[index])
            except Exception as err:
                if not is_unreachable(err):
                    raise
                self._go_offline(err)
                return False
            self.spool.mark_done(index + 1)
        self.spool.clear()
        self._spooling = False
        if self._warned:
            log.warning("MLflow at %s answers again: %d spooled tracking calls sent", self.uri, len(ops) - done)
            self._warned = False
        return True

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        run_id = op.get("run_id") or self._created or self.run_id
        if kind == "create_run":
            exp = self.client.get_experiment_by_name(op["experiment"])
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                op["experiment"], artifact_location=artifact_root(self.uri, op["experiment"]))
            run = self.client.create_run(exp_id, run_name=op["run_name"] or None, tags=op["tags"])
            self.run_id = self._created = run.info.run_id
            if self.run_dir:
                os.makedirs(self.run_dir, exist_ok=True)
                atomic_write_text(os.path.join(self.run_dir, RUN_ID_FILE), self.run_id)
        elif kind == "update_run":
            self.client.update_run(run_id, status=op["status"])
        elif kind == "log_params":
            # A resumed run logs its params again; MLflow refuses a changed value, so keep the first.
            # (log_batch splits into batches of MLflow's per-request limits itself.)
            existing = self.client.get_run(run_id).data.params
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in op["params"].items() if k not in existing])
        elif kind == "log_metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
            self.client.log_batch(run_id, metrics=metrics)
        elif kind == "set_tags":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "log_artifact":
            self.client.log_artifact(run_id, op["path"], op["artifact_path"])
        elif kind == "set_terminated":
            self.client.set_terminated(run_id, status=op["status"])
        else:
            raise ValueError(f"unknown spooled tracking call {kind!r}")


def create_tracker(enabled: bool, uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                   tags: Mapping[str, Any] | None = None, run_dir: str | None = None,
                   resume: bool = False, retry_s: float = 30.0) -> NullTracker:
    """An :class:`MlflowTracker` on rank 0 when enabled, a :class:`NullTracker` elsewhere.

    With ``run_dir``, calls are spooled there while the store is unreachable, and ``resume``
    continues the run recorded in ``run_dir/mlflow_run_id`` (or the one whose creation is still
    spooled) instead of starting a new one.
    """
    import ignite.distributed as idist

    if not enabled or idist.get_rank() != 0:
        return NullTracker()
    if resume and run_id is None and run_dir:
        run_id = recorded_run_id(run_dir)
    return MlflowTracker(uri, experiment, run_name, run_id, tags, run_dir=run_dir, resume=resume, retry_s=retry_s)


def recorded_run_id(run_dir: str) -> str | None:
    """The MLflow run id a run directory belongs to, if one was created."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if os.path.exists(path):
        return open(path).read().strip() or None
    return None
