"""The names a lab's registry is built from: registered models, experiments, the acting user.

Two registered models (MLflow's pattern for promoting across environments): trainers register
versions in ``<name>-candidates``; a promotion copies the compared files of a candidate into a
release run and registers them as a version of ``<name>``, where users load
``models:/<name>@champion``.
"""
from __future__ import annotations

import getpass
import os

MODEL_NAME = "rsna-ich-moco"
CANDIDATES_SUFFIX = "-candidates"
TRAINING_EXPERIMENTS = ("medmoco-pretrain", "medmoco-finetune", "medmoco-label-efficiency")
# Ad-hoc comparisons (`medmoco review --compare`), logged by trainers and release managers.
REVIEW_EXPERIMENT = "medmoco-review"
# Releases: each promotion's run holds the released files, the comparison they rest on and the
# chained promotion record. Only release managers write here, and a finished run is sealed.
RELEASES_EXPERIMENT = "medmoco-releases"
# The admin's policy (protected names, non-inferiority margins) as experiment tags: only the admin writes.
POLICY_EXPERIMENT = "medmoco-policy"
# Experiments whose names, and whose finished runs, nobody but an admin may change.
PROTECTED_EXPERIMENTS = (REVIEW_EXPERIMENT, RELEASES_EXPERIMENT, POLICY_EXPERIMENT)


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
