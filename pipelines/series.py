"""`medmoco series`: a series head over a slice classifier's embeddings, chosen on val, test read once.

    medmoco series --config configs/series/cpu_demo.yaml --encoder runs/ft-moco/model.pt --run-dir runs/series

Writes ``RUN_DIR/model.pt`` (``medmoco-series/1``: the slice classifier it embeds with and the
head) and ``RUN_DIR/report/``: ``metrics.json`` (slice-level figures as `medmoco finetune` writes
them, and under ``exam`` the exam-level figures: per class a series is positive when any of its
slices is, with the patient bootstrap), ``metrics.md``, ``predictions.parquet`` (slices) and
``exam_predictions.parquet`` (series). Logged as an MLflow run tagged ``stage=finetune``,
``head=series``, so `medmoco register` takes it like any fine-tuning run.
"""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML (configs/series/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. epochs=5")
    parser.add_argument("--cache", help="cache directory")
    parser.add_argument("--encoder", help="slice classifier: a `medmoco finetune` model.pt, runs:/ID or models:/...")
    parser.add_argument("--run-dir", dest="run_dir")
    parser.add_argument("--label-fraction", dest="label_fraction", type=float)
    parser.add_argument("--end-to-end", dest="end_to_end", action="store_const", const=True,
                        help="train the backbone too (default: frozen embeddings)")
    parser.add_argument("--tracking-uri", dest="tracking_uri")


def load_series_config(args: argparse.Namespace):
    from medmoco.config import SeriesConfig, load_config, parse_overrides, set_dotted

    overrides = parse_overrides(args.set)
    for key in ("cache", "encoder", "run_dir", "label_fraction", "end_to_end"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if args.tracking_uri:
        set_dotted(overrides, "tracking.uri", args.tracking_uri)
    return load_config(SeriesConfig, args.config, overrides)


def training(config) -> dict:
    """The whole stage (one process): embeddings, head, selection on val, thresholds on val, test once."""
    import numpy as np
    import torch

    from dicom_preprocess.cache import open_cache
    from dicom_preprocess.config import ConfigError
    from medmoco.config import flatten, to_dict
    from medmoco.data import train_indices
    from medmoco.engines.embed import cached_embeddings
    from medmoco.engines.series import exam_arrays, predict_series_rows, train_series_head
    from medmoco.evaluation import choose_thresholds, evaluate_split, flat_metrics
    from medmoco.inference import resolve_model
    from medmoco.models import load_classifier
    from medmoco.models.backbones import feature_size
    from medmoco.models.classifier import SERIES_FORMAT, save_series_model
    from medmoco.models.series import SeriesClassifier, build_series_head
    from medmoco.tracking import create_tracker

    if not config.cache:
        raise ConfigError("cache: required (a `medmoco preprocess` output)")
    if not config.encoder:
        raise ConfigError("encoder: required (a slice classifier: `medmoco finetune` model.pt, runs:/ID or models:/)")
    cache = open_cache(config.cache)
    encoder_path = resolve_model(config.encoder, config.tracking.uri)
    encoder, info = load_classifier(encoder_path)
    if info["format"] == SERIES_FORMAT:
        raise ConfigError(f"encoder {config.encoder}: is a series model; give the slice classifier it was built on")
    if int(info["in_channels"]) != len(cache.metadata["windows"]) * (2 * int(info["context"]) + 1):
        raise ConfigError(f"encoder {config.encoder}: takes {info['in_channels']} channels, the cache "
                          f"{config.cache} gives {len(cache.metadata['windows'])} windows per slice")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    train_rows, _, _, _ = train_indices(cache, config.train_split, config.label_fraction, config.subset_seed,
                                        unit="series")
    val_rows = cache.indices(config.val_split, labeled=True)
    test_rows = cache.indices(config.test_split, labeled=True)
    settings = {"hidden": config.hidden, "layers": config.layers, "dropout": config.dropout,
                "flip_tta": config.flip_tta, "features": feature_size(info["arch"]),
                "training": "end_to_end" if config.end_to_end else "frozen embeddings",
                "exam_output": "series head (masked max and mean of the GRU states)",
                "encoder_mode": info["mode"], "encoder_run_id": info.get("meta", {}).get("finetune_run_id", "")}
    model = SeriesClassifier(encoder, build_series_head(settings["features"], settings), config.flip_tta,
                             info["context"], info["image_size"]).to(device)
    pretrain_run = str(info.get("meta", {}).get("pretrain_run_id", ""))
    tracker = create_tracker(config.tracking.enabled, config.tracking.uri, config.tracking.experiment,
                             config.tracking.run_name,
                             tags={"stage": "finetune", "head": "series", "mode": info["mode"],
                                   "label_fraction": config.label_fraction, "label_unit": "series",
                                   "cache_fingerprint": cache.fingerprint, "pretrain_run_id": pretrain_run,
                                   "split_method": cache.metadata.get("split_method", "patients, unstratified"),
                                   "arch": info["arch"],
                                   "test_split_fingerprint": cache.metadata.get("split_fingerprints", {}).get(
                                       config.test_split, ""),
                                   **({"mlflow.parentRunId": config.tracking.parent_run_id}
                                      if config.tracking.parent_run_id else {})},
                             run_dir=config.run_dir)
    os.makedirs(config.run_dir, exist_ok=True)
    n_series = len(np.unique(cache.manifest.iloc[train_rows]["series_uid"])) if len(train_rows) else 0
    tracker.log_params({**flatten(to_dict(config)), "n_train": len(train_rows), "n_train_series": n_series,
                        "n_val": len(val_rows), "n_test": len(test_rows), "encoder_file": encoder_path,
                        "mode": info["mode"], "head": "series", "arch": info["arch"],
                        "image_size_used": info["image_size"]})
    train_features = val_features = None
    if not config.end_to_end:
        where = config.embeddings_dir or os.path.join(config.run_dir, "embeddings")
        train_features = cached_embeddings(encoder_path, cache, train_rows, where, device, config.flip_tta)
        val_features = cached_embeddings(encoder_path, cache, val_rows, where, device, config.flip_tta)

    def on_epoch(epoch: int, entry: dict) -> None:
        tracker.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, epoch)

    selected = train_series_head(model, cache, train_rows, val_rows, config.epochs, config.lr, config.weight_decay,
                                 config.batch_series, config.class_weights, config.exam_weight, config.seed, device,
                                 train_features, val_features, config.end_to_end, on_epoch)
    # operating points on val (slices and exams), then test read once
    val_slice, _, val_exam, _ = predict_series_rows(model, cache, val_rows, device, features=val_features)
    val_exam_labels = exam_arrays(cache, val_rows, val_slice, val_exam)[0]
    thresholds = choose_thresholds(cache.labels(val_rows), val_slice, config.target_sensitivity)
    exam_thresholds = choose_thresholds(val_exam_labels, val_exam, config.target_sensitivity)
    operating_points = {"split": config.val_split, "target_sensitivity": config.target_sensitivity,
                        "thresholds": thresholds, "exam_thresholds": exam_thresholds}
    model_path = os.path.join(config.run_dir, MODEL_FILE)
    save_series_model(model, model_path, info, settings, operating_points=operating_points,
                      meta={"epoch": selected["epoch"], "val_score": selected["score"],
                            "finetune_run_id": tracker.run_id or "", "pretrain_run_id": pretrain_run,
                            "label_fraction": config.label_fraction, "label_unit": "series",
                            "cache": os.path.abspath(config.cache), "selected_on": config.val_split})
    test_features = None
    if not config.end_to_end:
        test_features = cached_embeddings(encoder_path, cache, test_rows, where, device, config.flip_tta)
    probs, keys, exam_probs, _ = predict_series_rows(model, cache, test_rows, device, features=test_features)
    labels = cache.labels(test_rows)
    boot = config.bootstrap
    evaluation = evaluate_split(labels, probs, cache.groups(test_rows), thresholds, boot.replicates, boot.level,
                                boot.seed, cache.group_unit, boot.min_groups)
    exam_y, exam_p, exam_groups, exam_keys, n_slices = exam_arrays(cache, test_rows, probs, exam_probs)
    exam = evaluate_split(exam_y, exam_p, exam_groups, exam_thresholds, boot.replicates, boot.level, boot.seed,
                          cache.group_unit, boot.min_groups)
    exam["n_series"] = int(len(exam_y))
    exam["exam_output"] = settings["exam_output"]
    evaluation["exam"] = exam
    _write_report(config, tracker, model_path, cache, test_rows, labels, probs, evaluation, selected["epoch"],
                  operating_points, (exam_keys, exam_groups, n_slices, exam_y, exam_p))
    tracker.log_metrics({**flat_metrics(evaluation, "test"), **flat_metrics(exam, "test_exam")}, selected["epoch"])
    tracker.log_params({"selected_epoch": selected["epoch"], "selected_on": config.val_split,
                        "target_sensitivity": config.target_sensitivity})
    tracker.finish()
    return {"model": model_path, "run_id": tracker.run_id, "selected_epoch": selected["epoch"],
            "history": selected["history"], "metrics": evaluation, "n_train": len(train_rows),
            "n_train_series": n_series}


def _write_report(config, tracker, model_path, cache, rows, labels, probs, evaluation, epoch, operating_points,
                  exams) -> None:
    from medmoco.evaluation import markdown_table
    from medmoco.predictions import EXAM_FILE, write_exam_predictions
    from medmoco.reports import write_evaluation
    from medmoco.subgroups import add_reader_tables

    out = os.path.join(config.run_dir, "report")
    add_reader_tables(evaluation, cache, rows, probs, config.bootstrap.min_groups)
    slices = {"image_ids": cache.manifest["image_id"].to_numpy()[rows], "groups": cache.groups(rows),
              "split": config.test_split}
    write_evaluation(out, labels, probs, evaluation,
                     {"split": config.test_split, "selected_epoch": epoch, "selected_on": config.val_split,
                      "operating_points": operating_points, "head": "series"}, slices)
    keys, groups, n_slices, exam_y, exam_p = exams
    write_exam_predictions(os.path.join(out, EXAM_FILE), keys, groups, n_slices, config.test_split, exam_y, exam_p)
    with open(os.path.join(out, "metrics.md"), "a") as handle:
        handle.write("\n## Exam level (a series is positive when any of its slices is)\n\n"
                     + markdown_table(evaluation["exam"]))
    if tracker.active:
        for name in sorted(os.listdir(out)):
            tracker.log_artifact(os.path.join(out, name), "report")
        tracker.log_artifact(model_path, "model")
        tracker.set_tags({"selected_epoch": epoch, "model_file": os.path.abspath(model_path)})


def run(args: argparse.Namespace) -> int:
    from medmoco.intervals import format_estimate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_series_config(args)
    result = training(config)
    m, e = result["metrics"], result["metrics"]["exam"]
    print(f"series head ({result['n_train_series']} labeled series, {result['n_train']} slices) done: epoch "
          f"{result['selected_epoch']} selected on {config.val_split}; {config.test_split} slice AUC mean "
          f"{format_estimate(m.get('auc_mean'), m.get('auc_mean_ci'), 4)}, exam-level AUC any "
          f"{format_estimate(e['classes']['any'].get('auc'), e['classes']['any'].get('auc_ci'), 4)} "
          f"({e['n_series']} series), weighted log loss {format_estimate(m.get('weighted_logloss'), None, 4)}; "
          f"model -> {result['model']}; MLflow run {result['run_id']}")
    return 0
