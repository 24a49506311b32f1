"""`make demo`: the whole pipeline on CPU on a synthetic RSNA-like archive, idempotent.

    python -m pipelines.demo --workdir demo-run [--patients 100]

Stages (each skipped when its output is complete; an interrupted stage resumes): synthesise ->
preprocess (patient-grouped unsupervised/train/val/test, 64 px) -> MoCo pretraining
(configs/pretrain/cpu_demo.yaml) -> fine-tuning of the MoCo backbone and, for comparison, the same
network from scratch on the same labeled series (configs/finetune/cpu_demo.yaml; epochs chosen on
val, test read once) -> the series head over the MoCo slice model's embeddings
(configs/series/cpu_demo.yaml): the MoCo candidate -> `medmoco evaluate` -> register the scratch
slice model and the MoCo series model -> compare them on the same test images -> promotion under
the non-inferiority rule, and the review table. Everything stays under the work dir: archive/,
cache/, pretrain/, finetune/, scratch/, series/, eval/, review/, mlflow.db, mlartifacts/.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = 9


def _stage(n: int, title: str) -> float:
    print(f"\n== [{n}/{STAGES}] {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    print(f"   {what} ({time.perf_counter() - start:.0f} s)", flush=True)


def _with_ci(value, ci) -> str:
    from medmoco.intervals import format_estimate

    # a value without its interval says why (too few patients: medmoco.intervals)
    return format_estimate(value, ci, reason="withheld" if ci is None and value is not None else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo-run")
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import mlflow  # noqa: F401  (MLflow sets its logger's level when imported: import first, then quiet it)

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store set-up and signature checks log at INFO

    from dicom_preprocess.config import PreprocessConfig
    from dicom_preprocess.job import run_preprocess
    from dicom_preprocess.synthetic import synthesize
    from medmoco.comparison import markdown
    from medmoco.config import FinetuneConfig, PretrainConfig, SeriesConfig, load_config
    from medmoco.models.export import backbone_arch
    from medmoco.tracking import client as mlflow_client
    from medmoco.tracking import recorded_run_id
    from pipelines import evaluate, finetune, pretrain, register, review, series

    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    uri = f"sqlite:///{os.path.join(work, 'mlflow.db')}"
    paths = {k: os.path.join(work, k) for k in ("archive", "cache", "pretrain", "finetune", "scratch", "series",
                                                "eval", "review")}
    name = register.MODEL_NAME
    total = time.perf_counter()

    t = _stage(1, f"synthesise an RSNA-like archive ({args.patients} patients)")
    labels_csv = os.path.join(paths["archive"], "stage_2_train.csv")
    if os.path.exists(labels_csv):
        _done(t, f"reusing {paths['archive']}")
    else:
        # 128 px phantoms (the cache is 64 px): synthesis in seconds, lesions still several pixels wide
        archive = synthesize(paths["archive"], patients=args.patients, seed=0, rows=128, slices_per_series=(8, 12))
        _done(t, f"{len(archive.slices)} DICOM slices -> {archive.images_dir}")

    t = _stage(2, "preprocess DICOM -> 3-window uint8 cache (64 px), patient-grouped unsupervised/train/val/test")
    summary = run_preprocess(PreprocessConfig(
        input=os.path.join(paths["archive"], "stage_2_train"), labels=labels_csv, out=paths["cache"], size=64,
        workers=args.workers, split_fractions={"unsupervised": 0.4, "train": 0.2, "val": 0.2, "test": 0.2}),
        progress=False)
    _done(t, summary.line())

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

    runs = {}
    for mode in ("finetune", "scratch"):
        t = _stage(4, f"fine-tune a slice classifier, mode {mode}, half of the labeled series "
                      "(configs/finetune/cpu_demo.yaml)")
        run_dir = paths[mode]
        report = os.path.join(run_dir, "report", "metrics.json")
        runs[mode] = recorded_run_id(run_dir)
        if os.path.exists(report) and runs[mode]:
            _done(t, f"reusing run {runs[mode]}")
            continue
        config = load_config(FinetuneConfig, os.path.join(REPO, "configs", "finetune", "cpu_demo.yaml"),
                             {"cache": paths["cache"], "run_dir": run_dir, "mode": mode,
                              "pretrained": backbone if mode != "scratch" else "", "progress": False,
                              # the same network as the MoCo backbone, randomly initialised
                              **({"arch": backbone_arch(backbone)} if mode == "scratch" else {}),
                              "tracking": {"uri": uri}})
        result = finetune.training(0, config, resume="auto")
        runs[mode] = result["run_id"]
        m = result["metrics"]
        _done(t, f"epoch {result['selected_epoch']} of {config.epochs} selected on val; test (read once) mean AUC "
                 f"{_with_ci(m['auc_mean'], m['auc_mean_ci'])}, weighted log loss "
                 f"{_with_ci(m['weighted_logloss'], m['weighted_logloss_ci'])}; MLflow run {runs[mode]}")

    t = _stage(5, "series head: a bidirectional GRU over the MoCo slice model's embeddings of each whole series "
                  "(configs/series/cpu_demo.yaml)")
    report = os.path.join(paths["series"], "report", "metrics.json")
    runs["series"] = recorded_run_id(paths["series"])
    if os.path.exists(report) and runs["series"]:
        _done(t, f"reusing run {runs['series']}")
    else:
        config = load_config(SeriesConfig, os.path.join(REPO, "configs", "series", "cpu_demo.yaml"),
                             {"cache": paths["cache"], "run_dir": paths["series"],
                              "encoder": os.path.join(paths["finetune"], finetune.MODEL_FILE), "tracking": {"uri": uri}})
        result = series.training(config)
        runs["series"] = result["run_id"]
        m, e = result["metrics"], result["metrics"]["exam"]
        _done(t, f"{result['n_train_series']} labeled series; epoch {result['selected_epoch']} of {config.epochs} "
                 f"selected on val; test (read once) slice mean AUC {_with_ci(m['auc_mean'], m['auc_mean_ci'])}, "
                 f"exam-level AUC any {_with_ci(e['classes']['any']['auc'], e['classes']['any']['auc_ci'])} "
                 f"({e['n_series']} series), weighted log loss "
                 f"{_with_ci(m['weighted_logloss'], m['weighted_logloss_ci'])}; MLflow run {runs['series']}")

    t = _stage(6, "evaluate the MoCo series model with `medmoco evaluate` (the same test figures, from the CLI)")
    metrics = evaluate.evaluate(os.path.join(paths["series"], series.MODEL_FILE), paths["cache"], "test",
                                paths["eval"])
    _done(t, f"{metrics['n_images']} slices of {metrics['n_patients']} patients: mean AUC "
             f"{_with_ci(metrics['auc_mean'], metrics['auc_mean_ci'])}"
             + (" (95% CI, patient bootstrap)" if metrics["auc_mean_ci"] else "") + " -> "
             f"{paths['eval']}/metrics.md, metrics.json, reliability.png, predictions.csv")

    t = _stage(7, "register the scratch slice model and the MoCo series model in the MLflow registry")
    client = mlflow_client(uri)
    versions = {}
    for mode in ("scratch", "series"):
        existing = _versions_of_run(client, name, runs[mode])
        if existing:
            versions[mode] = existing
        else:
            versions[mode] = register.register(runs[mode], name, "candidate" if mode == "series" else "", uri)["version"]
    versions["finetune"] = versions["series"]  # the MoCo candidate is the series model
    _done(t, f"{name}-candidates version {versions['scratch']} (scratch, slice head), version {versions['series']} "
             "(MoCo fine-tuned + series head, alias candidate)")

    t = _stage(8, f"compare them on the same test images: version {versions['finetune']} (MoCo series) against "
                  f"version {versions['scratch']} (scratch)")
    comparison_file = os.path.join(paths["review"], "comparison.json")
    if os.path.exists(comparison_file):
        _done(t, f"reusing {paths['review']}")
    else:
        comparison = review.compare_versions(name, str(versions["finetune"]), str(versions["scratch"]),
                                             paths["review"], paths["cache"], "test", tracking_uri=uri, cases=6)
        print(markdown(comparison))
        _done(t, f"-> {paths['review']}/comparison.md, comparison.json, predictions_*.csv, cases/*.png; MLflow run "
                 f"{comparison['run_id']} in {review.REVIEW_EXPERIMENT}")

    t = _stage(9, f"release: scratch becomes {name}@champion, then the MoCo model must be non-inferior to replace it")
    for mode in ("scratch", "finetune"):
        try:
            result = review.promote(name, str(versions[mode]), "champion", paths["cache"], "test",
                                    out=os.path.join(paths["review"], f"promote-candidate{versions[mode]}"),
                                    tracking_uri=uri, cases=0)
            print(f"   {result['message']}")
        except review.PromotionRefused as err:
            print(f"   refused: {str(err).rpartition(chr(10))[2]}")
    print()
    review.print_review(name, uri)
    _done(t, "review table above")

    print(f"\nDone in {time.perf_counter() - total:.0f} s. Everything is under {work}:")
    for key, path in paths.items():
        print(f"  {key:9s} {path}")
    print(f"  mlflow    {os.path.join(work, 'mlflow.db')} (artifacts: {os.path.join(work, 'mlartifacts')})")
    print(f"\nBrowse:  mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000 -> Models -> {name})")
    print(f"Use:     MLFLOW_TRACKING_URI={uri} medmoco review --name {name}")
    return 0


def _versions_of_run(client, name: str, run_id: str) -> int | None:
    from medmoco.registry.names import candidates_name

    try:
        found = [v for v in client.search_model_versions(f"name='{candidates_name(name)}'")
                 if v.tags.get("source_run") == run_id]
    except Exception:
        return None
    return int(found[0].version) if found else None


if __name__ == "__main__":
    sys.exit(main())
