"""The `medmoco` command: one subcommand per stage (`python -m medmoco` works the same)."""
from __future__ import annotations

import argparse
import sys

from dicom_preprocess.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from . import evaluate, experiment, export, finetune, preprocess, pretrain, register, registry, review, series

    parser = argparse.ArgumentParser(prog="medmoco", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stages = [
        ("synth", "write a synthetic RSNA-like archive", preprocess.add_synth_arguments, preprocess.run_synth),
        ("preprocess", "DICOM archive -> multi-window CT cache", preprocess.add_arguments, preprocess.run),
        ("preprocess-merge", "join --shard outputs into one cache", preprocess.add_merge_arguments,
         preprocess.run_merge),
        ("split", "new patient-grouped splits for a cache, without decoding again", preprocess.add_split_arguments,
         preprocess.run_split),
        ("pretrain", "MoCo pretraining on the cache (torchrun/srun for DDP)", pretrain.add_arguments, pretrain.run),
        ("finetune", "six-subtype classifier: finetune | linear | scratch", finetune.add_arguments, finetune.run),
        ("series", "series head (GRU over a series' slice embeddings) on a slice classifier",
         series.add_arguments, series.run),
        ("evaluate", "metrics.json + predictions.csv of a model on a cache split", evaluate.add_evaluate_arguments,
         evaluate.run_evaluate),
        ("predict", "raw DICOMs -> Kaggle submission CSV", evaluate.add_predict_arguments, evaluate.run_predict),
        ("select", "rank unlabeled slices for labeling", evaluate.add_select_arguments, evaluate.run_select),
        ("experiment", "label-efficiency experiment: modes x label fractions x trials", experiment.add_arguments,
         experiment.run),
        ("register", "register a finetune run's model in the MLflow registry", register.add_register_arguments,
         register.run_register),
        ("review", "registry versions; --compare two on the same images; --promote when non-inferior",
         review.add_review_arguments, review.run_review),
        ("registry", "a shared registry's roles (MLflow basic-auth): registry roles --trainers ...",
         registry.add_arguments, registry.run),
        ("export", "a model for use outside medmoco: export bundle --model M --out DIR (a MONAI bundle)",
         export.add_arguments, export.run),
        ("tracking-replay", "send the MLflow calls a run spooled while the server was unreachable",
         add_replay_arguments, run_replay),
        ("tracking-relocate", "point a copied or moved SQLite store's file records at its new folder",
         add_relocate_arguments, run_relocate),
    ]
    for name, help_text, add, run in stages:
        stage = sub.add_parser(name, help=help_text)
        add(stage)
        stage.set_defaults(run=run)
    return parser


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", dest="run_dir", required=True, help="the run directory holding mlflow_spool.jsonl")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default="",
                        help="where to send them (default: the URI the run used)")


def run_replay(args: argparse.Namespace) -> int:
    from medmoco.tracking import replay_spool

    try:
        result = replay_spool(args.run_dir, args.tracking_uri)
    except ConnectionError as err:
        print(f"medmoco tracking-replay: {err}", file=sys.stderr)
        return 1
    print(f"sent {result['sent']} tracking calls to {result['uri']} (run {result['run_id']})")
    return 0


def add_relocate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="the moved store: path of mlflow.db or sqlite:///... URI")


def run_relocate(args: argparse.Namespace) -> int:
    from medmoco.tracking.relocate import relocate

    path = args.store[len("sqlite:///"):] if args.store.startswith("sqlite:///") else args.store
    try:
        result = relocate(path)
    except FileNotFoundError as err:
        print(f"medmoco tracking-relocate: {err}", file=sys.stderr)
        return 1
    if not result["from"]:
        print(f"{path}: its records already point at {result['to']}/mlartifacts; nothing to change")
    else:
        print(f"{path}: {result['rows']} file records moved from {', '.join(result['from'])}/mlartifacts to "
              f"{result['to']}/mlartifacts")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dicom_preprocess.assembly import LabelsUnmatched, NothingCached
    from dicom_preprocess.job import StorageFull
    from dicom_preprocess.sources import SourceUnavailable
    from medmoco.distributed import PeerFailure
    from medmoco.handlers import JobSignalled

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"medmoco {args.command}: error: {err}", file=sys.stderr)
        return 2
    except JobSignalled as err:
        print(f"medmoco {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except (PeerFailure, StorageFull, NothingCached, LabelsUnmatched, SourceUnavailable) as err:
        print(f"medmoco {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
