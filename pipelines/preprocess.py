"""Stage: `medmoco preprocess` / `medmoco preprocess-merge` / `medmoco synth`."""
from __future__ import annotations

import argparse

from dicom_preprocess.config import PreprocessConfig, load_config, parse_overrides

CLI_KEYS = ("input", "labels", "out", "size", "windows", "window_mode", "workers", "decode_threads", "files_per_shard",
            "label_fraction", "seed", "shard", "hash_ids", "hash_salt", "file_timeout_s", "modalities")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file (configs/preprocess/rsna.yaml)")
    parser.add_argument("--input", help="folder, .zip or .tar/.tar.gz of DICOM (also NIfTI/.mha/.nrrd), or a "
                        "DICOMweb server: dicomweb+http://HOST:PORT/dicom-web[?StudyInstanceUID=...]")
    parser.add_argument("--labels", help="RSNA long-format CSV (stage_2_train.csv)")
    parser.add_argument("--out", help="cache directory")
    parser.add_argument("--size", type=int)
    parser.add_argument("--windows", help="e.g. brain,subdural,bone or blood:60/40")
    parser.add_argument("--window-mode", dest="window_mode", choices=("linear", "sigmoid"))
    parser.add_argument("--workers", type=int, help="processes (default: the CPUs this process may use: "
                        "SLURM_CPUS_PER_TASK, else its CPU affinity)")
    parser.add_argument("--decode-threads", dest="decode_threads", type=int,
                        help="threads per worker for JPEG 2000 decoding (default: the CPUs the workers leave, "
                        "usable CPUs // workers)")
    parser.add_argument("--files-per-shard", dest="files_per_shard", type=int)
    parser.add_argument("--label-fraction", dest="label_fraction", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--shard", help="i/n: process every n-th chunk from i (SLURM array tasks)")
    parser.add_argument("--hash-ids", dest="hash_ids", action="store_true", default=None)
    parser.add_argument("--hash-salt", dest="hash_salt")
    parser.add_argument("--file-timeout-s", dest="file_timeout_s", type=float)
    parser.add_argument("--modalities", help="DICOM Modality values to read, e.g. CT (default) or CT,MR; '' for all")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    overrides = parse_overrides(args.set)
    for key in CLI_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return load_config(PreprocessConfig, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from dicom_preprocess.job import run_preprocess

    config = config_from_args(args)
    summary = run_preprocess(config, progress=not args.quiet)
    print(summary.line())
    return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="cache directory to finalize")
    parser.add_argument("--parts", nargs="*", default=[], help="other --out directories of shard jobs")
    parser.add_argument("--labels", help="RSNA CSV (default: the one given to preprocess)")


def run_merge(args: argparse.Namespace) -> int:
    from dicom_preprocess.job import finalize_cache, merge_parts

    merge_parts(args.out, args.parts)
    meta = finalize_cache(args.out, labels=args.labels)
    print(f"merged: {meta['images']} images, {meta['skipped']} skipped -> {args.out}")
    return 0


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zip", action="store_true", help="write a .zip archive instead of a folder")
    parser.add_argument("--slices", default="10,16", help="min,max slices per series")
    parser.add_argument("--rows", type=int, default=512, help="side of the regular square images")


def run_synth(args: argparse.Namespace) -> int:
    from dicom_preprocess.synthetic import synthesize

    low, high = (int(v) for v in args.slices.split(","))
    archive = synthesize(args.out, args.patients, args.seed, args.zip, (low, high), rows=args.rows)
    where = archive.zip_path or archive.images_dir
    print(f"{len(archive.slices)} slices of {args.patients} patients -> {where}; labels {archive.labels_csv}")
    return 0


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    from dicom_preprocess.splits import DEFAULT_FRACTIONS

    default = ",".join(f"{k}={v}" for k, v in DEFAULT_FRACTIONS.items())
    parser.add_argument("--cache", required=True, help="a finished cache directory")
    parser.add_argument("--fractions", default=None,
                        help=f"patient-grouped shares (default: the cache's own; a new cache gets {default})")
    parser.add_argument("--seed", type=int, help="which patients go where (default: the cache's seed)")


def run_split(args: argparse.Namespace) -> int:
    from dicom_preprocess.assembly import resplit_cache
    from dicom_preprocess.cache import open_cache
    from dicom_preprocess.config import ConfigError
    from dicom_preprocess.splits import parse_fractions

    try:
        own = open_cache(args.cache).metadata
    except FileNotFoundError as err:
        raise ConfigError(f"--cache: {err}") from None
    try:  # the cache's own setting unless told: `medmoco split --cache DIR` alone reproduces its split
        fractions = parse_fractions(args.fractions) if args.fractions else dict(own["split_fractions"])
    except ValueError as err:
        raise ConfigError(f"--fractions: {err}") from None
    seed = args.seed if args.seed is not None else int(own.get("seed", 0))
    meta = resplit_cache(args.cache, fractions, seed)
    counts = ", ".join(f"{name} {meta['split_counts'].get(name, 0)}" for name in fractions)
    print(f"split {args.cache} by patient, stratified on the subtypes (seed {seed}): {counts} images; "
          f"cache fingerprint {meta['cache_fingerprint']}")
    return 0
