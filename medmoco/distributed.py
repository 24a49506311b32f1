"""Running a stage on one process or on every rank of a torchrun / srun job.

``torch.distributed`` is set up through ``ignite.distributed`` (``idist.initialize`` reads the
environment torchrun or srun gives each task: rank, world size, ``MASTER_ADDR``; under SLURM
ignite derives them from ``SLURM_PROCID``/``SLURM_JOB_NODELIST``). A plain ``medmoco pretrain``
runs in its one process. ``idist.Parallel`` is not used because it cannot pass the process
group ``timeout``, and that timeout is what bounds how long a rank waits for a peer that hangs.

A rank whose peer died gets an error from its next collective (gloo: "Connection closed by
peer"; NCCL: the watchdog after ``timeout``). It is turned into :class:`PeerFailure`, which
says which rank saw what and how to continue, so no rank sits silently in a collective.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Callable

# Words of the errors torch.distributed raises when a peer is gone or does not answer.
PEER_FAILURE_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                      "timeout", "connection refused", "socket", "nccl", "gloo", "store", "recvbytes", "sendbytes")


class PeerFailure(RuntimeError):
    """Another rank of the job died or stopped answering."""


def launched() -> bool:
    """True under torchrun (``WORLD_SIZE``) or inside an srun task (``SLURM_PROCID``)."""
    return "WORLD_SIZE" in os.environ or ("SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ)


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun's ``RANK``, srun's ``SLURM_PROCID``),
    readable before the process group exists: logging is set up before it."""
    for key in ("RANK", "SLURM_PROCID"):
        try:
            return int(os.environ[key])
        except (KeyError, ValueError):
            continue
    return 0


def log_level() -> int:
    """INFO on rank 0, WARNING elsewhere: N ranks repeating ignite's and medmoco's INFO lines made
    a job's log N times longer and no clearer."""
    import logging

    return logging.INFO if launch_rank() == 0 else logging.WARNING


def refuse_allocation_without_srun() -> None:
    """Inside a SLURM allocation of several tasks, a command started by the batch script or an
    ``salloc`` shell (not by ``srun``) sees ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N``: ignite would
    make it rank 0 of N and wait for ranks that never come (30 minutes, then a ``DistStoreError``).
    srun marks each task it starts with ``SLURM_STEP_ID``; torchrun sets ``WORLD_SIZE``.

    Raises:
        ConfigError: one line saying to start the command with srun.
    """
    env = os.environ
    tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
    if "SLURM_JOB_ID" in env and tasks > 1 and "SLURM_STEP_ID" not in env and "WORLD_SIZE" not in env:
        from dicom_preprocess.config import ConfigError

        raise ConfigError(f"SLURM job {env['SLURM_JOB_ID']} has {tasks} tasks, but this process was not started by "
                          "srun: start it as `srun medmoco ...` (one process per task, each with its rank), or ask "
                          "for one task (-n 1)")


def default_backend(requested: str = "") -> str:
    import torch

    return requested or ("nccl" if torch.cuda.is_available() else "gloo")


def is_peer_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(sign in text for sign in PEER_FAILURE_SIGNS)


def run_on_ranks(entry: Callable[..., Any], *args: Any, backend: str = "", timeout_s: float = 1800.0) -> Any:
    """Call ``entry(local_rank, *args)`` in this process, inside the job's process group if launched.

    Args:
        entry: ``training(local_rank, config, ...)`` in the ignite examples' shape.
        backend: ``nccl``/``gloo``; "" picks nccl when CUDA is there.
        timeout_s: how long a collective waits for the other ranks before failing.

    Raises:
        PeerFailure: when another rank died or hung (the job ends instead of waiting forever).
    """
    import ignite.distributed as idist

    refuse_allocation_without_srun()
    in_group = launched()
    if in_group:
        idist.initialize(default_backend(backend), timeout=datetime.timedelta(seconds=timeout_s))
    try:
        return entry(idist.get_local_rank(), *args)
    except Exception as err:
        from medmoco.handlers import JobSignalled

        world = idist.get_world_size()
        if world > 1 and is_peer_failure(err) and not isinstance(err, JobSignalled):
            raise PeerFailure(
                f"rank {idist.get_rank()} of {world}: lost another rank ({type(err).__name__}: {str(err)[:300]}); "
                f"stopping instead of waiting (collectives time out after {timeout_s:.0f} s). Finished epochs "
                "are in the checkpoints: rerun the same command with --resume auto.") from err
        raise
    finally:
        if in_group:
            try:
                idist.finalize()
            except Exception:  # the group may be broken already; the process is ending anyway
                pass
