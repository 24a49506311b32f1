"""Stage: `medmoco experiment --config configs/experiments/label_efficiency.yaml [--trials N]`.

Runs every (mode, label fraction, trial) as a `medmoco finetune` child run of one MLflow parent
run (each selects its epoch on val and reads test once), then writes ``table.csv``/``table.md``
(per-class test AUC mean +/- std over trials per mode and fraction, and the trial-paired
difference of each MoCo mode against scratch with its 95% interval over the test split's patients
and the seeds: :mod:`medmoco.label_efficiency`),
``differences.csv`` and ``label_efficiency.png``, and logs them to the parent. Trials differ in
the seed of initialisation and data order; the labeled subset of a fraction is the same for every
trial and mode (``subset_seed``), so the modes are compared on identical labels. Finished trials
are skipped when the command is rerun.

With ``series_modes``, each trial's slice model of those modes also gets a series head
(`medmoco series`: the GRU over that model's embeddings, the same label fraction drawn by series
and the same seed) as mode ``series-<mode>``; the tables then hold slice-level and exam-level
figures, and the paired difference series head minus slice head per mode and fraction, with its
interval over the test split's patients and the seeds, at both levels. A slice model's exam
probability is the highest slice probability of the series.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os


log = logging.getLogger("medmoco.experiment")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--tracking-uri", dest="tracking_uri")


def trial_configs(exp):
    """(name, FinetuneConfig) for every mode x fraction x trial, validated before anything runs."""
    from medmoco.config import FinetuneConfig, from_mapping, to_dict
    from medmoco.models.export import backbone_arch
    from pipelines.finetune import resolve_pretrained

    out = []
    # scratch trains the pretrained backbone's architecture (FinetuneConfig.arch defaults to the
    # pretrained file's, and scratch has none: it would otherwise be a ResNet-50 against a MoCo
    # ResNet-18, and the table would compare architectures).
    scratch_arch = exp.finetune.get("arch") or (
        backbone_arch(resolve_pretrained(exp.pretrained, exp.tracking.uri)) if exp.pretrained else "")
    for mode in exp.modes:
        for fraction in exp.label_fractions:
            for trial in range(exp.trials):
                name = f"{mode}-f{fraction}-t{trial}"
                data = {**exp.finetune, "cache": exp.cache, "mode": mode, "label_fraction": float(fraction),
                        "seed": trial, "run_dir": os.path.join(exp.run_dir, name),
                        "pretrained": exp.pretrained if mode != "scratch" else "",
                        **({"arch": scratch_arch} if mode == "scratch" and scratch_arch else {}),
                        "tracking": {**exp.finetune.get("tracking", {}), **to_dict(exp.tracking), "run_name": name}}
                out.append((name, mode, float(fraction), trial, from_mapping(FinetuneConfig, data, "experiment")))
    return out


def run_experiment(exp, tracking_uri: str = "") -> dict:
    """Every trial of ``exp`` (a :class:`medmoco.config.ExperimentConfig`), then the tables and plot.
    The parent MLflow run ends FINISHED (FAILED when a trial raised), also when no AUC is defined."""
    from medmoco.tracking import create_tracker

    if tracking_uri:
        exp.tracking.uri = tracking_uri
    trials = trial_configs(exp)
    os.makedirs(exp.run_dir, exist_ok=True)
    # The parent run lives in run_dir (mlflow_run_id): a rerun continues it and skips finished trials.
    parent = create_tracker(exp.tracking.enabled, exp.tracking.uri, exp.tracking.experiment, "label-efficiency",
                            tags={"stage": "experiment"}, run_dir=exp.run_dir, resume=True,
                            retry_s=exp.tracking.retry_s)
    parent.log_params({"modes": exp.modes, "label_fractions": exp.label_fractions, "trials": exp.trials,
                       "cache": exp.cache, "pretrained": exp.pretrained})
    for line in split_warnings(exp.cache):
        print(line, flush=True)
    try:
        result = _trials_and_tables(exp, trials, parent)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FINISHED")
    return result


def split_warnings(cache_dir: str) -> list[str]:
    """Before hours of trials: which classes the val and test splits cannot score (no positive or
    no negative patient), so that n/a in the table comes as no surprise."""
    from dicom_preprocess import SUBTYPES, open_cache

    cache = open_cache(cache_dir)
    out = []
    for split in ("val", "test"):
        rows = cache.indices(split, labeled=True)
        if not len(rows):
            continue
        labels, groups = cache.labels(rows), cache.groups(rows)
        missing = []
        for k, name in enumerate(SUBTYPES):
            positive = set(groups[labels[:, k] > 0.5])
            negative = set(groups[labels[:, k] <= 0.5])
            if not positive or not negative:
                missing.append(name)
        if missing:
            out.append(f"WARNING: cache {cache_dir}: the {split} split has no positive or no negative patient for "
                       f"{', '.join(missing)}: their AUCs will be n/a (a larger archive, or `medmoco split "
                       "--fractions` with larger val/test shares)")
    return out


def _trials_and_tables(exp, trials, parent) -> dict:
    """The trials not done yet, then the tables and the figure, logged to the parent run."""
    from dicom_preprocess import SUBTYPES
    from dicom_preprocess.files import atomic_write_json
    from medmoco.label_efficiency import markdown, summarise
    from medmoco.reports import label_efficiency_figure
    from pipelines.finetune import training

    results = []
    total = len(trials) + sum(1 for t in trials if t[1] in exp.series_modes)
    step = 0
    for name, mode, fraction, trial, config in trials:
        step += 1
        done = os.path.join(config.run_dir, "result.json")
        if os.path.exists(done):
            results.append(json.load(open(done)))
        else:
            config.tracking.parent_run_id = parent.run_id or ""
            print(f"[{step}/{total}] {name}", flush=True)
            out = training(0, config)
            m = out["metrics"]
            record = {"mode": mode, "label_fraction": fraction, "trial": trial, "run_id": out["run_id"],
                      "selected_epoch": out["selected_epoch"], "weighted_logloss": m["weighted_logloss"],
                      **{k: m[k] for k in ["auc_mean"] + [f"auc_{c}" for c in SUBTYPES]},
                      "auc_mean_ci": m["auc_mean_ci"],
                      "predictions": os.path.join(config.run_dir, "report", "predictions.parquet"),
                      **_slice_model_exams(config)}
            atomic_write_json(done, record)
            results.append(record)
            # The finished trial's engine and loader iterators sit in reference cycles; collect them
            # here, or the next trial's forked loader workers inherit them and their __del__ prints
            # "can only test a child process" when a worker's garbage collector runs.
            del out
            gc.collect()
        if mode in exp.series_modes:
            step += 1
            results.append(_series_trial(exp, name, mode, fraction, trial, config, parent, f"[{step}/{total}]"))
    table = summarise(results)
    differences = _differences(results) if "scratch" in exp.modes else None
    exam_table = summarise(_exam_results(results)) if exp.series_modes else None
    series_vs_slice = _series_differences(results, exp.series_modes) if exp.series_modes else None
    table.to_csv(os.path.join(exp.run_dir, "table.csv"), index=False)
    if differences is not None:
        differences.to_csv(os.path.join(exp.run_dir, "differences.csv"), index=False)
    if exam_table is not None:
        exam_table.to_csv(os.path.join(exp.run_dir, "exam_table.csv"), index=False)
        series_vs_slice.to_csv(os.path.join(exp.run_dir, "series_vs_slice.csv"), index=False)
    with open(os.path.join(exp.run_dir, "table.md"), "w") as handle:
        handle.write(markdown(table, differences))
        if exam_table is not None:
            handle.write("\nExam level (a series is positive when any of its slices is; a slice model's exam "
                         "probability is its highest slice probability):\n\n" + markdown(exam_table))
            handle.write("\nSeries head minus slice head, same slice model, fraction and seed:\n\n"
                         + markdown(None, series_vs_slice))
    try:
        label_efficiency_figure(table, os.path.join(exp.run_dir, "label_efficiency.png"), differences)
    except ValueError as err:  # a figure is not worth the tables: they are written, the run finishes
        log.warning("label_efficiency.png not drawn: %s", err)
    for file in ("table.csv", "differences.csv", "exam_table.csv", "series_vs_slice.csv", "table.md",
                 "label_efficiency.png"):
        if os.path.exists(os.path.join(exp.run_dir, file)):
            parent.log_artifact(os.path.join(exp.run_dir, file))
    for _, row in table.iterrows():
        if row["auc_mean_mean"] == row["auc_mean_mean"]:  # NaN: no defined AUC in any trial
            parent.log_metrics({f"{row['mode']}_test_auc_mean": row["auc_mean_mean"]},
                               int(round(row["label_fraction"] * 1000)))
    return {"table": table, "differences": differences, "exam_table": exam_table, "series_vs_slice": series_vs_slice,
            "run_id": parent.run_id, "dir": exp.run_dir}


def _slice_model_exams(config) -> dict:
    """A slice trial's exam-level test figures (a series' probability: its highest slice
    probability), from its saved predictions; writes ``report/exam_predictions.parquet``."""
    from dicom_preprocess import SUBTYPES, open_cache
    from medmoco.engines.series import exam_arrays
    from medmoco.metrics import per_class_auc
    from medmoco.predictions import EXAM_FILE, read_predictions, write_exam_predictions

    cache = open_cache(config.cache)
    rows = cache.indices(config.test_split, labeled=True)
    saved = read_predictions(os.path.join(config.run_dir, "report", "predictions.parquet"))
    if list(saved["image_id"]) != list(cache.manifest["image_id"].to_numpy()[rows]):
        raise RuntimeError(f"{config.run_dir}: saved predictions are not the test split's slices in cache order")
    labels, probs, groups, keys, n_slices = exam_arrays(cache, rows, saved["probs"])
    path = os.path.join(config.run_dir, "report", EXAM_FILE)
    write_exam_predictions(path, keys, groups, n_slices, config.test_split, labels, probs)
    auc = per_class_auc(labels, probs)
    return {"exam_predictions": path, **{f"exam_auc_{c}": auc.get(c) for c in SUBTYPES},
            "exam_auc_mean": auc.get("mean")}


def _series_trial(exp, name, mode, fraction, trial, slice_config, parent, step: str) -> dict:
    """The series head on one slice trial's model (same fraction by series, same seed), recorded as
    mode ``series-<mode>``; skipped when its result.json exists."""
    from dicom_preprocess import SUBTYPES
    from dicom_preprocess.files import atomic_write_json
    from medmoco.config import SeriesConfig, from_mapping, to_dict
    from medmoco.predictions import EXAM_FILE
    from pipelines.series import training

    run_dir = os.path.join(exp.run_dir, f"series-{name}")
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        return json.load(open(done))
    print(f"{step} series-{name}", flush=True)
    data = {**exp.series, "cache": exp.cache, "encoder": os.path.join(slice_config.run_dir, "model.pt"),
            "label_fraction": fraction, "subset_seed": slice_config.subset_seed, "seed": trial, "run_dir": run_dir,
            "tracking": {**exp.series.get("tracking", {}), **to_dict(exp.tracking), "run_name": f"series-{name}",
                         "parent_run_id": parent.run_id or ""}}
    out = training(from_mapping(SeriesConfig, data, "experiment series"))
    m, e = out["metrics"], out["metrics"]["exam"]
    record = {"mode": f"series-{mode}", "label_fraction": fraction, "trial": trial, "run_id": out["run_id"],
              "selected_epoch": out["selected_epoch"], "weighted_logloss": m["weighted_logloss"],
              **{k: m[k] for k in ["auc_mean"] + [f"auc_{c}" for c in SUBTYPES]}, "auc_mean_ci": m["auc_mean_ci"],
              "predictions": os.path.join(run_dir, "report", "predictions.parquet"),
              "exam_predictions": os.path.join(run_dir, "report", EXAM_FILE),
              **{f"exam_auc_{c}": e["classes"][c]["auc"] for c in SUBTYPES}, "exam_auc_mean": e["auc_mean"]}
    atomic_write_json(done, record)
    gc.collect()
    return record


def _exam_results(results: list[dict]) -> list[dict]:
    """The records with their exam-level AUCs in place of the slice-level ones (for :func:`summarise`)."""
    out = []
    for r in results:
        if "exam_auc_mean" not in r:
            continue
        out.append({"mode": r["mode"], "label_fraction": r["label_fraction"], "trial": r["trial"],
                    **{k[len("exam_"):]: v for k, v in r.items() if k.startswith("exam_auc_")}})
    return out


def _series_differences(results: list[dict], series_modes):
    """Series head minus its slice head (same slice model, fraction and seed), at slice and exam
    level, each with the patients-and-seeds bootstrap interval."""
    import pandas as pd

    from medmoco.label_efficiency import patient_seed_bootstrap
    from medmoco.predictions import read_exam_predictions, read_predictions

    frames = []
    for mode in series_modes:
        pair = [r for r in results if r["mode"] in (mode, f"series-{mode}")]
        for level, key, reader, ids in (("slice", "predictions", read_predictions, "image_id"),
                                        ("exam", "exam_predictions", read_exam_predictions, "series")):
            trials = []
            for r in pair:
                saved = reader(r[key])
                trials.append({"mode": r["mode"], "label_fraction": r["label_fraction"], "trial": r["trial"],
                               "labels": saved["labels"], "probs": saved["probs"], "groups": saved["group"],
                               "ids": list(saved[ids])})
            if any(t["ids"] != trials[0]["ids"] for t in trials):
                raise RuntimeError(f"series-{mode} and {mode}: tested on different {level}s; cannot pair them")
            frame = patient_seed_bootstrap(trials, reference=mode)
            frame.insert(3, "level", level)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _differences(results: list[dict]):
    """Mode minus scratch per fraction: with a bootstrap over the test split's patients and the
    seeds when every trial's test predictions are saved (:func:`medmoco.label_efficiency.patient_seed_bootstrap`),
    else (trials recorded before predictions were saved) the t-interval over seeds alone."""
    from medmoco.label_efficiency import paired_differences, patient_seed_bootstrap
    from medmoco.predictions import read_predictions

    if not all(r.get("predictions") and os.path.exists(r["predictions"]) for r in results):
        log.warning("some trials have no saved test predictions: the difference's interval is over seeds only")
        return paired_differences(results)
    trials = []
    for r in results:
        saved = read_predictions(r["predictions"])
        trials.append({"mode": r["mode"], "label_fraction": r["label_fraction"], "trial": r["trial"],
                       "labels": saved["labels"], "probs": saved["probs"], "groups": saved["group"],
                       "image_id": saved["image_id"]})
    if any(list(t["image_id"]) != list(trials[0]["image_id"]) for t in trials):
        log.warning("trials were tested on different slices: the difference's interval is over seeds only")
        return paired_differences(results)
    return patient_seed_bootstrap(trials)


def run(args: argparse.Namespace) -> int:
    from medmoco.config import ExperimentConfig, load_config, parse_overrides
    from medmoco.label_efficiency import markdown

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = parse_overrides(args.set)
    if args.trials:
        overrides["trials"] = args.trials
    exp = load_config(ExperimentConfig, args.config, overrides)
    result = run_experiment(exp, args.tracking_uri or "")
    print(markdown(result["table"], result["differences"]))
    print(f"table and plot -> {result['dir']}; MLflow parent run {result['run_id']}")
    return 0
