"""The label-efficiency table: test figures per mode and label fraction over trials, and the paired
difference of each MoCo mode against training from scratch.

Trials of one fraction differ only in their seed (initialisation and data order); the labeled
subset is the same for every mode and trial, and trial ``t`` of every mode uses seed ``t``. So the
modes are compared trial by trial: for each fraction, ``d_t = AUC(mode, t) - AUC(scratch, t)``,
summarised by its mean and a 95% t-interval over the trials (``mean +/- t_{0.975, n-1} sd / sqrt n``).
Each trial's AUC is its test mean AUC, read once after selection on the validation split.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dicom_preprocess import SUBTYPES

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


def markdown(table: pd.DataFrame, differences: pd.DataFrame | None = None) -> str:
    """Both tables as Markdown (mean ± std over trials; paired differences with their interval)."""
    head = "| mode | fraction | " + " | ".join(c[4:] for c in AUC_COLUMNS) + " | trials |"
    lines = [head, "|" + "---|" * (len(AUC_COLUMNS) + 3)]
    undefined = False
    for _, row in table.iterrows():
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
        lines += ["", "| mode − scratch | fraction | Δ test mean AUC | 95% CI (paired trials) | pairs |",
                  "|---|---|---|---|---|"]
        for _, row in differences.sort_values(["mode", "label_fraction"]).iterrows():
            lines.append(f"| {row['mode']} | {row['label_fraction']:g} | {row['delta_auc_mean']:+.3f} | "
                         f"[{row['delta_ci_low']:+.3f}, {row['delta_ci_high']:+.3f}] | {row['pairs']} |")
    return "\n".join(lines) + "\n"
