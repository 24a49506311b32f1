"""Registry: register -> load models:/rsna-ich-moco@candidate -> predict, against the embedded store
and a real `mlflow server` process; model card and tags; the promotion guard; `mlflow models serve`."""
import base64
import glob
import json
import os
import subprocess
import sys
import urllib.request
import warnings

import numpy as np
import pandas as pd
import pytest

from dicom_preprocess import SUBTYPES
from medmoco.config import FinetuneConfig, load_config
from pipelines.evaluate import evaluate, predict
from pipelines.finetune import training
from pipelines.register import promote, register, versions_table

from .conftest import finetune_settings
from .servers import MlflowServer, free_port, wait_http

NAME = "rsna-ich-moco"


def _finetune_run(cache, run_dir, uri, seed=0, epochs=1, mode="scratch"):
    data = finetune_settings(cache, str(run_dir), "unused", mode=mode, epochs=epochs, seed=seed)
    data["tracking"] = {"uri": uri, "experiment": "test-registry"}
    return training(0, load_config(FinetuneConfig, None, data))


def _load(uri):
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")


def _eval_probs(model_file, cache, tmp_path):
    evaluate(model_file, cache, "all", str(tmp_path / "eval"))
    return pd.read_csv(tmp_path / "eval" / "predictions.csv").set_index("ID")["Label"]


def _check_against_evaluate(loaded, files, reference):
    ids = [os.path.basename(f)[: -len(".dcm")] for f in files]
    expected = np.array([[reference[f"{i}_{c}"] for c in SUBTYPES] for i in ids])
    by_bytes = loaded.predict(pd.DataFrame({"dicom": [open(f, "rb").read() for f in files]}))
    by_path = loaded.predict(pd.DataFrame({"path": files}))
    assert list(by_bytes.columns) == list(SUBTYPES)
    np.testing.assert_allclose(by_bytes.to_numpy(), expected, atol=2e-6)  # the CSV keeps 6 decimals
    np.testing.assert_array_equal(by_bytes.to_numpy(), by_path.to_numpy())
    return by_bytes


@pytest.fixture(scope="module")
def embedded(cls_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    runs = [_finetune_run(cls_cache, tmp / f"run{i}", uri, seed=i, epochs=1 + i) for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = register(runs[0]["run_id"], NAME, "candidate", uri)
    return {"uri": uri, "runs": runs, "version": reg["version"], "tmp": tmp,
            "warnings": [str(w.message) for w in caught]}


def test_registration_is_quiet(embedded):
    """MLflow warned "Add type hints to the `predict` method" twice per registration."""
    assert not [w for w in embedded["warnings"] if "type hint" in w.lower()], embedded["warnings"]


def test_registered_model_predicts_dicoms_like_evaluate(embedded, cls_cache, cls_archive, tmp_path):
    monkey_env = os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
    try:
        loaded = _load(embedded["uri"])
    finally:
        if monkey_env is not None:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = monkey_env
    reference = _eval_probs(embedded["runs"][0]["model"], cls_cache, tmp_path)
    files = sorted(glob.glob(os.path.join(cls_archive.images_dir, "*.dcm")))[:6]
    _check_against_evaluate(loaded, files, reference)
    # already-windowed uint8 tensors, straight from the cache
    from dicom_preprocess import open_cache
    import io

    cache = open_cache(cls_cache)
    rows = cache.indices()[:3]
    blobs = []
    for r in rows:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(cache[int(r)]))
        blobs.append(buffer.getvalue())
    out = loaded.predict(pd.DataFrame({"tensor": blobs}))
    ids = cache.manifest["image_id"].to_numpy()[rows]
    expected = np.array([[reference[f"{i}_{c}"] for c in SUBTYPES] for i in ids])
    np.testing.assert_allclose(out.to_numpy(), expected, atol=2e-6)


def test_registered_model_on_the_real_rsna_sample(embedded, real_sample_dir, tmp_path):
    loaded = _load(embedded["uri"])
    predict(embedded["runs"][0]["model"], real_sample_dir, str(tmp_path / "sub.csv"))
    reference = pd.read_csv(tmp_path / "sub.csv").set_index("ID")["Label"]
    files = sorted(glob.glob(os.path.join(real_sample_dir, "*.dcm")))
    assert len(files) == 32
    _check_against_evaluate(loaded, files, reference)


def test_version_description_and_tags_hold_the_run_metrics(embedded):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=embedded["uri"], registry_uri=embedded["uri"])
    version = client.get_model_version(NAME, str(embedded["version"]))
    run = client.get_run(embedded["runs"][0]["run_id"])
    for c in list(SUBTYPES) + ["mean"]:
        expected = run.data.metrics.get(f"best_auc_{c}", float("nan"))
        got = float(version.tags[f"auc_{c}"])
        assert (np.isnan(expected) and np.isnan(got)) or got == pytest.approx(expected, abs=1e-6), c
    assert version.tags["mode"] == "scratch" and version.tags["label_fraction"] == "1.0"
    assert version.tags["cache_fingerprint"] and version.tags["source_commit"]
    assert "research only" in version.description and "| any |" in version.description
    assert f"{run.data.metrics['best_auc_mean']:.4f}" in version.description
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == str(embedded["version"])


def test_promotion_guard_refuses_a_worse_version(embedded):
    from dicom_preprocess.config import ConfigError

    uri = embedded["uri"]
    second = register(embedded["runs"][1]["run_id"], NAME, "", uri)["version"]
    table = {row["version"]: row["auc_mean"] for row in versions_table(NAME, uri)}
    better, worse = sorted([embedded["version"], second], key=lambda v: table[v], reverse=True)
    assert table[better] != table[worse]
    promote(NAME, better, "champion", tracking_uri=uri)
    with pytest.raises(ConfigError, match="below champion"):
        promote(NAME, worse, "champion", tracking_uri=uri)
    with pytest.raises(ConfigError, match="--reason"):
        promote(NAME, worse, "champion", force=True, tracking_uri=uri)
    promote(NAME, worse, "champion", force=True, reason="reader study on site B", tracking_uri=uri)
    rows = {row["version"]: row for row in versions_table(NAME, uri)}
    assert "champion" in rows[worse]["aliases"]
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(NAME, str(worse)).tags
    assert tags["champion_override_reason"] == "reader study on site B"
    out = subprocess.run([sys.executable, "-m", "medmoco", "review", "--name", NAME, "--tracking-uri", uri],
                         capture_output=True, text=True, check=True)
    assert "AUC mean" in out.stdout and "champion" in out.stdout


@pytest.mark.slow
def test_against_a_real_mlflow_server_and_models_serve(cls_cache, cls_archive, tmp_path):
    server = MlflowServer(tmp_path).start()
    serve = None
    try:
        uri = server.uri
        result = _finetune_run(cls_cache, tmp_path / "run", uri)
        register(result["run_id"], NAME, "candidate", uri)
        reference = _eval_probs(result["model"], cls_cache, tmp_path)
        files = sorted(glob.glob(os.path.join(cls_archive.images_dir, "*.dcm")))[:4]
        expected = _check_against_evaluate(_load(uri), files, reference)
        serve_port = free_port()
        # the scoring server execs `uvicorn` from PATH: the venv's bin, even when it is not activated
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        env.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        serve = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@candidate",
                                  "--env-manager", "local", "--host", "127.0.0.1", "-p", str(serve_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        wait_http(f"http://127.0.0.1:{serve_port}/ping", serve, timeout=180)
        body = {"dataframe_split": {"columns": ["dicom"],
                                    "data": [[base64.b64encode(open(f, "rb").read()).decode()] for f in files]}}
        request = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=60))["predictions"]
        got = np.array([[row[c] for c in SUBTYPES] for row in answer])
        np.testing.assert_allclose(got, expected.to_numpy(), atol=1e-6)
    finally:
        if serve is not None:
            serve.terminate()
            try:
                serve.wait(timeout=20)
            except subprocess.TimeoutExpired:
                serve.kill()
        server.stop()
