"""`medmoco review`: two registered versions compared on the same images, cases to look at, and a
promotion rule that holds (real models on the easy task, a real SQLite MLflow store)."""
import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from dicom_preprocess import SUBTYPES, open_cache
from dicom_preprocess.config import ConfigError, PreprocessConfig
from dicom_preprocess.job import run_preprocess
from medmoco.cases import KINDS
from pipelines.register import register
from pipelines.review import PromotionRefused, compare_versions, promote, versions_table

from .conftest import IDENTITY

NAME = "review-check"
CANDIDATES = "review-check-candidates"


@pytest.fixture(scope="module")
def registry(easy_models):
    uri = easy_models["uri"]
    versions = {name: register(run["run_id"], NAME, "", uri)["version"] for name, run in easy_models["runs"].items()}
    return {"uri": uri, "versions": versions, "tmp": easy_models["tmp"]}


def _identity_leaks(root) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            data = open(os.path.join(dirpath, name), "rb").read()
            found += [f"{name}: {v}" for v in IDENTITY.values() if v.encode() in data or v.replace("^", " ").encode() in data]
    return found


def test_compare_scores_both_models_on_the_same_images(registry, easy_cache, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, v = registry["uri"], registry["versions"]
    out = tmp_path / "cmp"
    comparison = compare_versions(NAME, str(v["learned"]), str(v["chance"]), str(out), easy_cache, "test", cases=2, min_groups=2,
                                  replicates=300, tracking_uri=uri)
    saved = json.load(open(out / "comparison.json"))
    assert saved["candidate"] == {"version": v["learned"], "registered_model": CANDIDATES,
                                  "model_uri": f"models:/{CANDIDATES}/{v['learned']}"}
    assert saved["reference"]["version"] == v["chance"] and saved["split"] == "test"
    assert saved["method"] == {"p_value": "Obuchowski 1997 clustered, paired", "ci": "paired patient bootstrap",
                               "replicates": 300, "level": 0.95, "seed": 0}
    cache = open_cache(easy_cache)
    rows = cache.indices("test", labeled=True)
    truth = pd.DataFrame(cache.labels(rows), index=cache.manifest["image_id"].to_numpy()[rows], columns=SUBTYPES)
    written = {side: pd.read_csv(out / f"predictions_{side}.csv").set_index("ID")["Label"]
               for side in ("candidate", "reference")}
    assert saved["n_images"] == len(rows) and saved["n_patients"] == cache.manifest["patient_id"].iloc[rows].nunique()
    for name in SUBTYPES:
        entry = saved["classes"][name]
        y = truth[name].to_numpy()
        if not 0 < y.sum() < len(y):
            assert entry["delta"] is None
            continue
        aucs = {side: roc_auc_score(y, written[side].loc[[f"{i}_{name}" for i in truth.index]].to_numpy())
                for side in written}
        assert entry["delta"] == pytest.approx(aucs["candidate"] - aucs["reference"], abs=2e-3)  # CSV: 6 decimals
        assert entry["delta_ci"][0] <= entry["delta"] <= entry["delta_ci"][1] and 0 <= entry["p_value"] <= 1
    assert saved["mean"]["delta"] > 0.2  # the learned model is clearly better on the easy task
    assert "Obuchowski" in open(out / "comparison.md").read()
    pngs = sorted(p for p in os.listdir(out / "cases") if p.endswith(".png"))
    assert pngs == sorted(f"{c}_{k}.png" for c in SUBTYPES for k in KINDS)
    assert all(os.path.getsize(out / "cases" / p) > 2000 for p in pngs)
    listed = json.load(open(out / "cases" / "cases.json"))
    assert all(tile["image_id"] in set(truth.index) for tiles in listed.values() for tile in tiles)
    assert not _identity_leaks(out)  # ids only: no name, birth date, institution ...
    patients = set(cache.manifest["patient_id"])
    assert not any(p.encode() in open(out / "cases" / "cases.json", "rb").read() for p in patients)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(comparison["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "medmoco-review"
    assert run.data.params["candidate_uri"] == f"models:/{CANDIDATES}/{v['learned']}"
    assert run.data.params["cache_fingerprint"] == cache.fingerprint
    assert run.data.metrics["delta_auc_mean"] == pytest.approx(saved["mean"]["delta"])
    for version in v.values():
        assert client.get_model_version(CANDIDATES, str(version)).tags["last_comparison_run"] == comparison["run_id"]


def test_promotion_needs_non_inferiority_and_records_what_it_rested_on(registry, easy_cache, tmp_path, capsys):
    """Promotion copies a candidate into the released model and moves the alias there, only for a
    non-inferior candidate; the released version's tags say who, when, from which candidate, on
    which comparison and margin."""
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main
    from pipelines.review import release_history

    uri, v = registry["uri"], registry["versions"]
    common = dict(cache_dir=easy_cache, tracking_uri=uri, cases=0, replicates=300, min_groups=2)
    first = promote(NAME, str(v["chance"]), "champion", out=str(tmp_path / "p1"), **common)
    assert first["comparison"] is None and "first holder" in first["message"]
    granted = promote(NAME, str(v["learned"]), "champion", out=str(tmp_path / "p2"), **common)
    assert granted["comparison"]["non_inferior"]
    assert granted["comparison"]["reference"] == {"version": first["released_version"], "registered_model": NAME,
                                                  "model_uri": f"models:/{NAME}/{first['released_version']}"}
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == str(granted["released_version"])
    tags = champion.tags
    assert tags["source_candidate_version"] == str(v["learned"]) and tags["source_registered_model"] == CANDIDATES
    assert tags["comparison_run"] == granted["comparison"]["run_id"] and tags["margin"] == "0.005"
    assert tags["replaced_version"] == str(first["released_version"]) and "local user" in tags["promoted_by"]
    assert json.loads(tags["delta_ci"]) == granted["comparison"]["mean"]["delta_ci"]
    assert tags["mode"] == "scratch"  # the candidate's own tags (and model card) come along with the copy
    with pytest.raises(PromotionRefused, match="lower bound"):
        promote(NAME, str(v["chance"]), "champion", out=str(tmp_path / "p3"), **common)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(champion.version)
    code = main(["review", "--name", NAME, "--promote", str(v["chance"]), "--cache", easy_cache, "--cases", "0",
                 "--min-patients", "2",
                 "--replicates", "300", "--out", str(tmp_path / "p4"), "--tracking-uri", uri])
    captured = capsys.readouterr()
    assert code == 2 and "is not promoted to champion" in captured.err and "Traceback" not in captured.err
    assert "| **mean** (" in captured.out  # the table the refusal rests on
    forced = promote(NAME, str(v["chance"]), "champion", force=True, reason="reader study on site B",
                     out=str(tmp_path / "p5"), **common)
    assert "FORCED" in forced["message"]
    assert client.get_model_version(NAME, str(forced["released_version"])).tags["force_reason"] == \
        "reader study on site B"
    rows, warnings = release_history(NAME, uri)
    assert [r["source candidate"] for r in rows] == [str(v["chance"]), str(v["learned"]), str(v["chance"])]
    assert rows[0]["delta mean AUC [CI]"] == "first holder" and not warnings
    client.set_registered_model_alias(NAME, "champion", str(first["released_version"]))  # as from the MLflow UI
    client.delete_model_version_tag(NAME, str(first["released_version"]), "promoted_by")
    _, warnings = release_history(NAME, uri)
    assert warnings and "the alias was moved outside medmoco" in warnings[0]


def test_a_cache_that_cannot_serve_a_model_is_refused_naming_both_settings(registry, easy_archive, tmp_path):
    uri, v = registry["uri"], registry["versions"]
    for name, settings, problem in (("small", {"size": 16}, "cached size 16 px is smaller than the input size 32 px"),
                                    ("windows", {"size": 32, "windows": ["brain", "subdural", "soft_tissue"]},
                                     "other windows")):
        other = tmp_path / name
        run_preprocess(PreprocessConfig(input=easy_archive.images_dir, labels=easy_archive.labels_csv, out=str(other),
                                        workers=1, files_per_shard=256, **settings), progress=False)
        with pytest.raises(ConfigError) as err:
            compare_versions(NAME, str(v["learned"]), str(v["chance"]), str(tmp_path / "out"), str(other), "test",
                             tracking_uri=uri)
        message = str(err.value)
        assert problem in message and "--input" in message
        assert f"candidate {CANDIDATES} v{v['learned']}" in message and "brain 40/80" in message


def test_compare_on_raw_dicoms_runs_each_models_own_preprocessing(registry, easy_archive, tmp_path):
    uri, v = registry["uri"], registry["versions"]
    out = tmp_path / "raw"
    comparison = compare_versions(NAME, str(v["learned"]), str(v["chance"]), str(out), input_path=easy_archive.images_dir, min_groups=2,
                                  labels_csv=easy_archive.labels_csv, cases=0, replicates=200, tracking_uri=uri)
    assert comparison["split"] == "input" and comparison["n_images"] == len(easy_archive.slices)
    assert comparison["mean"]["delta"] > 0.2
    assert len(pd.read_csv(out / "predictions_candidate.csv")) == 6 * len(easy_archive.slices)


def test_the_list_shows_intervals_and_marks_other_test_splits_not_comparable(registry):
    rows = {r["candidate"]: r for r in versions_table(NAME, registry["uri"])}
    for row in rows.values():
        assert "[" in row["test AUC mean [95% CI]"] and row["comparable"] == "yes"
    assert np.all([r["test split"] != "?" for r in rows.values()])


def test_promotion_decides_on_the_release_split_counts_decisions_and_plans_the_margin(registry, easy_cache, tmp_path,
                                                                                       capsys):
    """A cache with a `release` split: the promotion compares there (not on `test`), the decision is
    counted against that split's fingerprint, and `--plan` simulates the margin on it."""
    import shutil

    from mlflow.tracking import MlflowClient

    from pipelines.cli import main

    uri, v = registry["uri"], registry["versions"]
    cache = str(tmp_path / "cache")
    shutil.copytree(easy_cache, cache)
    assert main(["split", "--cache", cache, "--fractions",
                 "unsupervised=0.1,train=0.4,val=0.15,test=0.15,release=0.2"]) == 0
    name = "release-split-check"
    for version in (v["chance"], v["learned"]):  # the same candidates, registered under another name
        src = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(CANDIDATES, str(version))
        register(src.tags["source_run"], name, "", uri)
    common = dict(cache_dir=cache, tracking_uri=uri, cases=0, replicates=200, min_groups=2)
    promote(name, "1", "champion", out=str(tmp_path / "p1"), **common)
    released = promote(name, "2", "champion", out=str(tmp_path / "p2"), **common)
    assert released["comparison"]["split"] == "release"
    fingerprint = open_cache(cache).metadata["split_fingerprints"]["release"]
    assert released["comparison"]["split_fingerprint"] == fingerprint
    capsys.readouterr()
    assert main(["review", "--name", name, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"release {fingerprint[:8]}: 1 (1 released, 0 refused)" in out and "history verified (2 releases" in out
    assert main(["review", "--name", name, "--plan", "--cache", cache, "--margin", "0.05", "--min-patients", "2",
                 "--tracking-uri", uri]) == 0
    plan = capsys.readouterr()
    assert "margin plan on release" in plan.out and "passes at margin 0.05 in" in plan.out
    assert "WARNING" not in plan.err
    # without a release split the promotion decides on test, and says so
    promote(name, "1", "champion", out=str(tmp_path / "p3"), force=True, reason="check", **{**common,
                                                                                          "cache_dir": easy_cache})
    assert "has no `release` split, so this promotion decides on `test`" in capsys.readouterr().err
