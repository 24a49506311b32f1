"""Stage `medmoco registry roles`: the permissions of a lab's shared registry, set through MLflow's
own authentication (``mlflow server --app-name basic-auth``; :mod:`medmoco.tracking.access`).

    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
        medmoco registry roles --name rsna-ich-moco --trainers alice,bob --release-managers carol \\
            --reviewers dave --tracking-uri http://mlflow.lab:5000
"""
from __future__ import annotations

import argparse

from .register import MODEL_NAME


def _users(text: str) -> list[str]:
    return [u.strip() for u in (text or "").split(",") if u.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="registry_command", required=True)
    roles = sub.add_parser("roles", help="grant trainers, release managers and reviewers their permissions "
                                         "(run with admin credentials)")
    roles.add_argument("--name", default=MODEL_NAME, help="registered model (its candidates live in NAME-candidates)")
    roles.add_argument("--trainers", default="", help="comma-separated users")
    roles.add_argument("--release-managers", dest="release_managers", default="", help="comma-separated users")
    roles.add_argument("--reviewers", default="", help="comma-separated users")
    roles.add_argument("--tracking-uri", dest="tracking_uri", default="")


def run(args: argparse.Namespace) -> int:
    from medmoco.tracking import resolve_tracking_uri
    from medmoco.tracking.access import apply_roles

    uri = resolve_tracking_uri(args.tracking_uri)
    plan = apply_roles(uri, args.name, _users(args.trainers), _users(args.release_managers), _users(args.reviewers))
    width = max((len(user) for user, *_ in plan), default=4)
    for user, kind, resource, permission in plan:
        print(f"{user:<{width}}  {permission:<5} {kind.replace('_', ' ')} {resource}")
    print(f"{len(plan)} permissions set on {uri}")
    return 0
