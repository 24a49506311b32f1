"""What the pretraining and fine-tuning engines share: device and autocast, RNG state, checkpoints
and resume, the optimizer and its per-epoch schedule, and the per-epoch statistics.

Handlers follow ignite's (and MONAI's) protocol: an object with ``attach(engine)`` and
``__call__(engine)``. On ``EPOCH_COMPLETED`` ignite runs handlers in the order they were attached;
the stages attach statistics, then evaluation and tracking, then the lr step, then the
checkpoint, so that a checkpoint holds the state the next epoch starts from.
"""
from __future__ import annotations

import glob
import logging
import math
import os
import random
import re
import warnings
from contextlib import nullcontext

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver, Timer
from ignite.metrics import Average, Frequency

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint"


# --- device, precision, randomness ---------------------------------------------------------------

def device_for(config) -> torch.device:
    """``config.device`` when set, else this rank's device (``cuda:<local rank>`` or cpu)."""
    if config.device:
        return torch.device(config.device)
    return idist.device()


def autocast(amp: str, device: torch.device | str):
    """bf16 autocast (CPU and CUDA) or fp16 (CUDA, with a GradScaler); ``none`` = fp32."""
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 on CUDA only (bf16 needs none)."""
    return torch.amp.GradScaler("cuda", enabled=amp == "fp16" and device.type == "cuda")


class RNGState:
    """torch / numpy / python RNG states as a checkpointable object (tensors and ints only, so the
    checkpoint loads with ``weights_only=True``)."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
                "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
                "python": torch.tensor(internal, dtype=torch.int64), "python_version": int(version)}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_has_gauss"], state["numpy_cached"]))
        random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), None))


# --- optimizer and schedule --------------------------------------------------------------------

class EpochLRScheduler:
    """Steps a per-epoch torch lr scheduler once at ``EPOCH_COMPLETED``, as the MoCo reference does.

    ignite's ``LRScheduler`` wrapper is built for per-iteration schedules attached to
    ``ITERATION_STARTED``; this one is stepped after the epoch's figures were logged and before the
    checkpoint is written, so a checkpoint holds the lr of the epoch that follows it.
    """

    def __init__(self, lr_scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.lr_scheduler = lr_scheduler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.lr_scheduler.step()

    def state_dict(self) -> dict:
        return self.lr_scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.lr_scheduler.load_state_dict(state)


def build_optimizer_and_scheduler(optim_cfg, params, epochs: int, global_batch: int):
    """SGD or Adam at ``optim_cfg.lr`` per 256 images scaled to the global batch (MoCo's rule), and
    its per-epoch schedule (cosine, step at milestones, or constant).

    Returns:
        (optimizer, :class:`EpochLRScheduler` to attach to the trainer, the effective lr).
    """
    lr = optim_cfg.lr * global_batch / 256.0
    if optim_cfg.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=optim_cfg.weight_decay)

    def factor(epoch: int) -> float:
        if optim_cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        if optim_cfg.schedule == "step":
            return optim_cfg.gamma ** sum(epoch >= m for m in optim_cfg.milestones)
        return 1.0

    return optimizer, EpochLRScheduler(torch.optim.lr_scheduler.LambdaLR(optimizer, factor)), lr


# --- per-epoch statistics ------------------------------------------------------------------------

class EpochStatistics:
    """Per-epoch mean loss and accuracy, images/s and the data-wait fraction in
    ``engine.state.epoch_metrics`` (with the lr the epoch ran at).

    Loss and accuracy are ignite ``Average`` metrics and images/s an ignite ``Frequency``, all
    reduced over ranks (a collective: every rank runs this handler). The data-wait fraction is the
    time the step waited for the loader over the whole iteration time, on this rank (two ignite
    ``Timer``s): the figure that says whether the GPU starves (healthy: a few percent).

    The step's output must be a dict with ``loss``, ``acc`` and ``images``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None = None):
        self.optimizer = optimizer
        self.loss = Average(output_transform=lambda out: out["loss"])
        self.acc = Average(output_transform=lambda out: out["acc"])
        self.rate = Frequency(output_transform=lambda out: out["images"])
        self.wait = Timer(average=False)
        self.step = Timer(average=False)

    def attach(self, engine: Engine) -> None:
        self.loss.attach(engine, "epoch_loss")
        self.acc.attach(engine, "epoch_acc")
        # Frequency's own `completed` stores an int; the float is read in __call__.
        engine.add_event_handler(Events.EPOCH_STARTED, self.rate.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.rate.iteration_completed)
        self.wait.attach(engine, start=Events.EPOCH_STARTED, resume=Events.GET_BATCH_STARTED,
                         pause=Events.GET_BATCH_COMPLETED)
        self.step.attach(engine, start=Events.EPOCH_STARTED, resume=Events.GET_BATCH_COMPLETED,
                         pause=Events.ITERATION_COMPLETED)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        wait, step = self.wait.value(), self.step.value()
        engine.state.epoch_metrics = {
            "epoch_loss": float(engine.state.metrics["epoch_loss"]),
            "epoch_acc": float(engine.state.metrics["epoch_acc"]),
            "images_per_s": float(self.rate.compute()),
            "data_wait_fraction": wait / max(wait + step, 1e-9),
        }
        if self.optimizer is not None:
            engine.state.epoch_metrics["lr"] = self.optimizer.param_groups[0]["lr"]


# --- checkpoints and resume ----------------------------------------------------------------------

def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoints of a run, newest (highest epoch) first."""
    paths = glob.glob(os.path.join(checkpoint_dir(run_dir), f"{CHECKPOINT_PREFIX}_*.pt"))

    def epoch_of(path: str) -> int:
        match = re.search(r"_(\d+)\.pt$", path)
        return int(match.group(1)) if match else -1

    return sorted(paths, key=epoch_of, reverse=True)


def load_checkpoint_file(path: str) -> dict:
    """``torch.load(weights_only=True)``: a checkpoint holds tensors and plain values only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume_checkpoint(resume: str, run_dir: str) -> tuple[str | None, dict | None]:
    """``auto``: the newest readable checkpoint of ``run_dir`` (a corrupt or truncated one is
    skipped with a warning); a path: that file. Returns (path, loaded state) or (None, None)."""
    if not resume:
        return None, None
    candidates = list_checkpoints(run_dir) if resume == "auto" else [resume]
    if resume != "auto" and not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    for path in candidates:
        try:
            return path, load_checkpoint_file(path)
        except Exception as err:
            if resume != "auto":
                raise ValueError(f"--resume {path}: unreadable checkpoint ({str(err)[:200]})") from None
            warnings.warn(f"checkpoint {path} is unreadable ({str(err)[:120]}); trying the previous one")
    return None, None


def resume_from(resume: str, run_dir: str, to_load: dict) -> str | None:
    """Restore ``to_load`` (ignite ``Checkpoint.load_objects``) from the checkpoint ``resume``
    names; returns its path, or None when there is nothing to resume from."""
    path, state = find_resume_checkpoint(resume, run_dir)
    if state is None:
        return None
    Checkpoint.load_objects(to_load=to_load, checkpoint=state)
    if idist.get_rank() == 0:
        log.warning("resumed from %s (epoch %d)", path, to_load["trainer"].state.epoch)
    return path


def attach_checkpointing(trainer: Engine, to_save: dict, run_dir: str, keep: int) -> Checkpoint:
    """Every epoch, keep the last ``keep``. Built on every rank; only rank 0 writes (ignite#2035).

    ``DiskSaver(atomic=True)`` writes ``tmp*`` beside the checkpoints and renames it; a job killed
    during a save leaves that file behind (hundreds of MB for a ResNet-50 with its queue), so
    rank 0 removes such leftovers before the first save.
    """
    folder = checkpoint_dir(run_dir)
    if idist.get_rank() == 0 and os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith("tmp") and not name.endswith(".pt"):
                os.remove(os.path.join(folder, name))
    saver = DiskSaver(folder, require_empty=False, atomic=True)
    handler = Checkpoint(to_save, saver, filename_prefix=CHECKPOINT_PREFIX, n_saved=keep,
                         global_step_transform=lambda engine, _: engine.state.epoch,
                         filename_pattern="{filename_prefix}_{global_step}.{ext}")
    trainer.add_event_handler(Events.EPOCH_COMPLETED, handler)
    return handler


def attach_progress(trainer: Engine, enabled: bool) -> None:
    """A tqdm bar of the loss on rank 0."""
    if enabled and idist.get_rank() == 0:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": out["loss"]})


def run_or_complete(trainer: Engine, data, max_epochs: int):
    """``trainer.run(data, max_epochs)``, except for a run resumed from the checkpoint of its last
    epoch (killed while exporting or reporting): ignite's ``run`` treats a finished state as a new
    run and trains again from epoch 0, so here only the ``COMPLETED`` handlers run."""
    if 0 < max_epochs <= trainer.state.epoch:
        log.warning("training finished before (epoch %d of %d); completing the run", trainer.state.epoch, max_epochs)
        trainer.fire_event(Events.COMPLETED)
        return trainer.state
    return trainer.run(data, max_epochs=max_epochs)


FAILPOINT_KILL_AT_ITERATION = "MEDMOCO_FAILPOINT_KILL_AT_ITERATION"


def attach_failpoints(trainer: Engine) -> None:
    """Fault injection for the kill-and-resume tests, read once: with
    ``MEDMOCO_FAILPOINT_KILL_AT_ITERATION=N`` the process SIGKILLs itself right after iteration N
    (before that iteration is logged), as an OOM killer or a lost node would. Unset in normal use."""
    import signal

    at = int(os.environ.get(FAILPOINT_KILL_AT_ITERATION, "0") or 0)
    if at > 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=at), lambda engine: os.kill(os.getpid(),
                                                                                                signal.SIGKILL))
