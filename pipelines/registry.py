"""Stage `medmoco registry roles`: the roles of a lab's shared registry, declared through MLflow's
own authentication (``mlflow server --app-name medmoco-auth``; :mod:`medmoco.registry.access`).

    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
        medmoco registry roles --name rsna-ich-moco --trainers alice,bob --release-managers carol \\
            --reviewers dave [--remove eve] [--margin 0.005] --tracking-uri http://mlflow.lab:5000
"""
from __future__ import annotations

import argparse

from medmoco.registry.names import MODEL_NAME


def _users(text: str) -> list[str]:
    return [u.strip() for u in (text or "").split(",") if u.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="registry_command", required=True)
    roles = sub.add_parser("roles", help="declare trainers, release managers and reviewers (run with admin "
                                         "credentials; running it again with the same users changes nothing)")
    roles.add_argument("--name", default=MODEL_NAME, help="registered model (its candidates live in NAME-candidates)")
    roles.add_argument("--trainers", default="", help="comma-separated users")
    roles.add_argument("--release-managers", dest="release_managers", default="", help="comma-separated users")
    roles.add_argument("--reviewers", default="", help="comma-separated users")
    roles.add_argument("--remove", default="", help="comma-separated users: revoke every grant medmoco made them")
    roles.add_argument("--margin", type=float, default=None,
                       help="the non-inferiority margin (mean AUC) a promotion into NAME must meet (policy)")
    roles.add_argument("--tracking-uri", dest="tracking_uri", default="")


def run(args: argparse.Namespace) -> int:
    from medmoco.registry.access import apply_roles
    from medmoco.registry.review import format_table
    from medmoco.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    table = apply_roles(uri, args.name, _users(args.trainers), _users(args.release_managers), _users(args.reviewers),
                        _users(args.remove), args.margin)
    print(format_table(table) if table else "(no user holds a role)")
    removed = _users(args.remove)
    print(f"{len(table)} users hold a role on {args.name} at {uri}" + (f"; removed: {', '.join(removed)}" if removed else "")
          + ". Every user of the server can list all users and their grants (MLflow's users/list).")
    return 0
