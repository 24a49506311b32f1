"""The label-efficiency table: test figures per mode and label fraction over trials, and the paired
difference of each MoCo mode against training from scratch.

Trials of one fraction differ only in their seed (initialisation and data order); the labeled
subset is the same for every mode and trial, and trial ``t`` of every mode uses seed ``t``. So the
modes are compared trial by trial: for each fraction, ``d_t = AUC(mode, t) - AUC(scratch, t)``,
summarised by its mean and a 95% t-interval over the trials (``mean +/- t_{0.975, n-1} sd / sqrt n``).
Each trial's AUC is its test mean AUC, read once after selection on the validation split.

That t-interval treats the test split as fixed: it says how much the seeds move the difference,
not how much another sample of patients would. :func:`patient_seed_bootstrap` gives the interval
that counts both: every replicate draws the test split's patients with replacement (one draw for
all trials and modes, which share the split) and the paired trials with replacement, and takes
the mean over the drawn trials of the difference of mean AUCs on the drawn patients (the mean
over a fixed set of classes, those with an AUC on the whole split; a replicate lacking one of them
is left out and counted).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dicom_preprocess import SUBTYPES

from .intervals import format_estimate

AUC_COLUMNS = [f"auc_{c}" for c in SUBTYPES] + ["auc_mean"]


def summarise(results: list[dict]) -> pd.DataFrame:
    """Per (mode, fraction): mean and std over trials of each per-class test AUC, the mean AUC and
    the weighted log loss; ``trials`` counts them."""
    frame = pd.DataFrame(results)
    metrics = [c for c in AUC_COLUMNS + ["weighted_logloss"] if c in frame.columns]
    grouped = frame.groupby(["mode", "label_fraction"])[metrics].agg(["mean", "std"])
    grouped.columns = [f"{m}_{s}" for m, s in grouped.columns]
    grouped["trials"] = frame.groupby(["mode", "label_fraction"]).size()
    return grouped.reset_index()


def paired_differences(results: list[dict], reference: str = "scratch", level: float = 0.95,
                       metric: str = "auc_mean") -> pd.DataFrame:
    """For each mode other than ``reference`` and each fraction: the trial-paired difference of
    ``metric`` (mode minus reference), its mean, std and t-interval over the paired trials."""
    from scipy import stats

    frame = pd.DataFrame(results)
    base = frame[frame["mode"] == reference].set_index(["label_fraction", "trial"])[metric]
    rows = []
    for (mode, fraction), part in frame[frame["mode"] != reference].groupby(["mode", "label_fraction"]):
        values = part.set_index(["label_fraction", "trial"])[metric]
        paired = values.index.intersection(base.index)
        diffs = (values.loc[paired] - base.loc[paired]).dropna().to_numpy()
        n = len(diffs)
        mean = float(diffs.mean()) if n else float("nan")
        sd = float(diffs.std(ddof=1)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
        rows.append({"mode": mode, "reference": reference, "label_fraction": fraction, "pairs": n,
                     f"delta_{metric}": mean, "delta_sd": sd, "delta_ci_low": mean - half, "delta_ci_high": mean + half})
    return pd.DataFrame(rows)


def patient_seed_bootstrap(trials: list[dict], reference: str = "scratch", replicates: int = 2000,
                           level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """The difference of test mean AUC, mode minus ``reference``, per label fraction, with a
    bootstrap interval over patients *and* seeds (see the module docstring).

    Args:
        trials: one dict per trial: ``mode``, ``label_fraction``, ``trial``, ``labels`` and
            ``probs`` (N, 6) on the test split, ``groups`` (N,), slices in the same order for all.

    Returns:
        One row per (mode, fraction): ``pairs``, ``delta_auc_mean`` (mean over the paired
        trials), ``delta_ci_low``/``delta_ci_high`` (percentile, patients and seeds), ``replicates_used``.
    """
    from .bootstrap import PatientBootstrap, percentile_interval
    from .metrics import per_class_auc

    if not trials:
        return pd.DataFrame()
    labels = np.asarray(trials[0]["labels"], dtype=np.float64)
    boot = PatientBootstrap(trials[0]["groups"], replicates, seed)
    classes = [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]
    by_key = {}
    for t in trials:
        probs = np.asarray(t["probs"], dtype=np.float64)
        point = per_class_auc(labels, probs)
        # (C, B); no class with both labels on this split: nothing to resample (n/a, not a crash)
        reps = np.stack([boot.auc(labels[:, j], probs[:, j]) for j in classes]) if classes else None
        by_key[(t["mode"], t["label_fraction"], t["trial"])] = (
            float(np.mean([point[SUBTYPES[j]] for j in classes])) if classes else np.nan,
            np.where(np.isfinite(reps).all(axis=0), reps.mean(axis=0), np.nan) if classes
            else np.full(replicates, np.nan))
    rng = np.random.default_rng(seed + 1)
    rows = []
    modes = sorted({(m, f) for m, f, _ in by_key if m != reference})
    for mode, fraction in modes:
        paired = sorted(t for m, f, t in by_key if m == mode and f == fraction and (reference, f, t) in by_key)
        if not paired:
            continue
        point = np.array([by_key[(mode, fraction, t)][0] - by_key[(reference, fraction, t)][0] for t in paired])
        reps = np.stack([by_key[(mode, fraction, t)][1] - by_key[(reference, fraction, t)][1]
                         for t in paired])  # (T, B)
        drawn = rng.integers(0, len(paired), size=(replicates, len(paired)))  # seeds resampled per replicate
        values = reps[drawn, np.arange(replicates)[:, None]].mean(axis=1)
        ci = percentile_interval(values, level) or [np.nan, np.nan]
        rows.append({"mode": mode, "reference": reference, "label_fraction": fraction, "pairs": len(paired),
                     "delta_auc_mean": float(point.mean()), "delta_ci_low": ci[0], "delta_ci_high": ci[1],
                     "replicates_used": int(np.isfinite(values).sum()), "interval": "patients and seeds"})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame | None, differences: pd.DataFrame | None = None) -> str:
    """Both tables as Markdown (mean ± std over trials; paired differences with their interval,
    against their ``reference`` mode, with a ``level`` column where they have one)."""
    lines = []
    undefined = False
    if table is not None:
        lines = ["| mode | fraction | " + " | ".join(c[4:] for c in AUC_COLUMNS) + " | trials |",
                 "|" + "---|" * (len(AUC_COLUMNS) + 3)]
    for _, row in (table.iterrows() if table is not None else ()):
        cells = []
        for c in AUC_COLUMNS:
            mean, sd = row[c + "_mean"], row[c + "_std"]
            undefined |= mean != mean
            cells.append("n/a" if mean != mean else f"{mean:.3f} ± {0.0 if sd != sd else sd:.3f}")
        lines.append(f"| {row['mode']} | {row['label_fraction']:g} | " + " | ".join(cells) + f" | {row['trials']} |")
    if undefined:
        lines += ["", "n/a: the test split holds no positive (or no negative) slice of that class, so its AUC is "
                      "undefined; the mean AUC averages the classes that have both."]
    if differences is not None and len(differences):
        method = differences["interval"].iloc[0] if "interval" in differences else "paired trials"
        has_level = "level" in differences
        lines += ["", f"| mode − reference | fraction | {'level | ' if has_level else ''}Δ test mean AUC | "
                      f"95% CI ({method}) | pairs |", "|---|---|" + ("---|" if has_level else "") + "---|---|---|"]
        order = ["mode", "label_fraction"] + (["level"] if has_level else [])
        for _, row in differences.sort_values(order).iterrows():
            low, high = (format_estimate(row[k], None, signed=True) for k in ("delta_ci_low", "delta_ci_high"))
            ci = "n/a" if "n/a" in (low, high) else f"[{low}, {high}]"
            lines.append(f"| {row['mode']} − {row.get('reference', 'scratch')} | {row['label_fraction']:g} | "
                         + (f"{row['level']} | " if has_level else "")
                         + f"{format_estimate(row['delta_auc_mean'], None, signed=True)} | {ci} | {row['pairs']} |")
    return "\n".join(lines) + "\n"
