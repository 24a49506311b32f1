"""The admin's policy for a registry: which names are protected, each released model's
non-inferiority margin, and who holds which role.

It is kept as tags of the experiment ``medmoco-policy``, which `medmoco registry roles` creates as
the admin: its creator (MANAGE) and admins may write it, every role only reads it, and the
``medmoco-auth`` server app refuses its rename or deletion. The margin is policy rather than a
flag because whoever promotes should not choose the bar the candidate must clear: a promotion
under another margin is recorded as forced, with its reason (:mod:`.release`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .names import POLICY_EXPERIMENT

DEFAULT_MARGIN = 0.005
PROTECTED_TAG = "medmoco.protected_models"  # JSON list of registered model names
MARGIN_TAG = "medmoco.margin."  # + released name
ROLE_TAG = "medmoco.role."  # + user name


@dataclass
class Policy:
    margin: float
    source: str  # who set it, in words


def policy_tags(client) -> dict:
    found = client.get_experiment_by_name(POLICY_EXPERIMENT)
    return dict(found.tags) if found is not None else {}


def read_policy(client, released: str) -> Policy:
    tags = policy_tags(client)
    if MARGIN_TAG + released in tags:
        return Policy(float(tags[MARGIN_TAG + released]), f"set by the admin in {POLICY_EXPERIMENT}")
    return Policy(DEFAULT_MARGIN, f"medmoco's default; no admin has set one in {POLICY_EXPERIMENT}")


def protected_models(tags: dict) -> set[str]:
    try:
        return set(json.loads(tags.get(PROTECTED_TAG, "[]")))
    except ValueError:
        return set()
