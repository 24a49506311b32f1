"""MLflow tracking in one place; imported lazily so the library works without MLflow.

Only rank 0 tracks (every rank logging gives duplicate runs). Runs are addressed by id through
``MlflowClient`` rather than ``mlflow.start_run`` so that a resumed job reattaches to its own run
(``run_dir/mlflow_run_id``) and never to some other unfinished run (MONAI#6415).

Where MLflow lives: ``--tracking-uri`` / ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else
the embedded default ``sqlite:///mlflow.db`` in the working directory, with artifacts in
``./mlartifacts`` beside it (MLflow 3 refuses the plain file store unless
``MLFLOW_ALLOW_FILE_STORE=true``; the registry needs a database store).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Mapping

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str = "") -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])  # pin to the working directory
    return uri


def _artifact_root(uri: str, experiment: str) -> str | None:
    if uri.startswith("sqlite:///"):
        base = os.path.dirname(uri[len("sqlite:///"):])
        return "file://" + os.path.join(base, "mlartifacts", experiment)
    return None  # a server decides


class NullTracker:
    """What ranks > 0 (and runs with tracking disabled) get: every call is a no-op."""

    run_id = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def metric_history(self, keys) -> dict: return {}


class MlflowTracker(NullTracker):
    """One MLflow run: params, metrics, tags, artifacts; reattaches to ``run_id`` when given."""

    def __init__(self, uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 tags: Mapping[str, Any] | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                experiment, artifact_location=_artifact_root(self.uri, experiment))
            run = self.client.create_run(exp_id, run_name=run_name or None,
                                         tags={k: str(v) for k, v in (tags or {}).items()})
            self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def metric_history(self, keys) -> dict:
        """``{key: [(step, value), ...]}`` as logged in this run."""
        return {k: sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, k)) for k in keys}


def create_tracker(enabled: bool, uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                   tags: Mapping[str, Any] | None = None) -> NullTracker:
    """An :class:`MlflowTracker` on rank 0 when enabled, a :class:`NullTracker` elsewhere."""
    import ignite.distributed as idist

    if not enabled or idist.get_rank() != 0:
        return NullTracker()
    return MlflowTracker(uri, experiment, run_name, run_id, tags)
