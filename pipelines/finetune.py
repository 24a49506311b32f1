"""Stage: `medmoco finetune --config FILE [--set key=value ...]`: the six-subtype classifier.

Modes: ``finetune`` (MoCo backbone, whole network trained), ``linear`` (MoCo-Freeze: backbone
frozen in eval mode, only the linear head trains; checked after every epoch), ``scratch``
(same architecture, random init). ``--pretrained`` takes a `medmoco pretrain` export
(``backbone.pt``), a MoCo checkpoint, or ``runs:/<pretraining run id>`` (its logged backbone).

Train on the label fraction of the cache's labeled ``train`` split (+ ``--extra-labels``). Every
choice is made on ``val``: each epoch is scored there (``val_*`` in MLflow), the epoch with the
best ``val_auc_mean`` is kept as ``model.pt`` (``selected_epoch``), early stopping (optional)
watches it, and each class's threshold for ``target_sensitivity`` is fixed on ``val``. Only then
is ``test`` read, once, by the selected model: its figures with patient-bootstrap intervals,
calibration and operating points are logged as ``test_*`` (one step). DDP as for pretraining
(torchrun / srun); ``batch_size`` is per process.
"""
from __future__ import annotations

import argparse
import logging
import os

from dicom_preprocess.config import ConfigError

log = logging.getLogger("medmoco.finetune")
MODEL_FILE = "model.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML (configs/finetune/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. epochs=2")
    parser.add_argument("--cache", help="cache directory")
    parser.add_argument("--run-dir", dest="run_dir")
    parser.add_argument("--mode", choices=("finetune", "linear", "scratch"))
    parser.add_argument("--pretrained", help="backbone export, MoCo checkpoint, or runs:/<pretraining run id>")
    parser.add_argument("--label-fraction", dest="label_fraction", type=float)
    parser.add_argument("--extra-labels", dest="extra_labels", help="RSNA long-format CSV of newly labeled slices")
    parser.add_argument("--resume", default="", help="auto (newest checkpoint of --run-dir) or a checkpoint path")
    parser.add_argument("--tracking-uri", dest="tracking_uri")


def load_finetune_config(args: argparse.Namespace):
    from medmoco.config import FinetuneConfig, load_config, parse_overrides, set_dotted

    overrides = parse_overrides(args.set)
    for key in ("cache", "run_dir", "mode", "pretrained", "label_fraction", "extra_labels"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if args.tracking_uri:
        set_dotted(overrides, "tracking.uri", args.tracking_uri)
    return load_config(FinetuneConfig, args.config, overrides)


def resolve_pretrained(spec: str, tracking_uri: str = "") -> str:
    """A local weight file for ``spec``: a path, or ``runs:/ID[/artifact path]`` fetched from MLflow.

    Raises:
        ConfigError: naming the setting when the file or run does not exist.
    """
    if not spec:
        return ""
    if os.path.isfile(spec):
        return spec
    if spec.startswith("runs:/"):
        from medmoco.tracking import fetch_artifact

        try:
            # runs:/ID alone means the backbone that `medmoco pretrain` logged under backbone/
            return fetch_artifact(spec, "backbone.pt", "backbone/backbone.pt", tracking_uri)
        except LookupError as err:
            raise ConfigError(f"pretrained {spec}: {err}") from None
    raise ConfigError(f"pretrained {spec}: no such file (give a backbone.pt export, a checkpoint, or runs:/ID)")


def validate(config):
    """Fail before any work: cache and its splits, pretrained weights, extra labels.

    Returns:
        (cache, pretrained payload or None).
    """
    from dicom_preprocess import open_cache
    from medmoco.models.export import read_weights

    if not config.cache:
        raise ConfigError("cache: required (a directory made by `medmoco preprocess`)")
    try:
        cache = open_cache(config.cache)
    except FileNotFoundError as err:
        raise ConfigError(f"cache: {err}") from None
    present = sorted(set(cache.manifest["split"]))
    if config.val_split not in present:
        raise ConfigError(
            f"cache {config.cache} has no {config.val_split!r} split (it has {present}; caches written before the "
            f"validation split existed have none). Model selection must not read the test split: add one without "
            f"decoding again with `medmoco split --cache {config.cache}`")
    for split in (config.train_split, config.test_split):
        if split not in present:
            raise ConfigError(f"split {split!r}: not in cache {config.cache} (has {present})")
    for split in (config.train_split, config.val_split, config.test_split):
        if not len(cache.indices(split, labeled=True)):
            raise ConfigError(f"split {split!r} of cache {config.cache} holds no labeled image")
    payload = None
    # scratch with --pretrained: random weights in the pretrained backbone's architecture (and input
    # size/context), so that a scratch baseline is the same network as the MoCo model it is compared with
    if config.mode in ("finetune", "linear") or (config.mode == "scratch" and config.pretrained):
        path = resolve_pretrained(config.pretrained, config.tracking.uri)
        try:
            payload = read_weights(path)
        except ValueError as err:
            raise ConfigError(f"pretrained: {err}") from None
    if config.extra_labels and not os.path.isfile(config.extra_labels):
        raise ConfigError(f"extra_labels {config.extra_labels}: no such file")
    return cache, payload


def training(local_rank: int, config, resume: str = "") -> dict:
    """The whole run on one rank (ignite examples' ``training(local_rank, config)``)."""
    import ignite.distributed as idist
    import torch
    from ignite.engine import Events
    from ignite.handlers import EarlyStopping
    from ignite.utils import manual_seed

    from dicom_preprocess.labels import read_rsna_labels
    from medmoco.config import flatten, to_dict
    from medmoco.data import train_indices
    from medmoco.engines.common import (RNGState, attach_checkpointing, attach_progress, device_for, resume_from,
                                        run_or_complete)
    from medmoco.engines.checkpoints import check_resume, run_identity
    from medmoco.engines.supervised import (BestEpoch, FrozenBackbone, create_supervised_trainer, get_dataflow,
                                            initialize, input_settings, predict_rows)
    from medmoco.metrics import classification_metrics
    from medmoco.handlers import StopOnSignal
    from medmoco.models import save_classifier
    from medmoco.tracking import TrackingHandler, create_tracker

    rank, world = idist.get_rank(), idist.get_world_size()
    cache, payload = validate(config)
    config.arch, config.context, size, in_channels = input_settings(config, payload, cache)
    manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    extra = None
    if config.extra_labels:
        extra, report = read_rsna_labels(config.extra_labels)
        if rank == 0:
            log.info("extra labels %s: %s", config.extra_labels, report.summary())
    rows, labels, added, missing = train_indices(cache, config.train_split, config.label_fraction, config.subset_seed,
                                                 extra, exclude_splits=(config.val_split, config.test_split),
                                                 unit=config.label_unit)
    if missing and rank == 0:
        log.warning("%d extra-label images are not in the cache (e.g. %s)", len(missing), missing[:3])
    loader = get_dataflow(config, cache, rows, labels, config.context, size)
    val_rows = cache.indices(config.val_split, labeled=True)
    val_labels = cache.labels(val_rows)
    device = device_for(config)
    model, optimizer, scheduler, scaler, lr = initialize(config, config.arch, in_channels, payload)
    inner = getattr(model, "module", model)
    trainer = create_supervised_trainer(model, optimizer, scaler, config)
    StopOnSignal().attach(trainer)  # first: a signal ends the run between iterations (SLURM scancel, requeue)
    pretrain_run = str((payload or {}).get("meta", {}).get("mlflow_run_id", ""))
    best_path = os.path.join(config.run_dir, MODEL_FILE)
    tracker = None  # opened after resume (below); save() reads its id

    def evaluate_val() -> dict:
        probs = predict_rows(model, cache, val_rows, config.context, size, device, config.eval_batch_size, config.amp)
        return classification_metrics(val_labels, probs)

    def save(epoch: int, metrics: dict) -> None:
        save_classifier(inner, best_path, config.arch, in_channels, config.context, size, config.mode, cache.metadata,
                        meta={"epoch": epoch, "val_auc_mean": metrics["auc_mean"],
                              "finetune_run_id": tracker.run_id or "", "pretrain_run_id": pretrain_run,
                              "label_fraction": config.label_fraction, "cache": os.path.abspath(config.cache),
                              "selected_on": config.val_split})

    best = BestEpoch(evaluate_val, save, prefix="val")
    to_save = {"model": inner, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": trainer,
               "scaler": scaler, "rng": RNGState(), "best": best}
    stopper = None
    if config.early_stopping_patience:
        stopper = EarlyStopping(config.early_stopping_patience, lambda engine: engine.state.selection_score, trainer)
        to_save["early_stopping"] = stopper
    os.makedirs(config.run_dir, exist_ok=True)
    # refuse a checkpoint of another cache or network before loading it (medmoco.engines.checkpoints)
    check_resume(config.run_dir, run_identity("finetune", cache.fingerprint, flatten(to_dict(config))), bool(resume))
    resume_from(resume, config.run_dir, to_save)
    tracker = create_tracker(config.tracking.enabled, config.tracking.uri, config.tracking.experiment,
                             config.tracking.run_name,
                             tags={"stage": "finetune", "mode": config.mode, "label_fraction": config.label_fraction,
                                   "cache_fingerprint": cache.fingerprint, "pretrain_run_id": pretrain_run,
                                   # caches split before stratification recorded no method
                                   "split_method": cache.metadata.get("split_method", "patients, unstratified"),
                                   "arch": config.arch,
                                   "test_split_fingerprint": cache.metadata.get("split_fingerprints", {}).get(
                                       config.test_split, ""),
                                   **({"mlflow.parentRunId": config.tracking.parent_run_id}
                                      if config.tracking.parent_run_id else {})},
                             run_dir=config.run_dir, resume=bool(resume), retry_s=config.tracking.retry_s)
    params = flatten(to_dict(config))
    params.update({"world_size": world, "global_batch": config.batch_size * world, "effective_lr": lr,
                   "image_size_used": size, "in_channels": in_channels, "n_train": len(rows), "n_val": len(val_rows),
                   "n_test": len(cache.indices(config.test_split, labeled=True)),
                   "extra_labels_added": added, "extra_labels_missing": len(missing)})
    tracker.log_params(params)
    result = {"model": best_path, "n_train": len(rows), "extra_labels_added": added}

    @trainer.on(Events.EPOCH_STARTED)
    def _set_epoch(engine):
        loader.sampler.set_epoch(engine.state.epoch)

    if config.mode == "linear":
        FrozenBackbone(model).attach(trainer)
    best.attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _log_epoch(engine):
        m = engine.state.epoch_metrics
        if rank == 0:
            log.info("epoch %d: loss %.4f val_auc_mean %.4f val_weighted_logloss %.4f", engine.state.epoch,
                     m["epoch_loss"], m["val_auc_mean"], m["val_weighted_logloss"])
        engine.state.epoch_metrics = {"loss": m["epoch_loss"], "lr": m["lr"], "images_per_s": m["images_per_s"],
                                      "data_wait_fraction": m["data_wait_fraction"],
                                      **{k: v for k, v in m.items() if k.startswith("val_")}}

    if stopper is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, stopper)  # after BestEpoch set selection_score

    @trainer.on(Events.COMPLETED)
    def _test_once(engine):
        result["metrics"] = test_selected_model(config, cache, best_path, val_rows, val_labels, device, tracker,
                                                best.epoch)

    tracking = TrackingHandler(tracker, log_every=0, optimizer=optimizer)
    tracking.attach(trainer)  # after the evaluation and the test: it logs them and then closes the run
    scheduler.attach(trainer)
    attach_checkpointing(trainer, to_save, config.run_dir, config.keep_checkpoints)
    attach_progress(trainer, config.progress)
    run_or_complete(trainer, loader, config.epochs)
    idist.barrier()
    result.update({"run_id": tracker.run_id, "history": tracking.history, "best_epoch": best.epoch,
                   "selected_epoch": best.epoch, "stopped_early": bool(stopper and trainer.state.epoch < config.epochs)})
    return result


def test_selected_model(config, cache, model_path: str, val_rows, val_labels, device, tracker, epoch: int) -> dict:
    """Operating points fixed on ``val``, then ``test`` read once (:func:`~medmoco.engines.supervised.
    freeze_thresholds_then_test`); rank 0 writes the thresholds into the model file and the report,
    and logs the ``test_*`` figures once (step = selected epoch)."""
    import ignite.distributed as idist

    from medmoco.engines.supervised import freeze_thresholds_then_test
    from medmoco.evaluation import flat_metrics
    from medmoco.models.classifier import set_operating_points

    boot = config.bootstrap
    test_rows = cache.indices(config.test_split, labeled=True)
    operating_points, evaluation, labels, probs = freeze_thresholds_then_test(
        model_path, cache, val_rows, val_labels, test_rows, device,
        config.eval_batch_size, config.target_sensitivity, boot.replicates, boot.level, boot.seed,
        boot.min_groups)
    operating_points["split"] = config.val_split
    if idist.get_rank() == 0:
        from medmoco.subgroups import add_reader_tables

        add_reader_tables(evaluation, cache, test_rows, probs, boot.min_groups)
        set_operating_points(model_path, operating_points)
        slices = {"image_ids": cache.manifest["image_id"].to_numpy()[test_rows], "groups": cache.groups(test_rows),
                  "split": config.test_split}
        _write_report(config, tracker, model_path, labels, probs, evaluation, epoch, operating_points, slices)
        tracker.log_metrics(flat_metrics(evaluation, "test"), epoch)
        tracker.log_params({"selected_epoch": epoch, "selected_on": config.val_split,
                            "target_sensitivity": config.target_sensitivity})
    return evaluation


def _write_report(config, tracker, model_path, labels, probs, evaluation: dict, epoch: int,
                  operating_points: dict, slices: dict | None = None) -> None:
    """The test report (metrics.json/.md, predictions.parquet, ROC and reliability figures), training curves, the
    resolved config and the model, as files and artifacts."""
    import yaml

    from medmoco.config import to_dict
    from medmoco.reports import training_curves, write_evaluation

    out = os.path.join(config.run_dir, "report")
    write_evaluation(out, labels, probs, evaluation,
                     {"split": config.test_split, "selected_epoch": epoch, "selected_on": config.val_split,
                      "operating_points": operating_points}, slices)
    with open(os.path.join(out, "config.yaml"), "w") as handle:
        yaml.safe_dump(to_dict(config), handle)
    if tracker.active:
        history = tracker.metric_history(["loss", "val_auc_mean", "val_weighted_logloss"])
        training_curves(history, os.path.join(out, "training_curves.png"))
        for name in sorted(os.listdir(out)):
            tracker.log_artifact(os.path.join(out, name), "report")
        tracker.log_artifact(model_path, "model")
        tracker.set_tags({"selected_epoch": epoch, "model_file": os.path.abspath(model_path)})


def run(args: argparse.Namespace) -> int:
    from medmoco.distributed import log_level, run_on_ranks

    logging.basicConfig(level=log_level(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_finetune_config(args)
    # One process unless torchrun/srun started this one as a rank (medmoco.distributed).
    run_on_ranks(_entry, config, args.resume, backend=config.backend, timeout_s=config.dist_timeout_s)
    return 0


def _entry(local_rank: int, config, resume: str) -> None:
    import ignite.distributed as idist

    result = training(local_rank, config, resume)
    if idist.get_rank() == 0:
        from medmoco.intervals import format_estimate

        m = result["metrics"]
        print(f"finetune ({config.mode}, label fraction {config.label_fraction}) done: epoch {result['selected_epoch']} "
              f"selected on {config.val_split}; {config.test_split} AUC mean "
              f"{format_estimate(m.get('auc_mean'), m.get('auc_mean_ci'), 4)}, weighted log loss "
              f"{format_estimate(m.get('weighted_logloss'), None, 4)}; model -> {result['model']}; "
              + (f"MLflow run {result['run_id']}" if result['run_id'] else
                 "MLflow store unreachable: tracking calls spooled in the run dir (send them with "
                 "`medmoco tracking-replay --run-dir DIR`)"))
