"""Stage `medmoco export bundle`: a model (path, ``runs:/``, ``models:/``) as a MONAI bundle
(:func:`medmoco.export.export_bundle`)."""
from __future__ import annotations

import argparse

from medmoco.export import export_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_kind", required=True)
    bundle = sub.add_parser("bundle", help="a MONAI bundle: metadata, inference config, state dict, TorchScript, "
                                           "model card")
    bundle.add_argument("--model", required=True, help="model.pt, runs:/ID, models:/NAME@ALIAS or models:/NAME/VERSION")
    bundle.add_argument("--out", required=True, help="the bundle folder (new or empty)")
    bundle.add_argument("--tracking-uri", dest="tracking_uri", default="")


def run(args: argparse.Namespace) -> int:
    result = export_bundle(args.model, args.out, args.tracking_uri)
    origin = "registered" if result["registered"] else "unregistered"
    print(f"exported {result['model_uri']} ({origin}, {'series' if result['series'] else 'slice'} model"
          f"{'' if result['torchscript'] else ', no TorchScript'}) -> MONAI bundle {result['out']}; run it with "
          f"`python -m monai.bundle run --config_file {result['out']}/configs/inference.json --bundle_root "
          f"{result['out']} --dataset_dir SERIES_DIR --output_dir OUT`")
    return 0
