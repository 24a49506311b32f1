"""The pretraining engine end to end: learning signal, MLflow, resume after kill -9, DDP (gloo)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medmoco.config import PretrainConfig, load_config
from pipelines.pretrain import training

from .conftest import kill_at_iterations_then_resume, pretrain_settings, replayed_steps, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _client(db):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _history(db, run_id, key):
    return {m.step: m.value for m in _client(db).get_metric_history(run_id, key)}


@pytest.mark.slow
def test_pretraining_lowers_the_loss_below_chance_and_logs_to_mlflow(tiny_cache, tmp_path):
    db = tmp_path / "mlflow.db"
    # Light views (crop 0.8-1, no blur/gamma): on the tiny 32 px phantoms the full recipe needs far
    # more than the ~250 iterations a test can afford; this checks the engine optimises the
    # contrastive objective, the recipe itself is exercised by the other tests and the demo.
    light = {"crop_scale": [0.8, 1.0], "blur_prob": 0.0, "gamma_prob": 0.0, "intensity_scale": 0.1,
             "intensity_shift": 0.05}
    data = pretrain_settings(tiny_cache, str(tmp_path / "run"), str(db), epochs=25, knn_every=25,
                             max_iters_per_epoch=10, moco={"K": 16}, augment=light,
                             optim={"lr": 0.5, "schedule": "constant"})
    config = load_config(PretrainConfig, write_yaml(tmp_path / "c.yaml", data))
    result = training(0, config)
    losses = [h["epoch_loss"] for h in result["history"]]
    # The loss starts low against the random initial queue, rises to chance log(K+1) = 2.83 while
    # the queue fills with real keys (all phantoms look alike at first), then falls as the
    # features spread (moco#9); on the way it may overshoot chance a little (worse than uniform).
    chance = float(np.log(17))
    assert max(losses) >= chance - 0.05, losses
    assert np.mean(losses[-5:]) < chance - 0.1, losses
    # The logged monitor is the query encoder's at the last epoch: recomputed from the exported
    # backbone it gives the same figures (and not those of a freshly initialised one).
    from dicom_preprocess import open_cache
    from medmoco.engines.knn import knn_monitor
    from medmoco.models import load_backbone_state
    from medmoco.models.backbones import create_backbone

    logged = {k[len("knn_auc_"):]: v for k, v in result["history"][-1].items() if k.startswith("knn_auc_")}
    backbone, _ = create_backbone("resnet18", 3)
    fresh = knn_monitor(backbone, open_cache(tiny_cache), "cpu", config.knn_samples, config.knn_k, config.seed)
    load_backbone_state(backbone, result["export"])
    again = knn_monitor(backbone, open_cache(tiny_cache), "cpu", config.knn_samples, config.knn_k, config.seed)
    assert set(logged) >= {"any", "mean"} and again == pytest.approx(logged, nan_ok=True)
    assert fresh != pytest.approx(logged, nan_ok=True)
    run = _client(db).get_run(result["run_id"])
    assert run.data.params["moco.K"] == "16" and run.data.params["global_batch"] == "8"
    for key in ("loss", "lr", "epoch_loss", "epoch_acc", "images_per_s", "data_wait_fraction", "knn_auc_any"):
        assert key in run.data.metrics, key
    steps = sorted(_history(db, result["run_id"], "loss"))
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % 25 == 0  # every iteration, log_every=1
    assert run.info.status == "FINISHED"
    assert os.path.exists(result["export"])


def test_knn_monitor_separates_separable_features_and_not_random_ones():
    from medmoco.engines.knn import knn_scores
    from medmoco.metrics import per_class_auc

    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, 6, generator=gen) < 0.3).float()
    centres = torch.nn.functional.normalize(torch.randn(6, 32, generator=gen), dim=1)
    feats = torch.nn.functional.normalize(labels @ centres + 0.1 * torch.randn(200, 32, generator=gen), dim=1)
    exclude = torch.eye(200, dtype=torch.bool)  # leave-one-out
    good = per_class_auc(labels.numpy(), knn_scores(feats, labels, feats, k=10, exclude=exclude).numpy())
    noise = torch.nn.functional.normalize(torch.randn(200, 32, generator=gen), dim=1)
    rand = per_class_auc(labels.numpy(), knn_scores(noise, labels, noise, k=10, exclude=exclude).numpy())
    assert good["mean"] > 0.95
    assert 0.35 < rand["mean"] < 0.65


@pytest.mark.slow
def test_killed_twice_and_resumed_run_logs_the_same_losses_and_weights(tiny_cache, tmp_path):
    """SIGKILLed mid-epoch 2 (iteration 6) and again in epoch 4 (iteration 15): every loss of the
    uninterrupted run, in order, with the iterations between a checkpoint and a kill logged twice
    with the same value; the same weights; one MLflow run."""
    epochs, iters, kills = 5, 4, [6, 15]
    config = {}
    for name in ("straight", "killed"):
        data = pretrain_settings(tiny_cache, str(tmp_path / name), str(tmp_path / f"{name}.db"), epochs=epochs,
                                 deterministic=True, keep_checkpoints=epochs)
        config[name] = write_yaml(tmp_path / f"{name}.yaml", data)
    training(0, load_config(PretrainConfig, config["straight"]))
    kill_at_iterations_then_resume("pretrain", config["killed"], tmp_path / "killed" / "backbone.pt", kills)
    training(0, load_config(PretrainConfig, config["killed"]), resume="auto")
    history = {}
    for name in ("straight", "killed"):
        client = _client(tmp_path / f"{name}.db")
        run_id = open(tmp_path / name / "mlflow_run_id").read().strip()
        history[name] = [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"),
                                                            key=lambda m: (m.timestamp, m.step))]
        assert len(client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id])) == 1
        assert client.get_run(run_id).info.status == "FINISHED"
    straight = dict(history["straight"])
    assert [step for step, _ in history["straight"]] == list(range(1, epochs * iters + 1))
    expected = [(step, straight[step]) for step in replayed_steps(kills, iters, epochs * iters)]
    assert history["killed"] == expected  # the whole history, replayed entries included, in order
    assert len(expected) == epochs * iters + 3  # 5, 13, 14 twice
    a = torch.load(tmp_path / "straight" / "backbone.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "backbone.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_killed_after_its_last_checkpoint_completes_without_training_again(tiny_cache, tmp_path):
    """Killed between the last epoch's checkpoint and the export: ignite's run() would start such a
    finished state again from epoch 0; --resume auto only completes it."""
    data = pretrain_settings(tiny_cache, str(tmp_path / "run"), str(tmp_path / "db"), epochs=2)
    config = load_config(PretrainConfig, write_yaml(tmp_path / "c.yaml", data))
    first = training(0, config, resume="auto")
    os.remove(first["export"])  # as if killed before the export
    second = training(0, config, resume="auto")
    assert os.path.exists(second["export"]) and second["history"] == [] and second["epochs"] == 2
    losses = _client(tmp_path / "db").get_metric_history(first["run_id"], "loss")
    assert len(losses) == 2 * 4  # nothing trained again


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from medmoco.engines.common import find_resume_checkpoint

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    torch.save({"x": torch.ones(1)}, ckpt / "checkpoint_1.pt")
    (ckpt / "checkpoint_2.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="checkpoint_2.pt is unreadable"):
        path, state = find_resume_checkpoint("auto", str(tmp_path))
    assert path.endswith("checkpoint_1.pt") and torch.equal(state["x"], torch.ones(1))


def test_queue_and_global_batch_are_checked_before_any_work(tiny_cache, tmp_path):
    from dicom_preprocess.config import ConfigError

    data = pretrain_settings(tiny_cache, str(tmp_path / "r"), str(tmp_path / "db"), moco={"K": 30})
    config = load_config(PretrainConfig, write_yaml(tmp_path / "c.yaml", data))
    with pytest.raises(ConfigError, match="moco.K=30 must be a multiple of the global batch 8"):
        training(0, config)
    assert not os.path.exists(tmp_path / "r" / "checkpoints")
    data["cache"] = str(tmp_path / "nowhere")
    config = load_config(PretrainConfig, write_yaml(tmp_path / "c.yaml", data))
    with pytest.raises(ConfigError, match="cache"):
        training(0, config)


def _torchrun(args, **kw):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                          + args, capture_output=True, text=True, timeout=300, cwd=REPO, **kw)


@pytest.mark.slow
def test_ddp_two_gloo_ranks_share_the_queue_and_unshuffle_in_order():
    result = _torchrun([os.path.join(REPO, "tests", "ddp_moco_checks.py")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(": ok") == 2


@pytest.mark.slow
def test_ddp_pipeline_writes_one_run_and_rank0_checkpoints(tiny_cache, tmp_path):
    db = tmp_path / "ddp.db"
    data = pretrain_settings(tiny_cache, str(tmp_path / "run"), str(db), epochs=2, batch_size=4,
                             moco={"bn_splits": 1}, keep_checkpoints=5)
    cfg = write_yaml(tmp_path / "ddp.yaml", data)
    result = _torchrun(["-m", "medmoco", "pretrain", "--config", cfg])
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _client(db).search_runs([_client(db).get_experiment_by_name("test-pretrain").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.params["world_size"] == "2" and runs[0].data.params["global_batch"] == "8"
    files = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert files == ["checkpoint_1.pt", "checkpoint_2.pt"]


@pytest.mark.parametrize("override, named", [
    ("moco.K=30", "moco.K=30 must be a multiple of the global batch 8"),
    ("moco.bogus=1", "moco: unknown key(s) ['bogus']"),
    ("epochs=abc", "epochs: expected an integer, got 'abc'"),
    ("amp=fp8", "amp 'fp8'"),
    ("cache=/nowhere/cache", "cache /nowhere/cache: no such directory"),
])
def test_cli_refuses_bad_settings_before_any_work(tiny_cache, tmp_path, capsys, override, named):
    """The `medmoco` entry point, called in this process (a subprocess per case cost 5 s of imports)."""
    from pipelines.cli import main

    cfg = write_yaml(tmp_path / "c.yaml", pretrain_settings(tiny_cache, str(tmp_path / "run"), str(tmp_path / "db")))
    assert main(["pretrain", "--config", cfg, "--set", override]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "db").exists()


def test_a_job_killed_before_its_first_checkpoint_resumes_into_the_same_run(tiny_cache, tmp_path):
    """--resume auto with no checkpoint yet (killed in epoch 1) continues the job's MLflow run
    instead of leaving it RUNNING forever beside a new one; leftovers of an interrupted atomic
    checkpoint save are removed."""
    import shutil

    db = tmp_path / "db"
    data = pretrain_settings(tiny_cache, str(tmp_path / "run"), str(db), epochs=1)
    config = load_config(PretrainConfig, write_yaml(tmp_path / "c.yaml", data))
    first = training(0, config, resume="auto")
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed before the first save
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "tmpk3x9_q").write_bytes(b"half a checkpoint")
    second = training(0, config, resume="auto")
    assert second["run_id"] == first["run_id"]
    client = _client(db)
    runs = client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["checkpoint_1.pt"]
