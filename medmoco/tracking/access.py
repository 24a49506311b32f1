"""Who may do what in a lab's shared registry, with MLflow's own access control.

MLflow's built-in authentication (``pip install mlflow[auth]``, ``mlflow server --app-name
basic-auth``) keeps users and READ / EDIT / MANAGE permissions per experiment and per registered
model, and refuses a call without the permission it needs with HTTP 403. medmoco writes no access
control of its own: :func:`apply_roles` grants the permissions of three roles through MLflow's auth
client, and :func:`explain_denied` turns a refusal into one line that names the user, the missing
permission and the resource.

Two registered models (MLflow's pattern for promoting across environments): trainers register
versions in ``<name>-candidates``; promotion copies a version into ``<name>``, where users load
``models:/<name>@champion``.

================ ======================================== =========================== ================
role             training experiments, ``medmoco-review`` ``<name>-candidates``       ``<name>``
================ ======================================== =========================== ================
trainer          EDIT (runs; comparisons)                 EDIT (register, aliases)    READ
release manager  READ; EDIT on ``medmoco-review``         EDIT (comparison tags)      EDIT (promote)
reviewer         READ                                     READ                        READ
================ ======================================== =========================== ================

Release managers may write candidates because a comparison tags both versions it compared
(``last_comparison_run``); only they may write ``<name>``, so only they can move ``champion``.

Credentials come as MLflow takes them (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
or ``MLFLOW_TRACKING_TOKEN``); medmoco reads only the user name, to name who promoted.
"""
from __future__ import annotations

import getpass
import os
from contextlib import contextmanager
from typing import Iterator

from dicom_preprocess.config import ConfigError

CANDIDATES_SUFFIX = "-candidates"
TRAINING_EXPERIMENTS = ("medmoco-pretrain", "medmoco-finetune", "medmoco-label-efficiency")
REVIEW_EXPERIMENT = "medmoco-review"


def candidates_name(name: str) -> str:
    """The registered model that holds ``name``'s candidate versions."""
    return name if name.endswith(CANDIDATES_SUFFIX) else name + CANDIDATES_SUFFIX


def released_name(name: str) -> str:
    return name[: -len(CANDIDATES_SUFFIX)] if name.endswith(CANDIDATES_SUFFIX) else name


def current_user() -> str:
    """The user a call authenticates as: ``MLFLOW_TRACKING_USERNAME`` on a server with
    authentication; else the operating-system user (an embedded store has no users)."""
    name = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if name:
        return name
    try:
        return f"{getpass.getuser()} (local user; the store has no authentication)"
    except Exception:  # no passwd entry (containers)
        return "unknown (local user; the store has no authentication)"


class PermissionRefused(ConfigError):
    """MLflow refused a call for lack of permission (exit 2, one line)."""


def is_permission_denied(err: BaseException) -> bool:
    code = getattr(err, "error_code", "")
    text = str(err)
    return code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or "403" in text and "ermission" in text


@contextmanager
def explain_denied(action: str, resource: str, needs: str, advice: str) -> Iterator[None]:
    """Turn MLflow's refusal of the calls in the block into :class:`PermissionRefused`, e.g.
    ``user trainer1 may not write registered model rsna-ich-moco (needs EDIT; ask a release manager)``.
    """
    try:
        yield
    except Exception as err:
        if not is_permission_denied(err):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "") or "anonymous"
        if getattr(err, "error_code", "") == "UNAUTHENTICATED":
            raise PermissionRefused(f"user {user} is not authenticated by the tracking server (check "
                                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)") from None
        raise PermissionRefused(f"user {user} may not {action} {resource} (needs {needs}; {advice})") from None


def roles_plan(name: str, trainers: list[str], release_managers: list[str], reviewers: list[str]) -> list[tuple]:
    """The grants of the three roles: ``(user, resource type, resource, permission)``; an
    experiment is named here and resolved to its id when applied."""
    candidates, released = candidates_name(name), released_name(name)
    plan = []
    for user in trainers:
        plan += [(user, "experiment", e, "EDIT") for e in TRAINING_EXPERIMENTS + (REVIEW_EXPERIMENT,)]
        plan += [(user, "registered_model", candidates, "EDIT"), (user, "registered_model", released, "READ")]
    for user in release_managers:
        plan += [(user, "experiment", e, "READ") for e in TRAINING_EXPERIMENTS]
        plan += [(user, "experiment", REVIEW_EXPERIMENT, "EDIT"), (user, "registered_model", candidates, "EDIT"),
                 (user, "registered_model", released, "EDIT")]
    for user in reviewers:
        plan += [(user, "experiment", e, "READ") for e in TRAINING_EXPERIMENTS + (REVIEW_EXPERIMENT,)]
        plan += [(user, "registered_model", candidates, "READ"), (user, "registered_model", released, "READ")]
    return plan


def apply_roles(tracking_uri: str, name: str, trainers: list[str], release_managers: list[str],
                reviewers: list[str]) -> list[tuple]:
    """Create what the grants refer to (the experiments and both registered models, so that no
    trainer becomes the owner of ``<name>`` by registering first) and grant the roles' permissions
    through MLflow's auth client. Run with admin credentials. Returns the grants made.

    Raises:
        PermissionRefused: when the caller is not an admin of the server.
        ConfigError: when the server has no authentication (nothing to grant), or a user is missing.
    """
    from mlflow.server import get_app_client

    from .store import client as mlflow_client

    if not tracking_uri.startswith(("http://", "https://")):
        raise ConfigError(f"tracking URI {tracking_uri}: roles need an `mlflow server --app-name basic-auth`; "
                          "an embedded store has no users")
    overlap = (set(trainers) & set(release_managers)) | (set(trainers) & set(reviewers)) | \
        (set(release_managers) & set(reviewers))
    if overlap:
        raise ConfigError(f"users {sorted(overlap)} are given two roles; give each user one")
    client = mlflow_client(tracking_uri)
    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    plan = roles_plan(name, trainers, release_managers, reviewers)
    with explain_denied("manage", f"the users and permissions of {tracking_uri}", "admin", "run it as an admin"):
        for user in sorted({grant[0] for grant in plan}):
            try:
                auth.get_user(user)
            except Exception as err:
                if is_permission_denied(err):
                    raise
                raise ConfigError(f"user {user}: not a user of {tracking_uri}; create it first "
                                  "(mlflow.server.get_app_client('basic-auth', ...).create_user)") from None
        ids = {}
        for experiment in TRAINING_EXPERIMENTS + (REVIEW_EXPERIMENT,):
            found = client.get_experiment_by_name(experiment)
            ids[experiment] = found.experiment_id if found else client.create_experiment(experiment)
        for model in (candidates_name(name), released_name(name)):
            try:
                client.get_registered_model(model)
            except Exception as err:
                if is_permission_denied(err):
                    raise
                client.create_registered_model(model)
        for user, kind, resource, permission in plan:
            auth.grant_user_permission(user, kind, ids.get(resource, resource) if kind == "experiment" else resource,
                                       permission)
    return plan
