"""Candidates: a finished `medmoco finetune` run's selected model as a version of ``<name>-candidates``.

The model is logged as an MLflow 3 pyfunc ("models from code": :mod:`medmoco.pyfunc_model`,
weights as a state dict, the medmoco packages as ``code_paths``, so it loads without enabling
pickle) and registered as a version with a model card as description (the test table with
intervals, calibration and operating points), tags (mode, label fraction, pretraining run, cache
and test-split fingerprints, source commit, per-class test AUC, thresholds) and an alias. The
version is pinned when it is created: its tag ``medmoco.files_sha256`` lists every file with its
sha256 (:mod:`.integrity`), so that the bytes a review compares are the bytes registered.
"""
from __future__ import annotations

import os
import subprocess
import tempfile

from dicom_preprocess.config import ConfigError

from .names import MODEL_NAME

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _client(uri: str):
    from medmoco.tracking import client

    return client(uri)


def source_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def signature():
    """Outputs only: the inputs (a frame with a dicom, path or tensor column, or a list of paths)
    are checked by the model itself, which can name what it accepts (see medmoco.pyfunc_model)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from dicom_preprocess import SUBTYPES

    return ModelSignature(outputs=Schema([ColSpec("float", c) for c in SUBTYPES]))


def model_card(run, info: dict, evaluation: dict) -> str:
    """The version's description: task, data and splits, how the model was chosen, the test table
    with intervals, calibration and operating points, and how to use it."""
    from dicom_preprocess import SUBTYPES
    from medmoco.evaluation import markdown_table

    p, tags = run.data.params, run.data.tags
    pre = info["preprocess"]
    windows = ", ".join(f"{w['name']} {w['center']:g}/{w['width']:g}" for w in pre["windows"])
    points = info.get("operating_points") or {}
    series = info.get("series")
    head = _series_section(series, evaluation) if series else ""
    unit = "series" if series else "slices"
    return f"""# RSNA intracranial hemorrhage classifier ({info['mode']}, {info['arch']}{', series head' if series else ''})
{head}
**Intended use: research only. Not a medical device; not for clinical decisions.**

## Task
Multi-label classification of one head-CT slice into six outputs: {', '.join(SUBTYPES)}
(sigmoid probabilities; `any` = any hemorrhage).

## Data and selection
- Cache fingerprint `{pre.get('cache_fingerprint', '')}`: windows {windows} ({pre.get('window_mode', 'linear')}),
  {pre['size']} px, splits by {tags.get('split_method', 'patients (method not recorded)')}; trained on the `{p.get('train_split', 'train')}` split at label
  fraction {p.get('label_fraction')} of its {unit} ({p.get('n_train')} slices, {p.get('extra_labels_added', 0)} extra labels).
- Epoch {p.get('selected_epoch', info['meta'].get('epoch'))} of {p.get('epochs')} chosen on `{p.get('val_split', 'val')}`
  ({p.get('n_val')} slices) by mean AUC; thresholds for sensitivity {points.get('target_sensitivity', 'n/a')} fixed there
  too. `{p.get('test_split', 'test')}` ({p.get('n_test')} slices, fingerprint
  `{tags.get('test_split_fingerprint', '')}`) was read once, afterwards.
- Mode `{info['mode']}`: {dict(finetune='MoCo-pretrained backbone, whole network fine-tuned',
                                linear='MoCo-pretrained backbone frozen, linear head only',
                                scratch='random initialisation, supervised only').get(info['mode'], '')}.
- Pretraining run: `{tags.get('pretrain_run_id', '') or 'none'}`; fine-tuning run: `{run.info.run_id}`;
  input {info['image_size']} px, {info['in_channels']} channels, 2.5D context {info['context']}.

## Test figures
{markdown_table(evaluation)}
## Use
`mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(x)` with `x` a list of DICOM paths, or a frame
with one row per image and a column `dicom` (bytes; base64 over REST), `path` (DICOM path) or
`tensor` (uint8 C x H x W `.npy` bytes); anything else is refused with the accepted columns named.
The recorded preprocessing is applied to DICOM input; the output is the six probabilities (apply
the thresholds above for yes/no calls). Source commit `{source_commit()[:12]}`.
"""


def _series_section(series: dict, evaluation: dict) -> str:
    """The model card's head section: what the series head is, what it reads, its exam-level figures."""
    from medmoco.evaluation import markdown_table

    exam = evaluation.get("exam")
    return f"""
## Head: series model
A bidirectional GRU ({series.get('layers', 1)} layer, {series.get('hidden')} units per direction) over the
per-slice embeddings ({series.get('features')} features of the slice classifier's backbone, mode
`{series.get('encoder_mode')}`{', each averaged with its mirror image' if series.get('flip_tta') else ''}) of a whole
series in slice order; trained on {series.get('training')}. **Input: whole series** (all slices
of a SeriesInstanceUID; they are grouped and ordered by position). Outputs per slice the six
probabilities and per series an exam-level probability per class ({series.get('exam_output')}).

### Exam-level test figures (a series is positive for a class when any of its slices is; {exam.get('n_series') if exam else 'n/a'} series)
{markdown_table(exam) if exam else 'not recorded'}
"""


def register(run_id: str, name: str = MODEL_NAME, alias: str = "candidate", tracking_uri: str = "") -> dict:
    """Log the run's model as a pyfunc and register a version of ``<name>-candidates``.

    Released versions live in ``<name>``, and only a promotion (`medmoco review --promote`) puts one
    there (:mod:`medmoco.registry.names`).

    Returns:
        ``{"version", "model_uri", "name"}`` of the candidate version.

    Raises:
        ConfigError: when the run is not a finished `medmoco finetune` run with a test report.
        PermissionRefused: when the tracking server refuses the user.
    """
    import json

    import mlflow

    from dicom_preprocess import SUBTYPES
    from medmoco.models.export import read_weights
    from medmoco.tracking import resolve_tracking_uri, tracking_uri_scope
    from .access import explain_denied
    from .integrity import FILES_TAG, file_digests, sha256_file
    from .names import candidates_name
    from medmoco.tracking.store import quiet_defaults

    quiet_defaults()
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    name = candidates_name(name)
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise ConfigError(f"run {run_id}: not found in {uri} ({str(err)[:150]})") from None
    if run.data.tags.get("stage") != "finetune" or run.info.status != "FINISHED":
        raise ConfigError(f"run {run_id}: not a finished `medmoco finetune` run "
                          f"(stage {run.data.tags.get('stage')!r}, status {run.info.status})")
    with tempfile.TemporaryDirectory(prefix="medmoco-register-") as work:
        try:
            with open(client.download_artifacts(run_id, "report/metrics.json", work)) as handle:
                evaluation = json.load(handle)
        except Exception as err:
            raise ConfigError(f"run {run_id}: has no test report (report/metrics.json: {str(err)[:120]}); "
                              "it was made by an older medmoco, fine-tune again") from None
        if "classes" not in evaluation:
            raise ConfigError(f"run {run_id}: its report predates test intervals and val selection; fine-tune again")
        weights = client.download_artifacts(run_id, "model/model.pt", work)
        info = {k: v for k, v in read_weights(weights).items() if k != "state_dict"}
        example = _input_example(info)
        with tracking_uri_scope(uri), mlflow.start_run(run_id=run_id), \
                explain_denied("write", f"registered model {name} or run {run_id}", "EDIT",
                               "trainers register candidates; ask an admin to run `medmoco registry roles`"):
            _require_registered_model(client, name)  # before anything is logged: a refusal comes first
            logged = mlflow.pyfunc.log_model(
                name="registered_model", python_model=os.path.join(REPO, "medmoco", "pyfunc_model.py"),
                artifacts={"weights": weights}, signature=signature(), input_example=example,
                code_paths=[os.path.join(REPO, "medmoco"), os.path.join(REPO, "dicom_preprocess")],
                pip_requirements=_requirements(),
                # the wrapper checks its weights against this before loading them (medmoco.pyfunc_model)
                model_config={"weights_sha256": sha256_file(weights)})
            # The version is pinned as it is created: the digests of the files as the server holds them.
            digests = file_digests(mlflow.artifacts.download_artifacts(
                artifact_uri=logged.model_uri, dst_path=os.path.join(work, "logged"), tracking_uri=uri))
            # The client's create_model_version, not mlflow.register_model: that one prints
            # "Registered model ... already exists. Creating a new version" on every call.
            version = client.create_model_version(name, logged.model_uri, run_id=run_id, model_id=logged.model_id,
                                                  tags={"source_run": run_id,
                                                        FILES_TAG: json.dumps(digests, sort_keys=True)})
    tags = {"mode": info["mode"], "head": "series" if info.get("series") else "slice",
            "label_fraction": run.data.params.get("label_fraction", ""),
            "pretrain_run_id": run.data.tags.get("pretrain_run_id", ""),
            "cache_fingerprint": info["preprocess"].get("cache_fingerprint", ""),
            "test_split_fingerprint": run.data.tags.get("test_split_fingerprint", ""),
            "selected_epoch": run.data.params.get("selected_epoch", ""), "source_commit": source_commit(),
            "arch": info["arch"], "weighted_logloss": _fmt(evaluation.get("weighted_logloss")),
            "n_test_images": evaluation.get("n_images"), "n_test_patients": evaluation.get("n_patients")}
    for c in SUBTYPES:
        entry = evaluation["classes"][c]
        tags[f"auc_{c}"] = _fmt(entry["auc"])
        tags[f"threshold_{c}"] = _fmt(entry["threshold"])
    tags["auc_mean"] = _fmt(evaluation.get("auc_mean"))
    ci = evaluation.get("auc_mean_ci") or [None, None]
    tags["auc_mean_ci_low"], tags["auc_mean_ci_high"] = _fmt(ci[0]), _fmt(ci[1])
    with explain_denied("write", f"registered model {name}", "EDIT", "trainers register candidates"):
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, str(value))
        client.update_model_version(name, version.version, description=model_card(run, info, evaluation))
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    return {"version": int(version.version), "model_uri": f"models:/{name}/{version.version}", "name": name}


def _require_registered_model(client, name: str) -> None:
    try:
        client.get_registered_model(name)
    except Exception as err:
        if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(err, "error_code", "")):
            raise
        client.create_registered_model(name)


def _fmt(value) -> str:
    return "nan" if value is None else f"{float(value):.6f}"


def _input_example(info: dict):
    import io

    import numpy as np
    import pandas as pd

    size = int(info["preprocess"]["size"])
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((info["in_channels"], size, size), dtype=np.uint8), allow_pickle=False)
    return pd.DataFrame({"tensor": [buffer.getvalue()]})


def _requirements() -> list[str]:
    from importlib.metadata import version

    out = []
    for package in ("torch", "monai", "pydicom", "numpy", "pandas", "mlflow", "numba", "SimpleITK", "nibabel"):
        try:
            out.append(f"{package}=={version(package)}")
        except Exception:
            out.append(package)
    return out
