"""Stages `medmoco register` and `medmoco review`: the MLflow model registry as the review desk.

register: logs the best model of a finished `medmoco finetune` run as an MLflow 3 pyfunc model
("models from code": :mod:`medmoco.pyfunc_model`, weights as a state dict, the medmoco packages
as ``code_paths``, so it loads without enabling pickle), registers a version with a model card as
description, tags (mode, label fraction, pretraining run, cache fingerprint, source commit,
per-class AUC) and an alias.

review: the versions side by side; ``--promote V --alias champion`` moves the alias only when the
version's mean AUC is not below the current holder's, or with ``--force --reason`` (recorded as
version tags).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

from dicom_preprocess.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "rsna-ich-moco"


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_id", required=True, help="run id of a finished `medmoco finetune`")
    parser.add_argument("--name", default=MODEL_NAME)
    parser.add_argument("--alias", default="candidate")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default="")


def add_review_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=MODEL_NAME)
    parser.add_argument("--promote", type=int, metavar="VERSION")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--force", action="store_true", help="promote even if worse (needs --reason)")
    parser.add_argument("--reason", default="")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default="")


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
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from dicom_preprocess import SUBTYPES

    inputs = Schema([ColSpec("binary", "dicom", required=False), ColSpec("string", "path", required=False),
                     ColSpec("binary", "tensor", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("float", c) for c in SUBTYPES]))


def model_card(run, info: dict, metrics: dict, version_hint: str = "") -> str:
    from dicom_preprocess import SUBTYPES

    p, tags = run.data.params, run.data.tags
    pre = info["preprocess"]
    windows = ", ".join(f"{w['name']} {w['center']:g}/{w['width']:g}" for w in pre["windows"])
    rows = "\n".join(f"| {c} | {metrics.get(f'auc_{c}', float('nan')):.4f} | {metrics.get(f'ap_{c}', float('nan')):.4f} |"
                     for c in SUBTYPES)
    return f"""# RSNA intracranial hemorrhage classifier ({info['mode']}, {info['arch']})

**Intended use: research only. Not a medical device; not for clinical decisions.**

## Task
Multi-label classification of one head-CT slice into six outputs: {', '.join(SUBTYPES)}
(sigmoid probabilities; `any` = any hemorrhage).

## Data
- Cache fingerprint `{pre.get('cache_fingerprint', '')}`: windows {windows} ({pre.get('window_mode', 'linear')}),
  {pre['size']} px, patient-level splits; trained on the `{p.get('train_split', 'train')}` split at label
  fraction {p.get('label_fraction')} ({p.get('n_train')} slices, {p.get('extra_labels_added', 0)} extra labels),
  evaluated on `{p.get('eval_split', 'test')}` ({p.get('n_eval')} slices).
- Mode `{info['mode']}`: {dict(finetune='MoCo-pretrained backbone, whole network fine-tuned',
                                linear='MoCo-pretrained backbone frozen, linear head only',
                                scratch='random initialisation, supervised only').get(info['mode'], '')}.
- Pretraining run: `{tags.get('pretrain_run_id', '') or 'none'}`; fine-tuning run: `{run.info.run_id}`;
  input {info['image_size']} px, {info['in_channels']} channels, 2.5D context {info['context']}.

## Test metrics (best epoch {info['meta'].get('epoch')})
| class | AUC | AP |
|---|---|---|
{rows}

Mean AUC **{metrics.get('auc_mean', float('nan')):.4f}**; RSNA weighted log loss **{metrics.get('weighted_logloss', float('nan')):.4f}**.

## Use
`mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(df)` with one row per image and a column
`dicom` (bytes; base64 over REST), `path` (DICOM path) or `tensor` (uint8 C x H x W `.npy` bytes).
The recorded preprocessing is applied to DICOM input. Source commit `{source_commit()[:12]}`.
"""


def register(run_id: str, name: str = MODEL_NAME, alias: str = "candidate", tracking_uri: str = "") -> dict:
    """Log the run's model as a pyfunc and register a version; returns {version, model_uri}.

    Raises:
        ConfigError: when the run is not a finished `medmoco finetune` run.
    """
    import mlflow

    from dicom_preprocess import SUBTYPES
    from medmoco.models.export import read_weights
    from medmoco.tracking import resolve_tracking_uri, tracking_uri_scope
    from medmoco.tracking.store import quiet_defaults

    quiet_defaults()
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise ConfigError(f"run {run_id}: not found in {uri} ({str(err)[:150]})") from None
    if run.data.tags.get("stage") != "finetune" or run.info.status != "FINISHED":
        raise ConfigError(f"run {run_id}: not a finished `medmoco finetune` run "
                          f"(stage {run.data.tags.get('stage')!r}, status {run.info.status})")
    metrics = {k[len("best_"):]: v for k, v in run.data.metrics.items() if k.startswith("best_")}
    with tempfile.TemporaryDirectory(prefix="medmoco-register-") as work:
        weights = client.download_artifacts(run_id, "model/model.pt", work)
        info = {k: v for k, v in read_weights(weights).items() if k != "state_dict"}
        example = _input_example(info)
        with tracking_uri_scope(uri), mlflow.start_run(run_id=run_id):
            logged = mlflow.pyfunc.log_model(
                name="registered_model", python_model=os.path.join(REPO, "medmoco", "pyfunc_model.py"),
                artifacts={"weights": weights}, signature=signature(), input_example=example,
                code_paths=[os.path.join(REPO, "medmoco"), os.path.join(REPO, "dicom_preprocess")],
                pip_requirements=_requirements())
            version = mlflow.register_model(logged.model_uri, name, tags={"source_run": run_id})
    tags = {"mode": info["mode"], "label_fraction": run.data.params.get("label_fraction", ""),
            "pretrain_run_id": run.data.tags.get("pretrain_run_id", ""),
            "cache_fingerprint": info["preprocess"].get("cache_fingerprint", ""), "source_commit": source_commit(),
            "arch": info["arch"], "weighted_logloss": f"{metrics.get('weighted_logloss', float('nan')):.6f}"}
    tags.update({f"auc_{c}": f"{metrics.get(f'auc_{c}', float('nan')):.6f}" for c in list(SUBTYPES) + ["mean"]})
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    client.update_model_version(name, version.version, description=model_card(run, info, metrics))
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return {"version": int(version.version), "model_uri": f"models:/{name}/{version.version}", "name": name}


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


def run_register(args: argparse.Namespace) -> int:
    result = register(args.run_id, args.name, args.alias, args.tracking_uri)
    print(f"registered {result['name']} version {result['version']}"
          + (f" with alias {args.alias}: models:/{result['name']}@{args.alias}" if args.alias else ""))
    return 0


# --- review -----------------------------------------------------------------------------------

def versions_table(name: str, tracking_uri: str = "") -> list[dict]:
    from dicom_preprocess import SUBTYPES

    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except Exception:
        raise ConfigError(f"registered model {name!r}: not found") from None
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        t = v.tags
        rows.append({"version": int(v.version), "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                     "mode": t.get("mode", ""), "label_fraction": t.get("label_fraction", ""),
                     **{f"auc_{c}": _num(t.get(f"auc_{c}")) for c in list(SUBTYPES) + ["mean"]},
                     "weighted_logloss": _num(t.get("weighted_logloss")),
                     "pretrain_run": t.get("pretrain_run_id", "")[:8],
                     "date": __import__("datetime").datetime.fromtimestamp(v.creation_timestamp / 1000).strftime(
                         "%Y-%m-%d %H:%M")})
    return rows


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no versions)"
    short = {"auc_epidural": "epi", "auc_intraparenchymal": "ipa", "auc_intraventricular": "ivt",
             "auc_subarachnoid": "sah", "auc_subdural": "sdh", "auc_any": "any", "auc_mean": "AUC mean",
             "weighted_logloss": "wlogloss", "label_fraction": "fraction"}
    cols = list(rows[0])
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    heads = [short.get(c, c) for c in cols]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    line = lambda items: "  ".join(s.ljust(w) for s, w in zip(items, widths))  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(row) for row in cells])


def promote(name: str, version: int, alias: str = "champion", force: bool = False, reason: str = "",
            tracking_uri: str = "") -> str:
    """Move ``alias`` to ``version`` unless its mean AUC is below the current holder's.

    Raises:
        ConfigError: when refused (names both AUCs), or --force without --reason.
    """
    client = _client(tracking_uri)
    target = client.get_model_version(name, str(version))
    new_auc = _num(target.tags.get("auc_mean"))
    try:
        current = client.get_model_version_by_alias(name, alias)
    except Exception:
        current = None
    if current is not None and int(current.version) != version:
        old_auc = _num(current.tags.get("auc_mean"))
        if not new_auc >= old_auc:  # NaN counts as worse
            if not force:
                raise ConfigError(f"version {version} (mean AUC {new_auc:.4f}) is below {alias} version "
                                  f"{current.version} ({old_auc:.4f}); use --force --reason TEXT to override")
            if not reason:
                raise ConfigError("--force needs --reason (it is recorded on the version)")
            client.set_model_version_tag(name, str(version), f"{alias}_override_reason", reason)
            client.set_model_version_tag(name, str(version), f"{alias}_replaced_version", str(current.version))
    client.set_registered_model_alias(name, alias, str(version))
    return f"{name}@{alias} -> version {version} (mean AUC {new_auc:.4f})"


def run_review(args: argparse.Namespace) -> int:
    if args.promote is not None:
        print(promote(args.name, args.promote, args.alias, args.force, args.reason, args.tracking_uri))
    print(format_table(versions_table(args.name, args.tracking_uri)))
    return 0
