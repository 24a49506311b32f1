"""Stage: `medmoco finetune --config FILE [--set key=value ...]`: the six-subtype classifier.

Modes: ``finetune`` (MoCo backbone, whole network trained), ``linear`` (MoCo-Freeze: backbone
frozen in eval mode, only the linear head trains; checked after every epoch), ``scratch``
(same architecture, random init). ``--pretrained`` takes a `medmoco pretrain` export
(``backbone.pt``), a MoCo checkpoint, or ``runs:/<pretraining run id>`` (its logged backbone).
Train: the label fraction of the cache's labeled ``train`` split (+ ``--extra-labels``); every
epoch the ``test`` split is evaluated over all ranks and the best mean AUC is kept. DDP as for
pretraining (torchrun / srun); ``batch_size`` is per process.
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
    """Fail before any work: cache, pretrained weights, extra labels. Returns (cache, pretrained payload)."""
    from dicom_preprocess import open_cache
    from medmoco.models.export import read_weights

    if not config.cache:
        raise ConfigError("cache: required (a directory made by `medmoco preprocess`)")
    try:
        cache = open_cache(config.cache)
    except FileNotFoundError as err:
        raise ConfigError(f"cache: {err}") from None
    for split in (config.train_split, config.eval_split):
        if split not in set(cache.manifest["split"]):
            raise ConfigError(f"split {split!r}: not in cache {config.cache} (has {sorted(set(cache.manifest['split']))})")
    payload = None
    if config.mode in ("finetune", "linear"):
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
    from ignite.utils import manual_seed

    from dicom_preprocess.labels import read_rsna_labels
    from medmoco.config import flatten, to_dict
    from medmoco.data import train_indices
    from medmoco.engines.common import RNGState, attach_checkpointing, attach_progress, device_for, resume_from
    from medmoco.engines.supervised import (BestEpoch, FrozenBackbone, create_supervised_trainer, get_dataflow,
                                            initialize, input_settings, predict_rows)
    from medmoco.metrics import classification_metrics
    from medmoco.models import load_classifier, save_classifier
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
                                                 extra, exclude_splits=(config.eval_split,))
    if missing and rank == 0:
        log.warning("%d extra-label images are not in the cache (e.g. %s)", len(missing), missing[:3])
    loader = get_dataflow(config, cache, rows, labels, config.context, size)
    eval_rows = cache.indices(config.eval_split, labeled=True)
    eval_labels = cache.labels(eval_rows)
    device = device_for(config)
    model, optimizer, scheduler, scaler, lr = initialize(config, config.arch, in_channels, payload)
    inner = getattr(model, "module", model)
    trainer = create_supervised_trainer(model, optimizer, scaler, config)
    meta = (payload or {}).get("meta", {})
    pretrain_run = str(meta.get("mlflow_run_id", ""))
    best_path = os.path.join(config.run_dir, MODEL_FILE)
    tracker = None  # the run is opened after resume (below); save() reads its id

    def evaluate() -> dict:
        probs = predict_rows(model, cache, eval_rows, config.context, size, device, config.eval_batch_size, config.amp)
        return classification_metrics(eval_labels, probs)

    def save(epoch: int, metrics: dict) -> None:
        save_classifier(inner, best_path, config.arch, in_channels, config.context, size, config.mode, cache.metadata,
                        meta={"epoch": epoch, "auc_mean": metrics["auc_mean"], "finetune_run_id": tracker.run_id or "",
                              "pretrain_run_id": pretrain_run, "label_fraction": config.label_fraction,
                              "cache": os.path.abspath(config.cache), "eval_split": config.eval_split})

    best = BestEpoch(evaluate, save, prefix="test")
    to_save = {"model": inner, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": trainer,
               "scaler": scaler, "rng": RNGState(), "best": best}
    os.makedirs(config.run_dir, exist_ok=True)
    resume_from(resume, config.run_dir, to_save)
    tracker = create_tracker(config.tracking.enabled, config.tracking.uri, config.tracking.experiment,
                             config.tracking.run_name,
                             tags={"stage": "finetune", "mode": config.mode, "label_fraction": config.label_fraction,
                                   "cache_fingerprint": cache.fingerprint, "pretrain_run_id": pretrain_run,
                                   "arch": config.arch,
                                   **({"mlflow.parentRunId": config.tracking.parent_run_id}
                                      if config.tracking.parent_run_id else {})},
                             run_dir=config.run_dir, resume=bool(resume), retry_s=config.tracking.retry_s)
    params = flatten(to_dict(config))
    params.update({"world_size": world, "global_batch": config.batch_size * world, "effective_lr": lr,
                   "image_size_used": size, "in_channels": in_channels, "n_train": len(rows),
                   "n_eval": len(eval_rows), "extra_labels_added": added, "extra_labels_missing": len(missing)})
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
            log.info("epoch %d: loss %.4f test_auc_mean %.4f test_weighted_logloss %.4f", engine.state.epoch,
                     m["epoch_loss"], m["test_auc_mean"], m["test_weighted_logloss"])
        # the figures the run has always logged per epoch, under their established names
        engine.state.epoch_metrics = {"loss": m["epoch_loss"], "lr": m["lr"], "images_per_s": m["images_per_s"],
                                      "data_wait_fraction": m["data_wait_fraction"],
                                      **{k: v for k, v in m.items() if k.startswith("test_")}}

    @trainer.on(Events.COMPLETED)
    def _report(engine):
        """The best epoch's model on the evaluation split: report files and artifacts (rank 0 writes)."""
        best_model, info = load_classifier(best_path)
        best_model.to(device)
        probs = predict_rows(best_model, cache, eval_rows, info["context"], info["image_size"], device,
                             config.eval_batch_size)
        metrics = classification_metrics(eval_labels, probs)
        result["metrics"] = metrics
        if rank == 0:
            _write_report(config, tracker, best_path, eval_labels, probs, metrics, int(info["meta"]["epoch"]))

    tracking = TrackingHandler(tracker, log_every=0, optimizer=optimizer)
    tracking.attach(trainer)  # after evaluation and report: it logs them and then closes the run
    scheduler.attach(trainer)
    attach_checkpointing(trainer, to_save, config.run_dir, config.keep_checkpoints)
    attach_progress(trainer, config.progress)
    trainer.run(loader, max_epochs=config.epochs)
    idist.barrier()
    result.update({"run_id": tracker.run_id, "history": tracking.history, "best_epoch": best.epoch})
    return result


def _write_report(config, tracker, best_path, labels, probs, metrics, epoch: int) -> None:
    """Metrics files, ROC and training curves, the resolved config and the model, as artifacts."""
    import yaml

    from medmoco.config import to_dict
    from medmoco.reports import training_curves, write_metrics_report

    out = os.path.join(config.run_dir, "report")
    write_metrics_report(out, labels, probs, metrics, {"best_epoch": epoch})
    with open(os.path.join(out, "config.yaml"), "w") as handle:
        yaml.safe_dump(to_dict(config), handle)
    if tracker.active:
        history = tracker.metric_history(["loss", "test_auc_mean", "test_weighted_logloss"])
        training_curves(history, os.path.join(out, "training_curves.png"))
        for name in sorted(os.listdir(out)):
            tracker.log_artifact(os.path.join(out, name), "report")
        tracker.log_artifact(best_path, "model")
        tracker.log_metrics({f"best_{k}": v for k, v in metrics.items() if k != "n_images"}, epoch)
        tracker.set_tags({"best_epoch": epoch, "model_file": os.path.abspath(best_path)})


def run(args: argparse.Namespace) -> int:
    from medmoco.distributed import run_on_ranks

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_finetune_config(args)
    # One process unless torchrun/srun started this one as a rank (medmoco.distributed).
    run_on_ranks(_entry, config, args.resume, backend=config.backend, timeout_s=config.dist_timeout_s)
    return 0


def _entry(local_rank: int, config, resume: str) -> None:
    import ignite.distributed as idist

    result = training(local_rank, config, resume)
    if idist.get_rank() == 0:
        m = result["metrics"]
        print(f"finetune ({config.mode}, label fraction {config.label_fraction}) done: best epoch "
              f"{result['best_epoch']}, test AUC mean {m['auc_mean']:.4f}, weighted log loss "
              f"{m['weighted_logloss']:.4f}; model -> {result['model']}; MLflow run {result['run_id']}")
