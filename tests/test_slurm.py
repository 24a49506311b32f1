"""A lab's HPC day on a real SLURM: the shipped templates (slurm/) submitted with sbatch to a
single-node cluster of Debian's slurm-wlm + munge that this module starts on 127.0.0.1 and stops
by PID. Two-task CPU DDP pretraining, a requeue that resumes into the same MLflow run with both
logs kept, scancel marking the run KILLED, a preprocessing array + dependent merge equal to one
run, two submissions apart, and a multi-task allocation entered without srun refused at start."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest

from dicom_preprocess import open_cache
from dicom_preprocess.config import PreprocessConfig
from dicom_preprocess.job import run_preprocess

from .conftest import caches_equal, pretrain_settings, write_yaml
from .slurm_cluster import SlurmCluster, missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = sorted(glob.glob(os.path.join(REPO, "slurm", "*.sbatch")))


def test_templates_parse_and_hold_no_user_paths():
    assert {os.path.basename(p) for p in TEMPLATES} >= {"train_gpu.sbatch", "train_cpu.sbatch",
                                                         "preprocess_array.sbatch", "preprocess_merge.sbatch"}
    for path in TEMPLATES + [os.path.join(REPO, "slurm", "forward_signals.sh")]:
        subprocess.run(["bash", "-n", path], check=True)
        text = open(path).read()
        for bad in ("/home/", "/scratch/", "/Users/", "~/"):
            assert bad not in text, f"{path} holds a user path {bad}"
    for name in ("train_gpu.sbatch", "train_cpu.sbatch"):
        text = open(os.path.join(REPO, "slurm", name)).read()
        commands = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert "#SBATCH --open-mode=append" in text and "${SLURM_JOB_ID}" in commands and "srun " in commands
        assert "torchrun" not in commands  # srun alone starts the ranks (ignite#2048)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    absent = missing()
    if absent:
        pytest.skip(f"SLURM is not installed here ({', '.join(absent)} missing; `make test` installs slurm-wlm and "
                    "munge with apt where it can)")
    if os.getuid() != 0:
        pytest.skip("the test cluster runs slurmd as root (SlurmdUser=root); these tests need root")
    slurm = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        slurm.start()
    except Exception as err:  # pragma: no cover - reported, not hidden
        slurm.stop()
        pytest.fail(f"the test SLURM cluster did not start: {err}")
    yield slurm
    slurm.stop()


def _submit_dir(tmp_path) -> str:
    """A submit folder like a lab's checkout: the templates' `cd $SLURM_SUBMIT_DIR` finds slurm/
    there; runs/ and logs land there, not in this repository."""
    work = tmp_path / "lab"
    work.mkdir()
    os.symlink(os.path.join(REPO, "slurm"), work / "slurm")
    return str(work)


def _env(config: str, **extra) -> dict:
    return {"MEDMOCO_CONFIG": config, "MEDMOCO_VENV": sys.prefix, "PYTHONUNBUFFERED": "1", **extra}


def _mlflow(db):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{db}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_dir(submit: str, job: str) -> str:
    found = glob.glob(os.path.join(submit, "runs", f"*-{job}"))
    assert len(found) == 1, os.listdir(os.path.join(submit, "runs")) if os.path.isdir(os.path.join(submit, "runs")) else []
    return found[0]


def _wait_for(path_pattern: str, job: str, cluster, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if glob.glob(path_pattern):
            return
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), cluster.job(job)
        time.sleep(0.5)
    raise TimeoutError(path_pattern)


def _submit_pretraining(cluster, cache: str, tmp_path, epochs: int, until_checkpoint: int):
    """The CPU template on ``cache``, submitted from a scratch checkout; returns once the job's run
    directory holds ``checkpoint_<until_checkpoint>.pt``: (submit dir, job id, run dir, MLflow db)."""
    submit = _submit_dir(tmp_path)
    db = tmp_path / "mlflow.db"
    config = write_yaml(tmp_path / "pretrain.yaml", pretrain_settings(cache, "unused", str(db), epochs=epochs))
    job = cluster.sbatch("--output=%x-%j.out", "slurm/train_cpu.sbatch", env=_env(config), cwd=submit)
    run_dir = os.path.join(submit, "runs", f"medmoco-pretrain-cpu-{job}")
    _wait_for(os.path.join(run_dir, "checkpoints", f"checkpoint_{until_checkpoint}.pt"), job, cluster)
    return submit, job, run_dir, db


def test_cpu_template_trains_two_ranks_and_a_requeue_resumes_into_the_same_mlflow_run(cluster, tiny_cache, tmp_path):
    submit, job, run_dir, db = _submit_pretraining(cluster, tiny_cache, tmp_path, epochs=6, until_checkpoint=2)
    cluster.scontrol("requeue", job)  # as an admin or a preempting job would
    deadline = time.time() + 60
    while cluster.job(job).get("JobState") not in ("PENDING",) and time.time() < deadline:
        time.sleep(0.3)
    cluster.scontrol("update", f"JobId={job}", "StartTime=now")  # SLURM delays a requeued job's start
    info = cluster.wait(job)
    log = open(os.path.join(submit, f"medmoco-pretrain-cpu-{job}.out")).read()
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, log[-3000:])
    assert f"job {job} (restart 0)" in log and f"job {job} (restart 1)" in log  # both logs kept (append)
    assert "resumed from" in log
    assert os.path.exists(os.path.join(run_dir, "backbone.pt"))
    client = _mlflow(db)
    runs = client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id])
    assert len(runs) == 1  # one MLflow run across the requeue
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert open(os.path.join(run_dir, "mlflow_run_id")).read().strip() == run.info.run_id
    # every epoch once in the run (an epoch cut by the requeue is trained again and logged once)
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "epoch_loss")}) == [1, 2, 3, 4, 5, 6]


def test_scancel_marks_the_mlflow_run_killed(cluster, tiny_cache, tmp_path):
    submit, job, run_dir, db = _submit_pretraining(cluster, tiny_cache, tmp_path, epochs=200, until_checkpoint=1)
    cluster.scancel(job)
    info = cluster.wait(job)
    log = open(os.path.join(submit, f"medmoco-pretrain-cpu-{job}.out")).read()
    assert info["JobState"] == "CANCELLED", info
    client = _mlflow(db)
    run = client.get_run(open(os.path.join(run_dir, "mlflow_run_id")).read().strip())
    assert run.info.status == "KILLED", log[-3000:]
    assert "stopped by SIGTERM" in log and "Traceback" not in log


def test_two_submissions_keep_apart_and_resume_refuses_another_cache(cluster, tiny_cache, cls_cache, tmp_path):
    submit = _submit_dir(tmp_path)
    db = tmp_path / "mlflow.db"
    jobs = {}
    for name, cache in (("a", tiny_cache), ("b", cls_cache)):
        config = write_yaml(tmp_path / f"{name}.yaml", pretrain_settings(cache, "unused", str(db), epochs=1))
        jobs[name] = cluster.sbatch("--output=%x-%j.out", "slurm/train_cpu.sbatch", env=_env(config), cwd=submit)
    for job in jobs.values():
        assert cluster.wait(job)["JobState"] == "COMPLETED", open(
            os.path.join(submit, f"medmoco-pretrain-cpu-{job}.out")).read()[-3000:]
    dirs = {name: _run_dir(submit, job) for name, job in jobs.items()}
    assert dirs["a"] != dirs["b"]
    ids = {name: open(os.path.join(d, "mlflow_run_id")).read().strip() for name, d in dirs.items()}
    assert ids["a"] != ids["b"]
    client = _mlflow(db)
    fingerprints = {name: client.get_run(i).data.tags["cache_fingerprint"] for name, i in ids.items()}
    assert fingerprints["a"] == open_cache(tiny_cache).fingerprint and fingerprints["b"] == open_cache(cls_cache).fingerprint
    # the harm of one shared directory: job b's cache resumed into job a's run. Now refused, in one line.
    out = subprocess.run([sys.executable, "-m", "medmoco", "pretrain", "--config", str(tmp_path / "a.yaml"),
                          "--cache", cls_cache, "--run-dir", dirs["a"], "--resume", "auto"],
                         capture_output=True, text=True, timeout=300)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"--resume: {dirs['a']} holds the checkpoints of another job (cache" in last and "another --run-dir" in last


def test_preprocessing_array_and_dependent_merge_equal_one_run(cluster, archive, tmp_path):
    submit = _submit_dir(tmp_path)
    env = {"MEDMOCO_VENV": sys.prefix, "MEDMOCO_INPUT": archive.images_dir, "MEDMOCO_LABELS": archive.labels_csv,
           "MEDMOCO_PARTS": str(tmp_path / "parts"), "MEDMOCO_CACHE": str(tmp_path / "merged")}
    array = cluster.sbatch("--array=0-2", "--cpus-per-task=1", "slurm/preprocess_array.sbatch", "--size", "64",
                           "--files-per-shard", "8", env=env, cwd=submit)
    merge = cluster.sbatch(f"--dependency=afterok:{array}", "slurm/preprocess_merge.sbatch", env=env, cwd=submit)
    info = cluster.wait(merge)
    logs = "".join(open(p).read() for p in glob.glob(os.path.join(submit, "medmoco-preprocess*.out")))
    assert info["JobState"] == "COMPLETED", logs[-3000:]
    assert len(glob.glob(str(tmp_path / "parts" / "part-*"))) == 3
    one = str(tmp_path / "one")
    run_preprocess(PreprocessConfig(input=archive.images_dir, labels=archive.labels_csv, out=one, size=64,
                                    files_per_shard=8, workers=1), progress=False)
    caches_equal(open_cache(str(tmp_path / "merged")), open_cache(one))
    meta = json.load(open(tmp_path / "merged" / "metadata.json"))
    assert meta["images"] == len(open_cache(one))


def test_a_multi_task_allocation_without_srun_is_refused_at_start(cluster, tiny_cache, tmp_path):
    config = write_yaml(tmp_path / "p.yaml", pretrain_settings(tiny_cache, str(tmp_path / "run"),
                                                               str(tmp_path / "m.db"), epochs=1))
    job = cluster.sbatch("-n", "2", f"--output={tmp_path}/wrap-%j.out",
                         f"--wrap={sys.executable} -m medmoco pretrain --config {config}", cwd=str(tmp_path))
    info = cluster.wait(job, timeout=120)
    log = open(tmp_path / f"wrap-{job}.out").read()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), (info, log)
    assert log.strip().splitlines()[-1] == (
        f"medmoco pretrain: error: SLURM job {job} has 2 tasks, but this process was not started by srun: start it "
        "as `srun medmoco ...` (one process per task, each with its rank), or ask for one task (-n 1)")
