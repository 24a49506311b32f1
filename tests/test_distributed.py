"""DDP faults: one of two gloo ranks dies; the other ends with a clear error instead of hanging.

The two ranks are started as srun starts tasks (each process gets RANK/WORLD_SIZE/MASTER_ADDR and
nothing supervises them), so no launcher kills the survivor for us: medmoco itself must stop.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from medmoco.distributed import is_peer_failure, launched

from .conftest import pretrain_settings, write_yaml
from .servers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launched_reads_torchrun_and_srun_environments(monkeypatch):
    for key in ("WORLD_SIZE", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert not launched()
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    assert not launched()  # sbatch's shell itself is not a rank
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launched()


def test_peer_failures_are_told_from_other_errors():
    assert is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1"))
    assert is_peer_failure(torch.distributed.DistBackendError("NCCL watchdog timeout"))
    assert not is_peer_failure(ValueError("moco.K=30 must be a multiple of the global batch 8"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_other_with_a_clear_error(tiny_cache, tmp_path):
    db = tmp_path / "ddp.db"
    data = pretrain_settings(tiny_cache, str(tmp_path / "run"), str(db), epochs=200, batch_size=4,
                             moco={"bn_splits": 1}, dist_timeout_s=60)
    cfg = write_yaml(tmp_path / "c.yaml", data)
    port = free_port()
    ranks = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        ranks.append(subprocess.Popen([sys.executable, "-m", "medmoco", "pretrain", "--config", cfg], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        first = tmp_path / "run" / "checkpoints" / "checkpoint_1.pt"
        deadline = time.time() + 240
        while not first.exists() and time.time() < deadline and all(p.poll() is None for p in ranks):
            time.sleep(0.05)
        if not first.exists():
            for proc in ranks:
                proc.kill()
            pytest.fail("training did not get going: " + ranks[0].communicate()[1][-2000:])
        ranks[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, err = ranks[0].communicate(timeout=120)
        waited = time.time() - killed_at
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    assert ranks[0].returncode == 1, err[-3000:]
    assert "lost another rank" in err and "--resume auto" in err
    assert waited < 60, f"the surviving rank took {waited:.0f} s to stop"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
