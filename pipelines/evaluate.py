"""Stages that use a trained classifier: `medmoco evaluate`, `medmoco predict`, `medmoco select`.

``--model`` takes a ``model.pt`` written by `medmoco finetune`, ``runs:/<finetune run id>``
(its logged ``model/model.pt``), or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``
of the MLflow registry (``medmoco register``). Submission CSVs are in the Kaggle format:
``ID,Label`` with six rows ``ID_<image>_<subtype>`` per image.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile

from dicom_preprocess.config import ConfigError

from medmoco.inference import preprocess_like_model, resolve_model, write_submission  # noqa: F401

log = logging.getLogger("medmoco.evaluate")


def predict_cache(model_path: str, cache_dir: str, split: str | None = None, device: str = "cpu",
                  batch_size: int = 64):
    """(image ids, probabilities (N, 6), rows, cache, model info) of a cache split (all images when
    split is None)."""
    from dicom_preprocess import open_cache
    from medmoco.engines.supervised import predict_rows
    from medmoco.models import load_classifier

    model, info = load_classifier(model_path)
    cache = open_cache(cache_dir)
    windows = [w["name"] for w in cache.metadata["windows"]]
    expected = [w["name"] for w in info["preprocess"].get("windows", [])]
    if expected and windows != expected:
        raise ValueError(f"cache {cache_dir} has windows {windows}, the model was trained on {expected}")
    rows = cache.indices(split) if split and split != "all" else cache.indices()
    model.to(device)
    probs = predict_rows(model, cache, rows, info["context"], info["image_size"], device, batch_size)
    ids = cache.manifest["image_id"].to_numpy()[rows]
    return ids, probs, rows, cache, info


# --- evaluate ---------------------------------------------------------------------------------

def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model.pt, runs:/ID or models:/NAME@ALIAS")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--split", default="test", help="cache split (test, val, train, unsupervised) or 'all'")
    parser.add_argument("--out", required=True, help="directory for metrics.json/.md, predictions.csv and figures")
    parser.add_argument("--replicates", type=int, default=2000, help="patient-bootstrap replicates for the intervals")
    parser.add_argument("--level", type=float, default=0.95, help="interval level")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--min-groups", dest="min_groups", type=int, default=10,
                        help="fewest patients with a positive and with a negative slice a class needs for intervals")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default="")


def evaluate(model: str, cache_dir: str, split: str, out: str, device: str = "cpu", tracking_uri: str = "",
             replicates: int = 2000, level: float = 0.95, seed: int = 0, min_groups: int = 10) -> dict:
    """Predictions of a cache split and, where it is labeled, :func:`medmoco.evaluation.evaluate_split`
    with the model's operating points (thresholds fixed on validation when it was trained)."""
    from medmoco.config import BootstrapConfig
    from medmoco.evaluation import evaluate_split
    from medmoco.reports import write_evaluation

    BootstrapConfig(replicates, level, seed, min_groups)  # checks them, naming the setting
    path = resolve_model(model, tracking_uri)
    if not os.path.isdir(cache_dir):
        raise ConfigError(f"cache {cache_dir}: no such directory")
    ids, probs, rows, cache, info = predict_cache(path, cache_dir, None if split == "all" else split, device)
    os.makedirs(out, exist_ok=True)
    write_submission(ids, probs, os.path.join(out, "predictions.csv"))
    labeled = cache.manifest["labeled"].to_numpy()[rows]
    about = {"model": model, "cache": os.path.abspath(cache_dir), "cache_fingerprint": cache.fingerprint,
             "split": split, "split_fingerprint": cache.metadata.get("split_fingerprints", {}).get(split, ""),
             "n_predicted": int(len(rows)), "n_labeled": int(labeled.sum()),
             "operating_points": info.get("operating_points")}
    if not labeled.any():
        metrics = {**about, "n_images": int(len(rows))}
        with open(os.path.join(out, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=1)
        return metrics
    thresholds = (info.get("operating_points") or {}).get("thresholds")
    patients = cache.groups(rows[labeled])
    evaluation = evaluate_split(cache.labels(rows[labeled]), probs[labeled], patients, thresholds, replicates, level,
                                seed, cache.group_unit, min_groups)
    from medmoco.subgroups import add_reader_tables

    add_reader_tables(evaluation, cache, rows[labeled], probs[labeled], min_groups)
    evaluation["exam"] = exam_evaluation(path, cache, rows[labeled], probs[labeled], info, device, replicates,
                                         level, seed, min_groups)
    write_evaluation(out, cache.labels(rows[labeled]), probs[labeled], evaluation, about,
                     {"image_ids": ids[labeled], "groups": patients,
                      "split": cache.manifest["split"].to_numpy()[rows[labeled]]})  # per slice: `all` spans splits
    from medmoco.evaluation import markdown_table

    with open(os.path.join(out, "metrics.md"), "a") as handle:
        handle.write(f"\n## Exam level (a series is positive when any of its slices is; "
                     f"{evaluation['exam']['exam_output']})\n\n" + markdown_table(evaluation["exam"]))
    return {**evaluation, **about}


def exam_evaluation(model_path: str, cache, rows, probs, info: dict, device: str = "cpu", replicates: int = 2000,
                    level: float = 0.95, seed: int = 0, min_groups: int = 10) -> dict:
    """Exam-level figures of labeled ``rows`` (whole series): per class a series is positive when any
    of its slices is; its probability is a series model's exam output, else the highest slice
    probability; the model's exam thresholds where it has them; the patient bootstrap."""
    from medmoco.engines.series import exam_predictions
    from medmoco.evaluation import evaluate_split
    from medmoco.models import load_classifier

    model = load_classifier(model_path)[0].to(device) if info.get("series") else None
    exam_y, exam_p, groups, _, _ = exam_predictions(model, cache, rows, probs, device)
    thresholds = (info.get("operating_points") or {}).get("exam_thresholds")
    exam = evaluate_split(exam_y, exam_p, groups, thresholds, replicates, level, seed, cache.group_unit, min_groups)
    exam["n_series"] = int(len(exam_y))
    exam["exam_output"] = ("the series head's exam output" if info.get("series")
                           else "a slice model: the highest slice probability of the series")
    return exam


def run_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate(args.model, args.cache, args.split, args.out, args.device, args.tracking_uri, args.replicates,
                       args.level, args.seed, args.min_groups)
    from medmoco.intervals import format_estimate

    if metrics.get("auc_mean") is not None:
        summary = (f"AUC mean {format_estimate(metrics['auc_mean'], metrics.get('auc_mean_ci'), 4)} "
                   f"({int(100 * args.level)}% CI, patient bootstrap), weighted log loss "
                   f"{format_estimate(metrics.get('weighted_logloss'), None, 4)}")
    else:
        summary = "no labeled images (or no class with both labels): predictions only"
    print(f"evaluated {metrics['n_predicted']} images of {args.split}: {summary}; -> {args.out}")
    return 0


# --- predict ----------------------------------------------------------------------------------

def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model.pt, runs:/ID or models:/NAME@ALIAS")
    parser.add_argument("--input", required=True, help="DICOM folder, .zip or .tar(.gz), or a DICOMweb server: "
                        "dicomweb+http://HOST:PORT/dicom-web[?StudyInstanceUID=...]")
    parser.add_argument("--out", required=True, help="submission CSV")
    parser.add_argument("--series-out", dest="series_out", default="",
                        help="CSV with one row per series: series_uid, n_slices, the six exam-level probabilities")
    parser.add_argument("--sr", dest="sr_dir", default="",
                        help="folder for one DICOM Structured Report per series (findings at the model's thresholds, "
                             "probabilities, the model's name, version and sha256; DICOM inputs only)")
    parser.add_argument("--stow", default="", help="DICOMweb root (http://HOST:PORT/dicom-web): store every DICOM "
                        "file under --sr there with STOW-RS")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default="")


def predict(model: str, input_path: str, out: str, workers: int = 1, device: str = "cpu",
            tracking_uri: str = "", series_out: str = "", sr_dir: str = "", stow: str = "") -> dict:
    """Slice probabilities of raw DICOMs (a Kaggle submission CSV at ``out``) and, on request, one
    row per series (``series_out``), one DICOM SR per series (``sr_dir``) and those SRs stored on a
    DICOMweb server (``stow``)."""
    from dicom_preprocess.sources import is_dicomweb
    from medmoco.models.export import read_weights

    if stow:
        check_stow(stow, sr_dir)
    path = resolve_model(model, tracking_uri)
    info = {k: v for k, v in read_weights(path).items() if k != "state_dict"}
    if not is_dicomweb(input_path) and not os.path.exists(input_path):
        raise ConfigError(f"input {input_path}: no such file or directory")
    from dicom_preprocess.assembly import NothingCached

    skipped_csv = os.path.splitext(out)[0] + ".skipped.csv"
    series, srs = None, []
    with tempfile.TemporaryDirectory(prefix="medmoco-predict-") as work:
        try:
            preprocess_like_model(info, input_path, os.path.join(work, "cache"), workers)
        except NothingCached:
            import pandas as pd

            errors = pd.read_csv(os.path.join(work, "cache", "errors.csv"), dtype=str, keep_default_na=False)
            os.makedirs(os.path.dirname(os.path.abspath(skipped_csv)), exist_ok=True)
            errors.to_csv(skipped_csv, index=False)
            raise NothingCached(f"input {input_path}: none of its {len(errors)} files is a usable image; the reasons "
                                f"are in {skipped_csv}") from None
        ids, probs, rows, cache, _ = predict_cache(path, os.path.join(work, "cache"), None, device)
        skipped = cache.errors()
        if series_out or sr_dir:
            series, sources = series_predictions(path, cache, rows, probs, device)
    write_submission(ids, probs, out)
    if len(skipped):
        skipped.to_csv(skipped_csv, index=False)
    if series_out:
        os.makedirs(os.path.dirname(os.path.abspath(series_out)), exist_ok=True)
        series.to_csv(series_out, index=False, float_format="%.9g")
    if sr_dir:  # last: the CSVs are written even where an input cannot have SRs (a volume)
        from medmoco.export.sr import read_series_headers, series_operating_point, write_series_srs
        from medmoco.inference.identity import model_identity

        thresholds, parameters = series_operating_point(info)
        headers = read_series_headers(input_path, dict(zip(series["series_uid"], sources)))
        srs = write_series_srs(series, headers, model_identity(model, path, info, tracking_uri), thresholds, sr_dir,
                               parameters)
    stored = stow_folder(stow, sr_dir) if stow else None
    return {"images": len(ids), "skipped": len(skipped), "out": out,
            "series": None if series is None else len(series), "series_out": series_out, "srs": srs,
            "stored": stored}


def check_stow(url: str, sr_dir: str) -> None:
    """Refuse a --stow that cannot work before anything is predicted."""
    from dicom_preprocess.sources.dicomweb import parse_address

    if not sr_dir:
        raise ConfigError("--stow stores the DICOM files of --sr DIR: give --sr")
    try:
        parse_address(url, "--stow")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def stow_folder(url: str, folder: str) -> int:
    """Store every DICOM file under ``folder`` (sorted by path) with STOW-RS; returns how many.

    Raises:
        SourceUnavailable: the server cannot be reached or answers 5xx.
        ConfigError: a file the server refused (named), or no such folder.
    """
    from dicom_preprocess.sources.dicomweb import dicom_files, store

    try:
        return len(store(url, dicom_files(folder)))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{err} (the predictions are written; rerun to store)") from None


def series_predictions(model_path: str, cache, rows, probs, device: str = "cpu"):
    """One row per series (grouped by SeriesInstanceUID, slices in order): ``series_uid``,
    ``study_uid``, ``n_slices`` and the six exam-level probabilities (a series model's exam output,
    else the highest slice probability of the series); and per row the input member names of its
    slices (the manifest's ``source``)."""
    import pandas as pd

    from dicom_preprocess import SUBTYPES
    from medmoco.data.series import series_members
    from medmoco.engines.series import exam_predictions
    from medmoco.models import load_classifier

    model, info = load_classifier(model_path)
    _, exam_p, _, keys, n_slices = exam_predictions(model.to(device) if info.get("series") else None, cache, rows,
                                                    probs, device)
    study, _, series = zip(*(str(k).partition("/") for k in keys)) if len(keys) else ((), (), ())
    frame = pd.DataFrame({"series_uid": series, "study_uid": study, "n_slices": n_slices})
    for j, c in enumerate(SUBTYPES):
        frame[c] = exam_p[:, j].astype(float)
    members, _ = series_members(cache, rows)  # the grouping exam_predictions made (exam_arrays), in its order
    source = cache.manifest["source"].to_numpy()
    return frame, [list(source[m]) for m in members]


def run_predict(args: argparse.Namespace) -> int:
    result = predict(args.model, args.input, args.out, args.workers, args.device, args.tracking_uri, args.series_out,
                     args.sr_dir, args.stow)
    print(f"predicted {result['images']} images ({result['skipped']} skipped) -> {result['out']}"
          + (f"; {result['series']} series -> {result['series_out']}" if args.series_out else "")
          + (f"; {len(result['srs'])} DICOM SRs -> {args.sr_dir}" if args.sr_dir else "")
          + (f"; {result['stored']} DICOM files of {args.sr_dir} stored at {args.stow}" if args.stow else ""))
    return 0


# --- select -----------------------------------------------------------------------------------

def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model.pt, runs:/ID or models:/NAME@ALIAS")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--n", type=int, required=True, help="number of slices to send for labeling")
    parser.add_argument("--strategy", choices=("uncertainty", "random"), default="uncertainty")
    parser.add_argument("--by-series", dest="by_series", action="store_true",
                        help="keep whole series together (ranked by their mean uncertainty)")
    parser.add_argument("--split", default="unsupervised")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="CSV of image ids (with series and score)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default="")


def uncertainty(probs):
    """Predictive uncertainty of a multi-label prediction: the mean binary entropy over the six
    subtypes (nats), highest where the model is least sure (p near 0.5)."""
    import numpy as np

    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    return (-(p * np.log(p) + (1 - p) * np.log(1 - p))).mean(axis=1)


def select(model: str, cache_dir: str, n: int, strategy: str, out: str, by_series: bool = False,
           split: str = "unsupervised", seed: int = 0, device: str = "cpu", tracking_uri: str = "") -> "pd.DataFrame":  # noqa: F821
    import numpy as np
    import pandas as pd

    if n < 1:
        raise ConfigError(f"n {n}: must be >= 1")
    path = resolve_model(model, tracking_uri)
    ids, probs, rows, cache, _ = predict_cache(path, cache_dir, split, device)
    series = cache.manifest["series_uid"].to_numpy()[rows]
    rng = np.random.default_rng(seed)
    score = uncertainty(probs) if strategy == "uncertainty" else rng.random(len(rows))
    frame = pd.DataFrame({"image_id": ids, "series_id": series, "score": score})
    if by_series:
        ranked = frame.groupby("series_id")["score"].mean().sort_values(ascending=False, kind="stable")
        chosen, total = [], 0
        for sid in ranked.index:  # whole series until n slices are reached
            if total >= n:
                break
            part = frame[frame["series_id"] == sid]
            chosen.append(part)
            total += len(part)
        picked = pd.concat(chosen) if chosen else frame.iloc[:0]
    else:
        picked = frame.sort_values("score", ascending=False, kind="stable").head(n)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    picked.to_csv(out, index=False)
    return picked


def run_select(args: argparse.Namespace) -> int:
    picked = select(args.model, args.cache, args.n, args.strategy, args.out, args.by_series, args.split, args.seed,
                    args.device, args.tracking_uri)
    print(f"selected {len(picked)} slices ({picked['series_id'].nunique()} series, strategy {args.strategy}) "
          f"-> {args.out}")
    if len(picked) < args.n:
        print(f"note: --n {args.n} asked for more slices than the {args.split!r} split holds ({len(picked)}): all of "
              "them were selected")
    return 0
