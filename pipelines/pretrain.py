"""Stage: `medmoco pretrain --config FILE [--set key=value ...] [--resume auto|PATH]`.

One process (CPU or one GPU): ``medmoco pretrain --config configs/pretrain/cpu_demo.yaml``.
One node, N GPUs: ``torchrun --nproc_per_node=N -m medmoco pretrain --config ...``.
SLURM, several nodes: ``srun python -m medmoco pretrain --config ...`` (srun alone, not srun +
torchrun: ignite#2048); see slurm/. ``batch_size`` is per process.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from dicom_preprocess.config import ConfigError

log = logging.getLogger("medmoco.pretrain")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML (configs/pretrain/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. epochs=2")
    parser.add_argument("--cache", help="cache directory (overrides the config)")
    parser.add_argument("--run-dir", dest="run_dir", help="where checkpoints and exports go")
    parser.add_argument("--resume", default="", help="auto (newest checkpoint of --run-dir) or a checkpoint path")
    parser.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or "
                        "sqlite:///mlflow.db)")


def load_pretrain_config(args: argparse.Namespace):
    from medmoco.config import PretrainConfig, load_config, parse_overrides, set_dotted

    overrides = parse_overrides(args.set)
    if args.cache:
        overrides["cache"] = args.cache
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    if args.tracking_uri:
        set_dotted(overrides, "tracking.uri", args.tracking_uri)
    return load_config(PretrainConfig, args.config, overrides)


def validate(config) -> None:
    """Fail before any work: missing cache, queue vs global batch, resume target."""
    import ignite.distributed as idist

    from dicom_preprocess import open_cache
    from medmoco.models import check_queue_batch

    if not config.cache:
        raise ConfigError("cache: required (a directory made by `medmoco preprocess`)")
    try:
        open_cache(config.cache)
    except FileNotFoundError as err:
        raise ConfigError(f"cache: {err}") from None
    try:
        check_queue_batch(config.moco.K, config.batch_size * idist.get_world_size())
    except ValueError as err:
        raise ConfigError(str(err)) from None


def training(local_rank: int, config, resume: str = "") -> dict:
    """The whole run on one rank (ignite examples' ``training(local_rank, config)``)."""
    import ignite.distributed as idist
    import torch
    from ignite.engine import Events
    from ignite.utils import manual_seed

    from dicom_preprocess import open_cache
    from medmoco.config import flatten, to_dict
    from medmoco.engines.common import (RNGState, attach_checkpointing, attach_progress, device_for, resume_from,
                                       run_or_complete)
    from medmoco.engines.checkpoints import check_resume, run_identity
    from medmoco.engines.knn import knn_monitor
    from medmoco.handlers import StopOnSignal
    from medmoco.engines.pretrain import create_pretrainer, get_dataflow, in_channels, initialize
    from medmoco.models import export_backbone
    from medmoco.models.backbones import feature_size
    from medmoco.tracking import TrackingHandler, create_tracker

    rank = idist.get_rank()
    validate(config)
    manual_seed(config.seed)  # ignite seeds torch, numpy and random (the seed is offset by rank nowhere: same init)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cache = open_cache(config.cache)
    loader = get_dataflow(config, cache)
    model, optimizer, scheduler, scaler, lr = initialize(config, cache)
    trainer = create_pretrainer(model, optimizer, scaler, config)
    StopOnSignal().attach(trainer)  # first: a signal ends the run between iterations (SLURM scancel, requeue)
    moco = getattr(model, "module", model)
    to_save = {"model": moco, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": trainer,
               "scaler": scaler, "rng": RNGState()}
    os.makedirs(config.run_dir, exist_ok=True)
    # refuse a checkpoint of another cache or network before loading it (medmoco.engines.checkpoints)
    check_resume(config.run_dir, run_identity("pretrain", cache.fingerprint, flatten(to_dict(config))), bool(resume))
    resume_from(resume, config.run_dir, to_save)
    world = idist.get_world_size()
    # The tracker continues the run of run_dir/mlflow_run_id when resuming, and spools its calls
    # in run_dir while the MLflow store is unreachable (medmoco.tracking).
    tracker = create_tracker(config.tracking.enabled, config.tracking.uri, config.tracking.experiment,
                             config.tracking.run_name, tags={"stage": "pretrain", "cache_fingerprint": cache.fingerprint},
                             run_dir=config.run_dir, resume=bool(resume), retry_s=config.tracking.retry_s)
    params = flatten(to_dict(config))
    params.update({"world_size": world, "global_batch": config.batch_size * world, "effective_lr": lr,
                   "in_channels": in_channels(config, cache), "steps_per_epoch": len(loader)})
    tracker.log_params(params)

    @trainer.on(Events.EPOCH_STARTED)
    def _set_epoch(engine):
        loader.sampler.set_epoch(engine.state.epoch)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _knn_monitor(engine):
        epoch = engine.state.epoch
        if config.knn_every and (epoch % config.knn_every == 0 or epoch == config.epochs) and rank == 0:
            auc = knn_monitor(moco.encoder_q.backbone, cache, device_for(config), config.knn_samples, config.knn_k,
                              config.seed, config.context)
            engine.state.epoch_metrics.update({f"knn_auc_{k}": v for k, v in auc.items()})
        if rank == 0:
            log.info("epoch %d: %s", epoch, json.dumps({k: round(v, 4) for k, v in engine.state.epoch_metrics.items()}))

    export_path = os.path.join(config.run_dir, "backbone.pt")

    @trainer.on(Events.COMPLETED)
    def _export(engine):
        if rank == 0:
            export_backbone(moco, export_path, config.moco.arch, in_channels(config, cache),
                            feature_size(config.moco.arch),
                            meta={"cache_fingerprint": cache.fingerprint, "image_size": config.image_size,
                                  "context": config.context, "mlflow_run_id": tracker.run_id or "",
                                  "epochs": engine.state.epoch})
            tracker.log_artifact(export_path, "backbone")
            tracker.set_tags({"backbone_export": os.path.abspath(export_path)})

    tracking = TrackingHandler(tracker, log_every=max(1, config.log_every), optimizer=optimizer)
    tracking.attach(trainer)  # after the kNN monitor and the export: it logs them and then closes the run
    scheduler.attach(trainer)  # after the epoch was logged at its own lr
    attach_checkpointing(trainer, to_save, config.run_dir, config.keep_checkpoints)  # after the lr step
    attach_progress(trainer, config.progress)
    run_or_complete(trainer, loader, config.epochs)
    idist.barrier()
    return {"history": tracking.history, "run_id": tracker.run_id, "export": export_path, "epochs": trainer.state.epoch}


def run(args: argparse.Namespace) -> int:
    from medmoco.distributed import log_level, run_on_ranks

    logging.basicConfig(level=log_level(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_pretrain_config(args)
    # One process unless torchrun/srun started this one as a rank (medmoco.distributed).
    run_on_ranks(_entry, config, args.resume, backend=config.backend, timeout_s=config.dist_timeout_s)
    return 0


def _entry(local_rank: int, config, resume: str) -> None:
    result = training(local_rank, config, resume)
    import ignite.distributed as idist

    if idist.get_rank() == 0:
        print(f"pretraining done: {result['epochs']} epochs; backbone -> {result['export']}; "
              + (f"MLflow run {result['run_id']}" if result['run_id'] else
               "MLflow store unreachable: tracking calls spooled in the run dir (send them with "
               "`medmoco tracking-replay --run-dir DIR`)"))
