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
import json
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
    """A local weight file for ``spec``: a path, or ``runs:/ID[/artifact path]`` downloaded from MLflow.

    Raises:
        ConfigError: naming the setting when the file or run does not exist.
    """
    if not spec:
        return ""
    if os.path.isfile(spec):
        return spec
    if spec.startswith("runs:/"):
        import mlflow

        from medmoco.tracking import resolve_tracking_uri

        parts = spec[len("runs:/"):].strip("/").split("/", 1)
        # runs:/ID alone means the backbone that `medmoco pretrain` logged under backbone/
        uri = spec if len(parts) == 2 else f"runs:/{parts[0]}/backbone/backbone.pt"
        try:
            store = resolve_tracking_uri(tracking_uri)  # passed, not set: set_tracking_uri leaks into os.environ
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=store, registry_uri=store)
        except Exception as err:
            raise ConfigError(f"pretrained {spec}: cannot fetch {uri} from MLflow ({str(err)[:200]})") from None
        return os.path.join(local, "backbone.pt") if os.path.isdir(local) else local
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


class BestScore:
    """The best evaluation so far (checkpointed, so a resumed run keeps choosing correctly)."""

    def __init__(self):
        self.auc, self.epoch = float("-inf"), 0

    def state_dict(self) -> dict:
        return {"auc": self.auc, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.auc, self.epoch = float(state["auc"]), int(state["epoch"])


def training(local_rank: int, config, resume: str = "") -> dict:
    import ignite.distributed as idist
    import numpy as np
    import torch
    from ignite.engine import Events
    from ignite.handlers import Checkpoint
    from ignite.utils import manual_seed

    from dicom_preprocess import SUBTYPES
    from dicom_preprocess.labels import read_rsna_labels
    from medmoco.config import flatten, to_dict
    from medmoco.engines.pretrain import RNGState, attach_checkpointing, device_for, find_resume_checkpoint
    from medmoco.engines.supervised import (backbone_fingerprint, changed_keys, create_supervised_trainer,
                                            get_train_loader, predict_rows, train_indices)
    from medmoco.metrics import classification_metrics
    from medmoco.models import build_classifier, save_classifier
    from medmoco.tracking import create_tracker

    rank, world = idist.get_rank(), idist.get_world_size()
    cache, payload = validate(config)
    meta = (payload or {}).get("meta", {})
    if not config.arch:
        config.arch = (payload or {}).get("arch", "resnet50")
    if config.context < 0:
        config.context = int(meta.get("context", 0))
    size = config.image_size or int(meta.get("image_size", 0)) or cache.shape[-1]
    manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    extra = None
    if config.extra_labels:
        extra, report = read_rsna_labels(config.extra_labels)
        if rank == 0:
            log.info("extra labels %s: %s", config.extra_labels, report.summary())
    rows, labels, added, missing = train_indices(cache, config, extra)
    if missing and rank == 0:
        log.warning("%d extra-label images are not in the cache (e.g. %s)", len(missing), missing[:3])
    loader = get_train_loader(config, cache, rows, labels, size)
    eval_rows = cache.indices(config.eval_split, labeled=True)
    eval_labels = cache.labels(eval_rows)
    device = device_for(config)
    in_channels = len(cache.metadata["windows"]) * (2 * config.context + 1)
    model = build_classifier(config.arch, in_channels, config.mode, payload).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = config.batch_size * world
    lr = config.optim.lr * global_batch / 256.0
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optim.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=config.optim.momentum,
                                    weight_decay=config.optim.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=config.optim.weight_decay)
    epochs, optim_cfg = config.epochs, config.optim

    def factor(epoch: int) -> float:
        import math

        if optim_cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        if optim_cfg.schedule == "step":
            return optim_cfg.gamma ** sum(epoch >= m for m in optim_cfg.milestones)
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16" and device.type == "cuda")
    frozen = backbone_fingerprint(model) if config.mode == "linear" else None
    if world > 1:
        model = idist.auto_model(model, sync_bn=False, find_unused_parameters=False)
    inner = getattr(model, "module", model)
    trainer = create_supervised_trainer(model, optimizer, scaler, config)
    best = BestScore()
    to_save = {"model": inner, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": trainer,
               "scaler": scaler, "rng": RNGState(), "best": best}
    os.makedirs(config.run_dir, exist_ok=True)
    resume_path, state = find_resume_checkpoint(resume, config.run_dir)
    if state is not None:
        Checkpoint.load_objects(to_load=to_save, checkpoint=state)
        if rank == 0:
            log.warning("resumed from %s (epoch %d)", resume_path, trainer.state.epoch)
    pretrain_run = str(meta.get("mlflow_run_id", ""))
    tracker = create_tracker(config.tracking.enabled, config.tracking.uri, config.tracking.experiment,
                             config.tracking.run_name,
                             tags={"stage": "finetune", "mode": config.mode, "label_fraction": config.label_fraction,
                                   "cache_fingerprint": cache.fingerprint, "pretrain_run_id": pretrain_run,
                                   "arch": config.arch,
                                   **({"mlflow.parentRunId": config.tracking.parent_run_id}
                                      if config.tracking.parent_run_id else {})},
                             run_dir=config.run_dir, resume=bool(resume),
                             retry_s=config.tracking.retry_s)
    params = flatten(to_dict(config))
    params.update({"world_size": world, "global_batch": global_batch, "effective_lr": lr, "image_size_used": size,
                   "in_channels": in_channels, "n_train": len(rows), "n_eval": len(eval_rows),
                   "extra_labels_added": added, "extra_labels_missing": len(missing)})
    tracker.log_params(params)
    best_path = os.path.join(config.run_dir, MODEL_FILE)
    history = []

    def save_model(path: str, epoch: int, metrics: dict) -> None:
        save_classifier(inner, path, config.arch, in_channels, config.context, size, config.mode, cache.metadata,
                        meta={"epoch": epoch, "auc_mean": metrics["auc_mean"], "finetune_run_id": tracker.run_id or "",
                              "pretrain_run_id": pretrain_run, "label_fraction": config.label_fraction,
                              "cache": os.path.abspath(config.cache), "eval_split": config.eval_split})

    @trainer.on(Events.EPOCH_STARTED)
    def _set_epoch(engine):
        loader.sampler.set_epoch(engine.state.epoch)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _evaluate(engine):
        epoch = engine.state.epoch
        if frozen is not None:
            moved = changed_keys(frozen, model)
            if moved:
                raise RuntimeError(f"linear mode: backbone changed after epoch {epoch} ({moved[:3]}); it must be frozen")
        stats = dict(engine.state.epoch_metrics)
        stats["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        probs = predict_rows(model, cache, eval_rows, config.context, size, device, config.eval_batch_size, config.amp)
        metrics = classification_metrics(eval_labels, probs)
        logged = {"loss": stats["epoch_loss"], "lr": stats["lr"], "images_per_s": stats["images_per_s"],
                  "data_wait_fraction": stats["data_wait_fraction"]}
        logged.update({f"test_{k}": v for k, v in metrics.items() if k != "n_images"})
        tracker.log_metrics(logged, epoch)
        history.append({"epoch": epoch, **logged})
        score = metrics["auc_mean"] if not np.isnan(metrics["auc_mean"]) else -metrics["weighted_logloss"]
        if score > best.auc:
            best.auc, best.epoch = score, epoch
            if rank == 0:
                save_model(best_path, epoch, metrics)
        if rank == 0:
            log.info("epoch %d: loss %.4f test_auc_mean %.4f test_weighted_logloss %.4f", epoch,
                     stats["epoch_loss"], metrics["auc_mean"], metrics["weighted_logloss"])

    attach_checkpointing(trainer, to_save, config)
    if config.progress and rank == 0:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": out["loss"]})
    status = "FAILED"
    try:
        trainer.run(loader, max_epochs=config.epochs)
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            tracker.finish("KILLED")
    result = {"run_id": tracker.run_id, "model": best_path, "history": history, "best_epoch": best.epoch,
              "n_train": len(rows), "extra_labels_added": added}
    if rank == 0:
        final = _report(config, cache, best_path, eval_rows, eval_labels, device, tracker, SUBTYPES)
        result["metrics"] = final
    idist.barrier()
    if rank == 0:
        tracker.finish("FINISHED")
    return result


def _report(config, cache, best_path, eval_rows, eval_labels, device, tracker, subtypes) -> dict:
    """Best model's metrics, ROC/curve PNGs, metrics table, resolved config and the model as artifacts."""
    import yaml

    from medmoco.config import to_dict
    from medmoco.engines.supervised import predict_rows
    from medmoco.metrics import classification_metrics, markdown_table, metrics_table
    from medmoco.models import load_classifier
    from medmoco.reports import roc_figure, training_curves

    model, info = load_classifier(best_path)
    model.to(device)
    probs = predict_rows(model, cache, eval_rows, info["context"], info["image_size"], device, config.eval_batch_size)
    metrics = classification_metrics(eval_labels, probs)
    out = os.path.join(config.run_dir, "report")
    os.makedirs(out, exist_ok=True)
    rows = metrics_table(metrics)
    import pandas as pd

    pd.DataFrame(rows).to_csv(os.path.join(out, "metrics.csv"), index=False)
    with open(os.path.join(out, "metrics.md"), "w") as handle:
        handle.write(markdown_table(rows))
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump({**metrics, "best_epoch": int(info["meta"]["epoch"])}, handle, indent=1)
    with open(os.path.join(out, "config.yaml"), "w") as handle:
        yaml.safe_dump(to_dict(config), handle)
    roc_figure(eval_labels, probs, os.path.join(out, "roc_curves.png"))
    if tracker.active:
        history = tracker.metric_history(["loss", "test_auc_mean", "test_weighted_logloss"])
        training_curves(history, os.path.join(out, "training_curves.png"))
        for name in sorted(os.listdir(out)):
            tracker.log_artifact(os.path.join(out, name), "report")
        tracker.log_artifact(best_path, "model")
        tracker.log_metrics({f"best_{k}": v for k, v in metrics.items() if k != "n_images"}, int(info["meta"]["epoch"]))
        tracker.set_tags({"best_epoch": info["meta"]["epoch"], "model_file": os.path.abspath(best_path)})
    return metrics


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
