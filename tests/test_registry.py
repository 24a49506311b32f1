"""Registry: register -> load models:/rsna-ich-moco-candidates@candidate -> predict, against the
embedded store and a real `mlflow server` process; model card and tags; `mlflow models serve`.
Comparison and promotion: tests/test_review.py; roles and audit: tests/test_registry_access.py."""
import base64
import glob
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import warnings

import numpy as np
import pandas as pd
import pytest

from dicom_preprocess import SUBTYPES
from dicom_preprocess.splits import SPLIT_METHOD
from medmoco.config import FinetuneConfig, load_config
from pipelines.evaluate import evaluate, predict
from pipelines.finetune import training
from pipelines.register import register

from .conftest import finetune_settings
from .servers import MlflowServer, free_port, wait_http

NAME = "rsna-ich-moco"
CANDIDATES = "rsna-ich-moco-candidates"  # `medmoco register` writes candidates; promotion releases into NAME


def _finetune_run(cache, run_dir, uri, seed=0, epochs=1, mode="scratch"):
    data = finetune_settings(cache, str(run_dir), "unused", mode=mode, epochs=epochs, seed=seed)
    data["tracking"] = {"uri": uri, "experiment": "test-registry"}
    data["bootstrap"] = {"min_groups": 2}  # a 3-patient test split: the card's intervals are what these tests read
    return training(0, load_config(FinetuneConfig, None, data))


def _load(uri):
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{CANDIDATES}@candidate")


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


def test_registered_model_predicts_dicoms_like_evaluate(embedded, cls_cache, cls_archive, tmp_path, monkeypatch):
    # MLflow 3.17 allows pickle unless told otherwise: forbid it, as a cautious deployment would
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    loaded = _load(embedded["uri"])
    reference = _eval_probs(embedded["runs"][0]["model"], cls_cache, tmp_path)
    files = sorted(glob.glob(os.path.join(cls_archive.images_dir, "*.dcm")))[:6]
    by_bytes = _check_against_evaluate(loaded, files, reference)
    # a plain list (or Series) of paths, as users call a pyfunc
    np.testing.assert_array_equal(loaded.predict(files).to_numpy(), by_bytes.to_numpy())
    np.testing.assert_array_equal(loaded.predict(pd.Series(files)).to_numpy(), by_bytes.to_numpy())
    with pytest.raises(Exception, match="none of the accepted columns.*dicom.*path.*tensor"):
        loaded.predict(pd.DataFrame({"paht": files}))  # misspelled: an error, not an empty result
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


def test_a_pickled_pyfunc_is_refused_where_the_registered_model_loads(embedded, monkeypatch, tmp_path):
    """With MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false a cloudpickled model does not load; ours does
    (the previous test predicts with it under the same setting)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from medmoco.tracking import tracking_uri_scope

    class Pickled(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    with tracking_uri_scope(embedded["uri"]), mlflow.start_run():
        logged = mlflow.pyfunc.log_model(name="pickled", python_model=Pickled())
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with tracking_uri_scope(embedded["uri"]):
        with pytest.raises(MlflowException, match="pickle is disallowed"):
            mlflow.pyfunc.load_model(logged.model_uri)
        assert mlflow.pyfunc.load_model(f"models:/{CANDIDATES}@candidate") is not None
        monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
        assert mlflow.pyfunc.load_model(logged.model_uri).predict(["x"]) == ["x"]  # the setting is what refused it


def test_registered_model_on_the_real_rsna_sample(embedded, real_sample_dir, tmp_path):
    loaded = _load(embedded["uri"])
    predict(embedded["runs"][0]["model"], real_sample_dir, str(tmp_path / "sub.csv"))
    reference = pd.read_csv(tmp_path / "sub.csv").set_index("ID")["Label"]
    files = sorted(glob.glob(os.path.join(real_sample_dir, "*.dcm")))
    assert len(files) == 32
    _check_against_evaluate(loaded, files, reference)


def test_version_description_and_tags_hold_the_test_figures_with_intervals(embedded):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=embedded["uri"], registry_uri=embedded["uri"])
    version = client.get_model_version(CANDIDATES, str(embedded["version"]))
    run = client.get_run(embedded["runs"][0]["run_id"])
    for c in list(SUBTYPES) + ["mean"]:
        expected = run.data.metrics.get(f"test_auc_{c}", float("nan"))
        got = float(version.tags[f"auc_{c}"])
        assert (np.isnan(expected) and np.isnan(got)) or got == pytest.approx(expected, abs=1e-6), c
    # 3 test patients: a rare class has fewer than 2 positive patients, so the mean's interval is
    # withheld (medmoco.intervals), and the tag and the card say so instead of printing one
    assert "test_auc_mean_ci_low" not in run.data.metrics and version.tags["auc_mean_ci_low"] == "nan"
    assert version.tags["mode"] == "scratch" and version.tags["label_fraction"] == "1.0"
    assert version.tags["cache_fingerprint"] and version.tags["source_commit"] and version.tags["test_split_fingerprint"]
    assert version.tags["selected_epoch"] == run.data.params["selected_epoch"]
    card = version.description
    assert "research only" in card and "| any |" in card and "95% CI" in card and "threshold" in card
    assert f"**{run.data.metrics['test_auc_mean']:.3f} (no interval: withheld)**" in card, card
    assert "chosen on `val`" in card
    assert f"splits by {SPLIT_METHOD};" in card and run.data.tags["split_method"] == SPLIT_METHOD
    assert str(client.get_model_version_by_alias(CANDIDATES, "candidate").version) == str(embedded["version"])


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
        serve = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{CANDIDATES}@candidate",
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
        # the README's two lines, as written there (a payload file: a real slice inline is over the
        # shell's argument limit), on a real RSNA-size slice
        from .test_readme import readme_lines

        lines = [line for line in readme_lines() if "payload.json" in line]
        assert len(lines) == 2 and lines[1].startswith("curl ")
        shutil.copy(files[0], tmp_path / "slice.dcm")
        script = "\n".join(["set -e", *lines]).replace("localhost:5001", f"127.0.0.1:{serve_port}")
        out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        by_curl = json.loads(out.stdout)["predictions"][0]
        np.testing.assert_allclose([by_curl[c] for c in SUBTYPES], expected.to_numpy()[0], atol=1e-6)
    finally:
        if serve is not None:
            serve.terminate()
            try:
                serve.wait(timeout=20)
            except subprocess.TimeoutExpired:
                serve.kill()
        server.stop()


def test_a_changed_file_of_a_registered_version_is_refused_by_every_loader(embedded, tmp_path, capsys):
    """The version's files are pinned when it is created; medmoco's loaders and the pyfunc wrapper's
    own load check them before loading anything, and refuse in one line naming the file."""
    import mlflow

    from medmoco.registry.integrity import IntegrityError, fetch_version
    from pipelines.cli import main

    spec = f"models:/{CANDIDATES}/{embedded['version']}"
    # the README's models:/NAME@candidate: the alias is looked up in NAME, then in NAME-candidates
    assert fetch_version(f"models:/{NAME}@candidate", embedded["uri"]).version == str(embedded["version"])
    fetched = fetch_version(spec, embedded["uri"], str(tmp_path / "ok"))
    assert fetched.verified and "artifacts/model.pt" in fetched.digests and "MLmodel" in fetched.digests
    weights = os.path.join(fetched.directory, "artifacts", "model.pt")
    with open(weights, "r+b") as handle:  # the wrapper's own check: weights against the MLmodel's digest
        handle.seek(64)
        handle.write(b"\xff\xfe")
    with pytest.raises(IntegrityError, match="model.pt: sha256 .* refusing to load the weights"):
        mlflow.pyfunc.load_model(fetched.directory)
    stored = os.path.join(embedded["tmp"], "mlartifacts")  # the embedded store's files, changed behind MLflow's back
    targets = [os.path.join(d, f) for d, _, files in os.walk(stored) for f in files
               if f == "pyfunc_model.py" and "models" in d]
    assert targets
    originals = {target: open(target, "rb").read() for target in targets}
    try:
        for target in targets:
            with open(target, "a") as handle:
                handle.write("\nraise SystemExit('code that is not the registered code')\n")
        with pytest.raises(IntegrityError, match="file code/medmoco/pyfunc_model.py has sha256"):
            fetch_version(spec, embedded["uri"])
        code = main(["predict", "--model", spec, "--input", str(tmp_path), "--out", str(tmp_path / "p.csv"),
                     "--tracking-uri", embedded["uri"]])
    finally:  # the module's other tests use the same store
        for target, data in originals.items():
            open(target, "wb").write(data)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "code/medmoco/pyfunc_model.py has sha256" in err[-1] and "Traceback" not in "\n".join(err)
