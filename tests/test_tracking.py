"""MLflow tracking when the server goes away: calls are spooled, training goes on, nothing is lost.

A real `mlflow server` process (SQLite backend) is started, killed and started again on the same
port; the training runs are real `medmoco pretrain` processes.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from medmoco.tracking import MlflowTracker, Spool, replay_spool, tracking_uri_scope

from .conftest import pretrain_settings, write_yaml
from .servers import MlflowServer, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Connection refused must fail at once in tests, not after MLflow's default seven retries.
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@pytest.fixture
def fast_fail(monkeypatch):
    for key, value in FAST_FAIL.items():
        monkeypatch.setenv(key, value)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_spool_keeps_calls_in_order_and_resumes_after_the_last_sent(tmp_path):
    spool = Spool(str(tmp_path))
    for i in range(3):
        spool.append({"op": "log_metrics", "metrics": [["loss", float(i), 0, i]]})
    with open(spool.path, "a") as handle:
        handle.write('{"op": "log_met')  # a line cut by kill -9: never acknowledged, ignored
    assert [op["metrics"][0][3] for op in spool.pending()] == [0, 1, 2]
    spool.mark_done(2)
    assert [op["metrics"][0][3] for op in spool.pending()] == [2]
    artifact = tmp_path / "report.txt"
    artifact.write_text("kept")
    spool.append({"op": "log_artifact", "path": str(artifact), "artifact_path": "report"})
    artifact.unlink()  # a temporary file gone by the time the server is back
    assert open(spool.pending()[-1]["path"]).read() == "kept"


def test_a_server_unreachable_at_start_gets_the_whole_run_on_replay(tmp_path, fast_fail, caplog):
    server = MlflowServer(tmp_path)  # its port, with nothing listening yet
    run_dir = tmp_path / "run"
    tracker = MlflowTracker(server.uri, "offline-exp", "r1", tags={"stage": "test"}, run_dir=str(run_dir))
    assert tracker.run_id is None and tracker.offline
    assert "unreachable" in caplog.text
    tracker.log_params({"lr": 0.03, "K": 65536})
    for step in range(1, 6):
        tracker.log_metrics({"loss": 10.0 - step, "lr": 0.1}, step)
    (tmp_path / "a.txt").write_text("artifact")
    tracker.log_artifact(str(tmp_path / "a.txt"), "report")
    tracker.finish("FINISHED")
    assert "medmoco tracking-replay" in caplog.text
    assert not (run_dir / "mlflow_run_id").exists()

    server.start()
    try:
        out = subprocess.run([sys.executable, "-m", "medmoco", "tracking-replay", "--run-dir", str(run_dir)],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        run = _client(server.uri).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["stage"] == "test"
        assert run.data.params == {"lr": "0.03", "K": "65536"}
        history = _client(server.uri).get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(s, 10.0 - s) for s in range(1, 6)]
        assert [a.path for a in _client(server.uri).list_artifacts(run_id, "report")] == ["report/a.txt"]
        assert not (run_dir / "mlflow_spool.jsonl").exists()
        with pytest.raises(FileNotFoundError, match="no spooled"):
            replay_spool(str(run_dir))
    finally:
        server.stop()


def test_replay_to_a_store_still_away_keeps_everything(tmp_path, fast_fail):
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = MlflowTracker(uri, "e", run_dir=str(tmp_path))
    tracker.log_metrics({"loss": 1.0}, 1)
    before = Spool(str(tmp_path)).pending()
    with pytest.raises(ConnectionError, match="still unreachable"):
        replay_spool(str(tmp_path))
    assert Spool(str(tmp_path)).pending() == before


def _wait(predicate, timeout=120, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


@pytest.mark.slow
def test_pretraining_goes_on_when_the_server_dies_and_catches_up_when_it_is_back(tiny_cache, tmp_path):
    """The server is SIGKILLed mid-run and started again later; the training process is paused
    (SIGSTOP) around each change so the test knows which side of it each step is on."""
    server = MlflowServer(tmp_path).start()
    run_dir = tmp_path / "run"
    epochs, iters = 6, 4
    data = pretrain_settings(tiny_cache, str(run_dir), "unused", epochs=epochs, keep_checkpoints=epochs)
    data["tracking"] = {"uri": server.uri, "experiment": "test-offline", "retry_s": 0.5}
    cfg = write_yaml(tmp_path / "c.yaml", data)
    env = {**os.environ, **FAST_FAIL}
    env.pop("MLFLOW_TRACKING_URI", None)
    train = subprocess.Popen([sys.executable, "-m", "medmoco", "pretrain", "--config", cfg], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = _client(server.uri)
        _wait(lambda: (run_dir / "mlflow_run_id").exists() or train.poll() is not None, what="run created")
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        _wait(lambda: len(client.get_metric_history(run_id, "loss")) >= 2 or train.poll() is not None,
              what="first losses")
        train.send_signal(signal.SIGSTOP)
        assert train.poll() is None, "training ended before the server could be stopped"
        server.stop(kill=True)
        train.send_signal(signal.SIGCONT)
        _wait(lambda: (run_dir / "mlflow_spool.jsonl").exists() or train.poll() is not None, what="spooling")
        train.send_signal(signal.SIGSTOP)
        spooled_while_down = len(Spool(str(run_dir)).pending())
        checkpoints_while_down = len(os.listdir(run_dir / "checkpoints")) if (run_dir / "checkpoints").exists() else 0
        server.start()
        train.send_signal(signal.SIGCONT)
        out, err = train.communicate(timeout=300)
    finally:
        if train.poll() is None:
            train.kill()
        server.stop()
    assert train.returncode == 0, err[-3000:]
    assert spooled_while_down >= 1
    assert "unreachable" in err and "spooled tracking calls sent" in err
    assert sorted(os.listdir(run_dir / "checkpoints")) == sorted(f"checkpoint_{e}.pt" for e in range(1, epochs + 1))
    assert checkpoints_while_down < epochs
    assert not (run_dir / "mlflow_spool.jsonl").exists()
    client = _client(f"sqlite:///{tmp_path / 'server.db'}")  # what the server stored, read without restarting it
    if True:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        losses = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert sorted(losses) == list(range(1, epochs * iters + 1))  # every iteration, none twice
        assert sorted(m.step for m in client.get_metric_history(run_id, "epoch_loss")) == list(range(1, epochs + 1))
        assert os.path.isfile(tmp_path / "server-artifacts" / run.info.experiment_id / run_id / "artifacts" /
                              "backbone" / "backbone.pt")
        assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tracking_uri_scope_restores_the_environment(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    default = mlflow.get_tracking_uri()
    with tracking_uri_scope(f"sqlite:///{tmp_path}/x.db") as uri:
        assert os.environ["MLFLOW_TRACKING_URI"] == uri == mlflow.get_tracking_uri() == mlflow.get_registry_uri()
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/y.db")  # later settings still take effect
    assert mlflow.get_registry_uri() == f"sqlite:///{tmp_path}/y.db"


def test_metric_history_falls_back_to_this_process_when_offline(tmp_path, fast_fail):
    tracker = MlflowTracker(f"http://127.0.0.1:{free_port()}", "e", run_dir=str(tmp_path))
    tracker.log_metrics({"loss": 2.0}, 1)
    tracker.log_metrics({"loss": 1.0}, 2)
    assert tracker.metric_history(["loss"]) == {"loss": [(1, 2.0), (2, 1.0)]}
    lines = [json.loads(line) for line in open(tmp_path / "mlflow_spool.jsonl")]
    assert [op["op"] for op in lines] == ["create_run", "log_metrics", "log_metrics"]


def test_resuming_against_another_store_names_the_run_and_what_to_do(tmp_path):
    from dicom_preprocess.config import ConfigError

    first = MlflowTracker(f"sqlite:///{tmp_path}/a.db", "e", run_dir=str(tmp_path / "run"))
    first.finish()
    with pytest.raises(ConfigError, match=f"continues MLflow run {first.run_id}.*delete"):
        MlflowTracker(f"sqlite:///{tmp_path}/b.db", "e", run_id=first.run_id, run_dir=str(tmp_path / "run"),
                      resume=True)


def test_a_moved_store_is_refused_until_relocated_then_writes_beside_itself(tmp_path):
    """make demo's SQLite store records absolute file locations: a copied demo-run/ must not write
    into (or read from) the original's files."""
    import shutil

    from medmoco.tracking import client, create_tracker
    from medmoco.tracking.relocate import MovedStore
    from pipelines.cli import main

    original = tmp_path / "demo-run"
    original.mkdir()
    uri = f"sqlite:///{original / 'mlflow.db'}"
    tracker = create_tracker(True, uri, "medmoco-finetune", run_dir=str(original / "run"))
    note = original / "note.txt"
    note.write_text("original")
    tracker.log_artifact(str(note), "report")
    run_id = tracker.run_id
    tracker.finish()
    copy = tmp_path / "moved"
    shutil.copytree(original, copy)
    moved_uri = f"sqlite:///{copy / 'mlflow.db'}"
    with pytest.raises(MovedStore, match=r"tracking-relocate --store .*moved/mlflow.db"):
        client(moved_uri)
    with pytest.raises(MovedStore):
        create_tracker(True, moved_uri, "medmoco-finetune", run_id=run_id)
    assert main(["tracking-relocate", "--store", str(copy / "mlflow.db")]) == 0
    # the copy now reads its own files and writes beside itself; the original is untouched. A new
    # process, as a user's next command is (MLflow caches each run's artifact location in-process).
    (copy / "mlartifacts" / "medmoco-finetune" / run_id / "artifacts" / "report" / "note.txt").write_text("copy")
    extra = tmp_path / "extra.txt"
    extra.write_text("new")
    script = (f"from medmoco.tracking import client, create_tracker\n"
              f"print(open(client({moved_uri!r}).download_artifacts({run_id!r}, 'report/note.txt', "
              f"{str(tmp_path / 'dl')!r})).read())\n"
              f"t = create_tracker(True, {moved_uri!r}, 'medmoco-finetune', run_id={run_id!r})\n"
              f"t.log_artifact({str(extra)!r}, 'report')\nt.finish()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "copy"
    assert (copy / "mlartifacts" / "medmoco-finetune" / run_id / "artifacts" / "report" / "extra.txt").exists()
    assert not (original / "mlartifacts" / "medmoco-finetune" / run_id / "artifacts" / "report" / "extra.txt").exists()
    assert (original / "mlartifacts" / "medmoco-finetune" / run_id / "artifacts" / "report" / "note.txt").read_text() \
        == "original"
    client(uri)  # the original store is where it was: not refused
    assert main(["tracking-relocate", "--store", str(copy / "mlflow.db")]) == 0  # again: nothing to change
