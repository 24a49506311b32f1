"""`make demo`: the whole pipeline on CPU on a synthetic RSNA-like archive, idempotent.

    python -m pipelines.demo --workdir demo-run [--patients 40]

Stages (each skipped when its output is complete; an interrupted stage resumes): synthesise ->
preprocess -> pretrain (configs/pretrain/cpu_demo.yaml) -> finetune (configs/finetune/cpu_demo.yaml)
-> evaluate -> register (alias candidate) -> review table. Everything stays under the work dir:
archive/, cache/, pretrain/, finetune/, eval/, mlflow.db, mlartifacts/.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage(n: int, title: str) -> float:
    print(f"\n== [{n}/7] {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    print(f"   {what} ({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo-run")
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store set-up and signature checks log at INFO

    from dicom_preprocess.config import PreprocessConfig
    from dicom_preprocess.job import run_preprocess
    from dicom_preprocess.synthetic import synthesize
    from medmoco.config import FinetuneConfig, PretrainConfig, load_config
    from medmoco.tracking import recorded_run_id
    from pipelines import evaluate, finetune, pretrain, register

    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    uri = f"sqlite:///{os.path.join(work, 'mlflow.db')}"
    paths = {k: os.path.join(work, k) for k in ("archive", "cache", "pretrain", "finetune", "eval")}
    total = time.perf_counter()

    t = _stage(1, f"synthesise an RSNA-like archive ({args.patients} patients)")
    labels_csv = os.path.join(paths["archive"], "stage_2_train.csv")
    if os.path.exists(labels_csv):
        _done(t, f"reusing {paths['archive']}")
    else:
        archive = synthesize(paths["archive"], patients=args.patients, seed=0)
        _done(t, f"{len(archive.slices)} DICOM slices -> {archive.images_dir}")

    t = _stage(2, "preprocess DICOM -> 3-window uint8 cache (128 px)")
    summary = run_preprocess(PreprocessConfig(
        input=os.path.join(paths["archive"], "stage_2_train"), labels=labels_csv, out=paths["cache"], size=128,
        workers=args.workers, split_fractions={"unsupervised": 0.5, "train": 0.3, "test": 0.2}), progress=False)
    _done(t, f"{summary.cached} images cached, {summary.skipped} skipped -> {paths['cache']}")

    t = _stage(3, "MoCo v2 pretraining (configs/pretrain/cpu_demo.yaml)")
    backbone = os.path.join(paths["pretrain"], "backbone.pt")
    if os.path.exists(backbone):
        _done(t, f"reusing {backbone}")
    else:
        config = load_config(PretrainConfig, os.path.join(REPO, "configs", "pretrain", "cpu_demo.yaml"),
                             {"cache": paths["cache"], "run_dir": paths["pretrain"], "progress": False,
                              "tracking": {"uri": uri}})
        result = pretrain.training(0, config, resume="auto")
        last = result["history"][-1]
        _done(t, f"{result['epochs']} epochs, loss {last['epoch_loss']:.3f}, kNN mean AUC "
                 f"{last.get('knn_auc_mean', float('nan')):.3f}, data-wait {last['data_wait_fraction']:.2f}; "
                 f"MLflow run {result['run_id']}")

    t = _stage(4, "fine-tune at label fraction 0.2 (configs/finetune/cpu_demo.yaml)")
    report = os.path.join(paths["finetune"], "report", "metrics.json")
    run_id = recorded_run_id(paths["finetune"])
    if os.path.exists(report) and run_id:
        _done(t, f"reusing run {run_id}")
    else:
        config = load_config(FinetuneConfig, os.path.join(REPO, "configs", "finetune", "cpu_demo.yaml"),
                             {"cache": paths["cache"], "run_dir": paths["finetune"], "pretrained": backbone,
                              "progress": False, "tracking": {"uri": uri}})
        result = finetune.training(0, config, resume="auto")
        run_id = result["run_id"]
        _done(t, f"test mean AUC {result['metrics']['auc_mean']:.3f}, weighted log loss "
                 f"{result['metrics']['weighted_logloss']:.3f}; MLflow run {run_id}")

    t = _stage(5, "evaluate on the test split")
    metrics = evaluate.evaluate(os.path.join(paths["finetune"], finetune.MODEL_FILE), paths["cache"], "test",
                                paths["eval"])
    _done(t, f"{metrics['n_images']} images: mean AUC {metrics.get('auc_mean', float('nan')):.3f} -> "
             f"{paths['eval']}/metrics.json, predictions.csv")

    t = _stage(6, "register in the MLflow model registry (alias candidate)")
    client = register._client(uri)
    existing = [v for v in client.search_model_versions(f"name='{register.MODEL_NAME}'")
                if v.tags.get("source_run") == run_id] if _has_model(client) else []
    if existing:
        _done(t, f"reusing version {existing[0].version}")
    else:
        reg = register.register(run_id, register.MODEL_NAME, "candidate", uri)
        _done(t, f"version {reg['version']}: models:/{register.MODEL_NAME}@candidate")

    _stage(7, "review")
    print(register.format_table(register.versions_table(register.MODEL_NAME, uri)))
    print(f"\nDone in {time.perf_counter() - total:.0f} s. Everything is under {work}:")
    for name, path in paths.items():
        print(f"  {name:9s} {path}")
    print(f"  mlflow    {os.path.join(work, 'mlflow.db')} (artifacts: {os.path.join(work, 'mlartifacts')})")
    print(f"\nBrowse:  mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000 -> Models -> "
          f"{register.MODEL_NAME})")
    print(f"Use:     MLFLOW_TRACKING_URI={uri} medmoco review --name {register.MODEL_NAME}")
    return 0


def _has_model(client) -> bool:
    try:
        client.get_registered_model(register_name())
        return True
    except Exception:
        return False


def register_name() -> str:
    from pipelines.register import MODEL_NAME

    return MODEL_NAME


if __name__ == "__main__":
    sys.exit(main())
