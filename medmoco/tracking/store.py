"""Where MLflow lives, and the one place that turns ``runs:/`` and ``models:/`` URIs into files.

``--tracking-uri`` / ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the embedded default
``sqlite:///mlflow.db`` in the working directory, with artifacts in ``./mlartifacts`` beside it
(MLflow 3 refuses the plain file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; the registry needs
a database store). MLflow is imported lazily: the library works without it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow's REST client retries 7 times with exponential backoff and a 120 s timeout by default:
# minutes of a stalled training step per call while a server is down. The tracker asks for
# less unless the user set these variables (they are read by MLflow at every request).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# MLflow draws a tqdm bar for every artifact download (three per registration); a job's log is
# not the place for them. Set the variable to true to see them.
QUIET_DEFAULTS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def quiet_defaults() -> None:
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)


def resolve_tracking_uri(uri: str = "") -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])  # pin to the working directory
    return uri


@contextmanager
def tracking_uri_scope(uri: str) -> Iterator[str]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``register_model``, ``models:/`` downloads)
    at ``uri`` for a block, tracking and registry both.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` also write ``MLFLOW_TRACKING_URI`` /
    ``MLFLOW_REGISTRY_URI`` into ``os.environ`` (so that subprocesses inherit them), and MLflow has
    no public way to unset them: a stage that set them and returned would redirect every later
    command of the same process and its children. This restores the variables and MLflow's own
    module-level settings (private names; with a MLflow that lacks them, the public setters).
    """
    import mlflow

    try:
        import mlflow.tracking._model_registry.utils as registry_state
        import mlflow.tracking._tracking_service.utils as tracking_state
    except ImportError:  # pragma: no cover - another MLflow layout
        registry_state = tracking_state = None
    env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (getattr(tracking_state, "_tracking_uri", None), getattr(registry_state, "_registry_uri", None))
    public = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    resolved = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    try:
        yield resolved
    finally:
        if tracking_state is not None and hasattr(tracking_state, "_tracking_uri") and \
                hasattr(registry_state, "_registry_uri"):
            tracking_state._tracking_uri, registry_state._registry_uri = saved
        else:  # pragma: no cover
            mlflow.set_tracking_uri(public[0])
            mlflow.set_registry_uri(public[1])
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(uri: str = ""):
    """An ``MlflowClient`` for tracking and registry at ``uri`` (resolved as above)."""
    from mlflow.tracking import MlflowClient

    from .relocate import check_not_moved

    resolved = resolve_tracking_uri(uri)
    check_not_moved(resolved)  # a copied store would write into the original's files
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment of the embedded store keeps artifacts (``mlartifacts/`` beside the
    database); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        base = os.path.dirname(uri[len("sqlite:///"):])
        return "file://" + os.path.join(base, "mlartifacts", experiment)
    return None


def is_unreachable(err: BaseException) -> bool:
    """True when ``err`` says the store could not be reached (as opposed to refusing the call)."""
    try:
        import requests

        if isinstance(err, requests.exceptions.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests comes with mlflow
        pass
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = str(err)
    if type(err).__name__ == "MlflowException":
        # the REST store wraps connection errors, timeouts and exhausted retries this way
        return ("API request to" in text and "failed with exception" in text) or "TEMPORARILY_UNAVAILABLE" in text \
            or "status code 50" in text
    return type(err).__name__ == "OperationalError"  # sqlalchemy: database locked or gone


def fetch_artifact(spec: str, filename: str, run_subpath: str, tracking_uri: str = "") -> str:
    """A local copy of the file ``filename`` that an MLflow URI names.

    Args:
        spec: ``runs:/ID`` (means ``runs:/ID/<run_subpath>``), ``runs:/ID/<path>``,
            ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the file is looked for in the
            registered model's artifacts).
        filename: the file wanted (``model.pt``, ``backbone.pt``).
        run_subpath: where a run keeps it (``model/model.pt``, ``backbone/backbone.pt``).

    Raises:
        LookupError: naming the URI and the reason, when it cannot be fetched or holds no such file.
    """
    import mlflow

    quiet_defaults()
    uri = spec
    if spec.startswith("runs:/") and len(spec[len("runs:/"):].strip("/").split("/")) == 1:
        uri = f"{spec.rstrip('/')}/{run_subpath}"
    store = resolve_tracking_uri(tracking_uri)
    try:
        # A models:/ URI is resolved by MLflow's registry client of the process-wide registry URI,
        # whatever download_artifacts is passed: scope both URIs to this store for the call.
        with tracking_uri_scope(store):
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=store, registry_uri=store)
    except Exception as err:
        raise LookupError(f"cannot fetch {uri} from MLflow at {store} ({str(err)[:200]})") from None
    if os.path.isfile(local):
        return local
    for dirpath, _, files in os.walk(local):
        if filename in files:
            return os.path.join(dirpath, filename)
    raise LookupError(f"{uri} holds no {filename}")
