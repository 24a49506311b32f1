"""``mlflow server --app-name medmoco-auth``: MLflow's basic-auth app with the rules a release needs.

MLflow's permissions (READ / EDIT / MANAGE per experiment and registered model) cannot say what a
lab's release process needs: EDIT includes renaming a registered model (a trainer renames
``<name>-candidates``, re-creates the name and owns it), and whoever may write an experiment may
replace the files of any run or logged model in it, also those a registered version points to.
This app keeps basic-auth whole (users, grants, its own checks all still run) and refuses, for
everyone but an admin:

* renaming or deleting the protected registered models (``<name>``, ``<name>-candidates``, listed
  in the policy by `medmoco registry roles`) and deleting their versions;
* renaming or deleting the experiments that hold review evidence, releases and the policy
  (``medmoco-review``, ``medmoco-releases``, ``medmoco-policy``);
* any write to a *finished* run of those experiments (files, tags, metrics, status): a release run
  or a comparison is sealed once it ends;
* any change to the files of a logged model once it is READY (finalized): a registered version's
  files, candidate or released, stay the files that were registered.

MLflow loads the app from the ``mlflow.app`` entry point group (`setup.cfg`). Under uvicorn (the
default) basic-auth's factory returns a FastAPI app whose artifact GET/PUT routes are served by
FastAPI and skip the Flask hooks, so the rules run as an ASGI middleware in front of the whole app;
under waitress/gunicorn the Flask app serves everything and they run as a Flask ``before_request``.
A refusal is HTTP 403 with ``PERMISSION_DENIED``, as MLflow's own.

Stores are reached through MLflow's server module (``mlflow.server.handlers._get_tracking_store``,
``mlflow.server.auth.store``): private names, but the same objects the server itself uses.
"""
from __future__ import annotations

import base64
import json
import re
from urllib.parse import parse_qs, unquote

from .names import PROTECTED_EXPERIMENTS, POLICY_EXPERIMENT
from .policy import protected_models

_REST = re.compile(r"/(?:api|ajax-api)/[23]\.0/mlflow/(?P<endpoint>.+)$")
_ARTIFACTS = re.compile(r"/(?:api|ajax-api)/2\.0/mlflow-artifacts/(?:artifacts|mpu/(?:create|complete|abort))/"
                        r"(?P<path>.+)$")
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def _stores():
    from mlflow.server.handlers import _get_tracking_store

    return _get_tracking_store()


def _is_admin(username: str | None) -> bool:
    if not username:
        return False
    from mlflow.server.auth import store as auth_store

    try:
        return bool(auth_store.get_user(username).is_admin)
    except Exception:
        return False


def _username(authorization: str | None) -> str | None:
    """The user a Basic ``Authorization`` header claims. Only to let an admin through: a wrong
    password is refused by basic-auth itself, which runs after these rules."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        return base64.b64decode(authorization.split(None, 1)[1]).decode().split(":", 1)[0]
    except Exception:
        return None


def _protected_names(tracking) -> set[str]:
    try:
        policy = tracking.get_experiment_by_name(POLICY_EXPERIMENT)
    except Exception:
        return set()
    return protected_models(dict(policy.tags)) if policy is not None else set()


def _experiment_name(tracking, experiment_id) -> str:
    try:
        return tracking.get_experiment(str(experiment_id)).name
    except Exception:
        return ""


def _sealed_run(tracking, run_id: str) -> str | None:
    try:
        run = tracking.get_run(run_id)
    except Exception:
        return None
    name = _experiment_name(tracking, run.info.experiment_id)
    if name in PROTECTED_EXPERIMENTS and run.info.status != "RUNNING":
        return f"run {run_id} of experiment {name} is {run.info.status}: a finished run there is sealed"
    return None


def _sealed_model(tracking, model_id: str) -> str | None:
    try:
        model = tracking.get_logged_model(model_id)
    except Exception:
        return None
    if str(getattr(model.status, "name", model.status)).upper().endswith("READY"):
        return f"logged model {model_id} is finalized (READY): its files are sealed"
    return None


def refusal(method: str, path: str, params: dict, username: str | None) -> str | None:
    """Why the request must be refused (None: leave it to basic-auth).

    Args:
        params: the request's JSON body and query parameters, merged.
    """
    if method.upper() in _READS or _is_admin(username):
        return None
    artifact = _ARTIFACTS.search(path)
    rest = _REST.search(path)
    if not artifact and not rest:
        return None
    tracking = _stores()
    if artifact:
        parts = unquote(artifact.group("path")).strip("/").split("/")
        if len(parts) >= 3 and parts[1] == "models":
            return _sealed_model(tracking, parts[2])
        if len(parts) >= 2:
            return _sealed_run(tracking, parts[1])
        return None
    endpoint = rest.group("endpoint").rstrip("/")
    if endpoint.startswith("registered-models/") or endpoint.startswith("model-versions/delete"):
        names = {str(params.get(k)) for k in ("name", "new_name") if params.get(k)}
        hit = names & _protected_names(tracking)
        if hit and endpoint in ("registered-models/rename", "registered-models/update-name",
                                "registered-models/delete", "model-versions/delete"):
            what = "deleting versions of" if endpoint == "model-versions/delete" else "renaming or deleting"
            return f"{what} the protected registered model {sorted(hit)[0]} is for admins only"
        return None
    if endpoint in ("experiments/update", "experiments/delete"):
        name = _experiment_name(tracking, params.get("experiment_id", ""))
        if name in PROTECTED_EXPERIMENTS:
            return f"renaming or deleting the protected experiment {name} is for admins only"
        return None
    if endpoint.startswith("runs/") and endpoint != "runs/create":
        run_id = params.get("run_id") or params.get("run_uuid")
        return _sealed_run(tracking, str(run_id)) if run_id else None
    if endpoint.startswith("logged-models/") and method.upper() == "DELETE":
        return _sealed_model(tracking, endpoint.split("/")[1])
    return None


def _message(reason: str) -> bytes:
    return json.dumps({"error_code": "PERMISSION_DENIED",
                       "message": f"Permission denied (medmoco-auth): {reason}"}).encode()


def _params(body: bytes, query: str) -> dict:
    params = {k: v[0] for k, v in parse_qs(query).items()}
    if body:
        try:
            data = json.loads(body)
            if isinstance(data, dict):
                params.update(data)
        except ValueError:
            pass
    return params


class MedmocoRules:
    """ASGI middleware: :func:`refusal` in front of the whole app (FastAPI routes and the Flask mount)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in _READS:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        messages, body = [], b""
        if _REST.search(path):  # small JSON bodies: read, then replayed to the app
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] == "http.request":
                    body += message.get("body", b"")
                    if not message.get("more_body"):
                        break
                else:
                    break
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        params = _params(body, scope.get("query_string", b"").decode())
        import anyio

        reason = await anyio.to_thread.run_sync(refusal, scope["method"], path, params,
                                                _username(headers.get("authorization")))
        if reason:
            payload = _message(reason)
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay if messages else receive, send)


def create_app(app=None):
    """The factory ``mlflow server --app-name medmoco-auth`` calls."""
    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as basic_auth_app

    inner = basic_auth_app(app or flask_app)
    if hasattr(inner, "add_middleware"):  # FastAPI (uvicorn)
        inner.add_middleware(MedmocoRules)
        return inner

    from flask import Response, request

    def _rules():
        params = _params(request.get_data(cache=True) if request.is_json else b"", request.query_string.decode())
        reason = refusal(request.method, request.path, params, _username(request.headers.get("Authorization")))
        if reason:
            return Response(_message(reason), status=403, mimetype="application/json")
        return None

    inner.before_request_funcs.setdefault(None, []).insert(0, _rules)
    return inner
