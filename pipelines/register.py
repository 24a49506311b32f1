"""Stage `medmoco register`: a finished `medmoco finetune` run's selected model into the registry
as a candidate (:mod:`medmoco.registry.candidates`). Reviewing and promoting versions is
`medmoco review` (:mod:`pipelines.review`).
"""
from __future__ import annotations

import argparse

from medmoco.registry.candidates import register  # noqa: F401  (the stage's one call; tests import it here)
from medmoco.registry.names import MODEL_NAME


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_id", required=True, help="run id of a finished `medmoco finetune`")
    parser.add_argument("--name", default=MODEL_NAME)
    parser.add_argument("--alias", default="candidate")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default="")


def run_register(args: argparse.Namespace) -> int:
    result = register(args.run_id, args.name, args.alias, args.tracking_uri)
    print(f"registered {result['name']} version {result['version']}"
          + (f" with alias {args.alias}: models:/{result['name']}@{args.alias}" if args.alias else "")
          + f"; `medmoco review --name {args.name} --promote {result['version']} --cache CACHE` compares it with "
            f"{args.name}@champion on the cache's test split and releases it if it is non-inferior")
    return 0
