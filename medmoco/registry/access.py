"""Who may do what in a lab's shared registry, with MLflow's own access control.

MLflow's built-in authentication (``pip install mlflow[auth]``, ``mlflow server --app-name
basic-auth``) keeps users and READ / EDIT / MANAGE permissions per experiment and per registered
model, and refuses a call without the permission it needs with HTTP 403. medmoco writes no access
control of its own: :func:`apply_roles` grants the permissions of three roles through MLflow's auth
client, and :func:`explain_denied` turns a refusal into one line that names the user, the missing
permission and the resource.

Two registered models (MLflow's pattern for promoting across environments): trainers register
versions in ``<name>-candidates``; a promotion releases one into ``<name>`` (:mod:`.release`),
where users load ``models:/<name>@champion``.

=============== ========== ================== =================== ================ ============== =========
role            training   ``medmoco-review`` ``medmoco-releases`` ``medmoco-policy`` candidates     ``<name>``
=============== ========== ================== =================== ================ ============== =========
trainer         EDIT       EDIT               READ                READ             EDIT           READ
release manager READ       EDIT               EDIT                READ             EDIT           EDIT
reviewer        READ       READ               READ                READ             READ           READ
=============== ========== ================== =================== ================ ============== =========

Release managers may write candidates because a comparison tags both versions it compared
(``last_comparison_run``); only they may write ``<name>`` and ``medmoco-releases``, so only they
can release and move ``champion``. What MLflow's levels cannot say (EDIT includes renaming; the
files of a registered version stay writable) the ``medmoco-auth`` server app adds (:mod:`.auth_app`).

Credentials come as MLflow takes them (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
or ``MLFLOW_TRACKING_TOKEN``); medmoco reads only the user name, to name who promoted.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterator

from dicom_preprocess.config import ConfigError

from .names import (POLICY_EXPERIMENT, PROTECTED_EXPERIMENTS, RELEASES_EXPERIMENT, REVIEW_EXPERIMENT,
                    TRAINING_EXPERIMENTS, candidates_name, released_name)


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


ROLES = {
    # role: (training experiments, medmoco-review, medmoco-releases, medmoco-policy, candidates, released)
    "trainer": ("EDIT", "EDIT", "READ", "READ", "EDIT", "READ"),
    "release manager": ("READ", "EDIT", "EDIT", "READ", "EDIT", "EDIT"),
    "reviewer": ("READ", "READ", "READ", "READ", "READ", "READ"),
}
MAY = {
    "trainer": "train and log runs; register candidates; compare (medmoco-review); load releases",
    "release manager": "read training runs; compare; promote candidates into NAME (policy margin); load releases",
    "reviewer": "read runs, candidates, comparisons, releases and their history; load models",
}


def roles_plan(name: str, assignments: dict[str, str]) -> list[tuple]:
    """The grants of each user's role: ``(user, resource type, resource, permission)``; an
    experiment is named here and resolved to its id when applied."""
    candidates, released = candidates_name(name), released_name(name)
    plan = []
    for user, role in assignments.items():
        training, review, releases, policy, cand, rel = ROLES[role]
        plan += [(user, "experiment", e, training) for e in TRAINING_EXPERIMENTS]
        plan += [(user, "experiment", REVIEW_EXPERIMENT, review), (user, "experiment", RELEASES_EXPERIMENT, releases),
                 (user, "experiment", POLICY_EXPERIMENT, policy),
                 (user, "registered_model", candidates, cand), (user, "registered_model", released, rel)]
    return plan


def _managed(name: str) -> list[tuple[str, str]]:
    return [("experiment", e) for e in TRAINING_EXPERIMENTS + PROTECTED_EXPERIMENTS] + \
        [("registered_model", candidates_name(name)), ("registered_model", released_name(name))]


def _grant(auth, user: str, kind: str, resource: str, permission: str) -> None:
    """Give ``user`` exactly ``permission`` on the resource, whatever it had (a declaration, not an addition)."""
    try:
        auth.grant_user_permission(user, kind, resource, permission)
    except Exception as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(err, "error_code", "")) and "already exists" not in str(err):
            raise
        auth.revoke_user_permission(user, kind, resource)
        auth.grant_user_permission(user, kind, resource, permission)


def _revoke(auth, user: str, kind: str, resource: str) -> None:
    try:
        auth.revoke_user_permission(user, kind, resource)
    except Exception as err:
        if is_permission_denied(err):
            raise


def apply_roles(tracking_uri: str, name: str, trainers: list[str], release_managers: list[str],
                reviewers: list[str], remove: list[str] = (), margin: float | None = None) -> list[dict]:
    """Declare the roles of the named users on ``name``'s registry, through MLflow's auth client.

    Idempotent: the same call twice changes nothing. A user named with another role than before gets
    that role's grants and loses the others; ``remove`` revokes every grant medmoco made to a user.
    Users not named keep what they have. Also creates what the grants refer to (the experiments and
    both registered models, so that no trainer becomes the owner of ``<name>`` by registering first)
    and writes the policy (:mod:`.policy`): the protected names, the roles, and ``margin`` if given.
    Run with admin credentials.

    Returns:
        the resulting table, one row per user holding a role: ``{"user", "role", "may"}``.

    Raises:
        PermissionRefused: when the caller is not an admin of the server.
        ConfigError: when the server has no authentication (nothing to grant), a user is missing or
            given two roles.
    """
    from mlflow.server import get_app_client

    from medmoco.tracking.store import client as mlflow_client

    from .policy import MARGIN_TAG, PROTECTED_TAG, ROLE_TAG, policy_tags, protected_models

    if not tracking_uri.startswith(("http://", "https://")):
        raise ConfigError(f"tracking URI {tracking_uri}: roles need an `mlflow server --app-name medmoco-auth`; "
                          "an embedded store has no users")
    assignments: dict[str, str] = {}
    for role, users in (("trainer", trainers), ("release manager", release_managers), ("reviewer", reviewers)):
        for user in users:
            if user in assignments:
                raise ConfigError(f"user {user} is given two roles ({assignments[user]}, {role}); give each user one")
            assignments[user] = role
    both = set(assignments) & set(remove)
    if both:
        raise ConfigError(f"users {sorted(both)} are both given a role and removed")
    if margin is not None and not 0 <= margin < 1:
        raise ConfigError(f"--margin {margin}: a non-inferiority margin in mean AUC lies in [0, 1)")
    client = mlflow_client(tracking_uri)
    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    with explain_denied("manage", f"the users and permissions of {tracking_uri}", "admin", "run it as an admin"):
        for user in sorted(assignments):
            try:
                auth.get_user(user)
            except Exception as err:
                if is_permission_denied(err):
                    raise
                raise ConfigError(f"user {user}: not a user of {tracking_uri}; create it first "
                                  "(mlflow.server.get_app_client('basic-auth', ...).create_user)") from None
        ids = {}
        for experiment in TRAINING_EXPERIMENTS + PROTECTED_EXPERIMENTS:
            found = client.get_experiment_by_name(experiment)
            ids[experiment] = found.experiment_id if found else client.create_experiment(experiment)
        for model in (candidates_name(name), released_name(name)):
            try:
                client.get_registered_model(model)
            except Exception as err:
                if is_permission_denied(err):
                    raise
                client.create_registered_model(model)
        for user, kind, resource, permission in roles_plan(name, assignments):
            _grant(auth, user, kind, ids.get(resource, resource) if kind == "experiment" else resource, permission)
        for user in remove:
            for kind, resource in _managed(name):
                _revoke(auth, user, kind, ids.get(resource, resource) if kind == "experiment" else resource)
        policy_id = ids[POLICY_EXPERIMENT]
        tags = policy_tags(client)
        protected = sorted(protected_models(tags) | {candidates_name(name), released_name(name)})
        client.set_experiment_tag(policy_id, PROTECTED_TAG, json.dumps(protected))
        if margin is not None:
            client.set_experiment_tag(policy_id, MARGIN_TAG + released_name(name), f"{margin:g}")
        for user, role in assignments.items():
            client.set_experiment_tag(policy_id, ROLE_TAG + user, role)
        for user in remove:
            if ROLE_TAG + user in tags:
                client.delete_experiment_tag(policy_id, ROLE_TAG + user)
        tags = policy_tags(client)
    return [{"user": key[len(ROLE_TAG):], "role": role, "may": MAY[role].replace("NAME", released_name(name))}
            for key, role in sorted(tags.items()) if key.startswith(ROLE_TAG) and role in MAY]
