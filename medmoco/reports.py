"""Figures for runs and experiments (matplotlib, headless Agg backend)."""
from __future__ import annotations

import numpy as np

from dicom_preprocess import SUBTYPES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(labels: np.ndarray, probs: np.ndarray, path: str) -> str:
    """The ROC curves of the six subtypes in one PNG (a class with one label value is noted, not drawn)."""
    from sklearn.metrics import roc_curve

    from .metrics import per_class_auc

    plt = _pyplot()
    auc = per_class_auc(labels, probs)
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for ax, j in zip(axes.ravel(), range(len(SUBTYPES))):
        y = labels[:, j]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[:, j])
            ax.plot(fpr, tpr, lw=2, label=f"AUC {auc[SUBTYPES[j]]:.3f}")
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "one label value: no ROC", ha="center")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_title(f"{SUBTYPES[j]} (n+={int(y.sum())})")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def reliability_figure(labels: np.ndarray, probs: np.ndarray, path: str, bins: int = 15) -> str:
    """Reliability diagrams of the six subtypes (mean predicted probability vs observed frequency
    per equal-width bin, marker area by slice count), each titled with its ECE, in one PNG."""
    from .metrics import expected_calibration_error

    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, j in zip(axes.ravel(), range(len(SUBTYPES))):
        y, p = labels[:, j].astype(np.float64), probs[:, j].astype(np.float64)
        which = np.minimum((p * bins).astype(np.int64), bins - 1)
        n = np.bincount(which, minlength=bins)
        used = n > 0
        mean_p = np.bincount(which, weights=p, minlength=bins)[used] / n[used]
        freq = np.bincount(which, weights=y, minlength=bins)[used] / n[used]
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(mean_p, freq, "-", lw=1, color="tab:blue")
        ax.scatter(mean_p, freq, s=20 + 200 * n[used] / max(1, n.max()), color="tab:blue", label="bins (area: slices)")
        ax.bar(edges[:-1], n / max(1, len(p)), width=1.0 / bins, align="edge", alpha=0.15, color="gray",
               label="share of slices")
        ece = expected_calibration_error(y, p, bins) if len(y) else float("nan")
        ax.set_title(f"{SUBTYPES[j]} (n+={int(y.sum())}, ECE {ece:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed frequency")
    axes.ravel()[0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def training_curves(history: dict, path: str) -> str:
    """One panel per metric of ``{key: [(step, value), ...]}``."""
    plt = _pyplot()
    keys = [k for k, v in history.items() if v]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(5 * max(1, len(keys)), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps, values = zip(*history[key])
        ax.plot(steps, values, marker="o")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def label_efficiency_figure(table, path: str, differences=None) -> str:
    """Left: test mean AUC vs label fraction, one line per mode, +/- std over trials. Right (with
    ``differences``): each MoCo mode minus scratch, trial-paired, with its 95% interval."""
    plt = _pyplot()
    panels = 2 if differences is not None and len(differences) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    for mode, part in table.groupby("mode"):
        part = part[part["auc_mean_mean"].notna()].sort_values("label_fraction")  # n/a: nothing to draw
        if len(part):
            ax.errorbar(part["label_fraction"], part["auc_mean_mean"], yerr=part["auc_mean_std"].fillna(0),
                        marker="o", capsize=3, label=mode)
    if not table["auc_mean_mean"].notna().any():
        ax.text(0.5, 0.5, "no defined test AUC (a split without positives)", ha="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log")  # (matplotlib refuses a log axis with no data on it)
    ax.set_xlabel("label fraction")
    ax.set_ylabel("test mean AUC (6 subtypes), mean ± std over trials")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(True, alpha=0.3)
    if panels == 2:
        ax = axes[0][1]
        for mode, part in differences.groupby("mode"):
            part = part.sort_values("label_fraction")
            # a percentile interval need not contain the mean: clipped, errorbar refuses negative lengths
            low = (part["delta_auc_mean"] - part["delta_ci_low"]).fillna(0).clip(lower=0)
            high = (part["delta_ci_high"] - part["delta_auc_mean"]).fillna(0).clip(lower=0)
            ax.errorbar(part["label_fraction"], part["delta_auc_mean"], yerr=[low, high], marker="o", capsize=3,
                        label=f"{mode} − scratch")
        ax.axhline(0.0, color="k", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("label fraction")
        ax.set_ylabel("Δ test mean AUC, paired trials (95% CI)")
        ax.legend()
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_evaluation(out_dir: str, labels: np.ndarray, probs: np.ndarray, evaluation: dict,
                     extra: dict | None = None, slices: dict | None = None) -> list[str]:
    """``metrics.json`` (:func:`medmoco.evaluation.evaluate_split` plus ``extra``), ``metrics.md``
    (the reviewer's table), ``roc_curves.png`` and ``reliability.png`` in ``out_dir``; with
    ``slices`` (``{"image_ids", "groups", "split"}`` of the rows of ``labels``) also
    ``predictions.parquet`` (:mod:`medmoco.predictions`), from which every figure recomputes.

    Returns:
        The paths written.
    """
    import json
    import os

    from .evaluation import markdown_table

    from .predictions import FILE, write_predictions

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("metrics.json", "metrics.md", "roc_curves.png",
                                                      "reliability.png")]
    extra = dict(extra or {})
    if slices is not None:
        paths.append(write_predictions(os.path.join(out_dir, FILE), slices["image_ids"], slices["groups"],
                                       slices["split"], labels, probs))
        extra["predictions"] = FILE
    with open(paths[0], "w") as handle:
        json.dump({**evaluation, **extra}, handle, indent=1)
    with open(paths[1], "w") as handle:
        handle.write(markdown_table(evaluation))
    roc_figure(labels, probs, paths[2])
    reliability_figure(labels, probs, paths[3])
    return paths
