"""The sbatch templates run the real pretraining under SLURM's environment (srun shimmed to one task).

`srun` is replaced by a script that sets the variables SLURM gives a task and runs the command, so
ignite.distributed's SLURM path (rank, world size, MASTER_ADDR from the node list) is exercised
for real with gloo; the template itself is run by bash unchanged.
"""
import glob
import os
import subprocess
import sys

import pytest

from .conftest import pretrain_settings, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = sorted(glob.glob(os.path.join(REPO, "configs", "slurm", "*.sbatch")))


def test_templates_exist_parse_and_hold_no_user_paths():
    assert len(TEMPLATES) >= 2
    for path in TEMPLATES:
        subprocess.run(["bash", "-n", path], check=True)
        text = open(path).read()
        for bad in ("/home/", "/scratch/", "/Users/", "~/"):
            assert bad not in text, f"{path} holds a user path {bad}"
        assert "srun" in text and "torchrun" not in text.split("ignite#2048")[1]


@pytest.mark.slow
def test_one_node_template_runs_pretraining_under_srun(tiny_cache, tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "srun").write_text(
        "#!/bin/bash\n# one task of a one-node job, as srun would start it\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 SLURM_JOB_NUM_NODES=1 "
        "SLURM_JOB_NODELIST=localhost MASTER_ADDR=127.0.0.1\nexec \"$@\"\n")
    (shim / "srun").chmod(0o755)
    (shim / "python").write_text(f"#!/bin/bash\nexec {sys.executable} \"$@\"\n")
    (shim / "python").chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    data = pretrain_settings(tiny_cache, "unused", str(tmp_path / "mlflow.db"), epochs=1)
    config = write_yaml(tmp_path / "c.yaml", data)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "medmoco-test", "SLURM_CPUS_PER_TASK": "2", "MEDMOCO_VENV": str(venv),
           "MEDMOCO_CONFIG": config, "MEDMOCO_RUN_DIR": str(tmp_path / "run"), "MEDMOCO_CACHE": tiny_cache,
           # a lab-wide server in the environment; the config's own tracking.uri must win over it
           "MLFLOW_TRACKING_URI": "http://127.0.0.1:9/nothing-listens-here"}
    result = subprocess.run(["bash", TEMPLATES[0]], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(tmp_path / "run" / "backbone.pt")
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "checkpoint_1.pt")
    assert os.path.exists(tmp_path / "mlflow.db") and not os.path.exists(tmp_path / "run" / "mlflow_spool.jsonl")
