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


def label_efficiency_figure(table, path: str) -> str:
    """Mean AUC vs label fraction, one line per mode with +/- std error bars (``table``: a DataFrame
    with columns mode, label_fraction, auc_mean_mean, auc_mean_std)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for mode, part in table.groupby("mode"):
        part = part.sort_values("label_fraction")
        ax.errorbar(part["label_fraction"], part["auc_mean_mean"], yerr=part["auc_mean_std"].fillna(0),
                    marker="o", capsize=3, label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("label fraction")
    ax.set_ylabel("test mean AUC (6 subtypes)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_metrics_report(out_dir: str, labels: np.ndarray, probs: np.ndarray, metrics: dict,
                         extra: dict | None = None) -> list[str]:
    """``metrics.csv``/``.md``/``.json`` and ``roc_curves.png`` of one evaluation in ``out_dir``.

    Returns:
        The paths written.
    """
    import json
    import os

    import pandas as pd

    from .metrics import markdown_table, metrics_table

    os.makedirs(out_dir, exist_ok=True)
    rows = metrics_table(metrics)
    paths = [os.path.join(out_dir, name) for name in ("metrics.csv", "metrics.md", "metrics.json", "roc_curves.png")]
    pd.DataFrame(rows).to_csv(paths[0], index=False)
    with open(paths[1], "w") as handle:
        handle.write(markdown_table(rows))
    with open(paths[2], "w") as handle:
        json.dump({**metrics, **(extra or {})}, handle, indent=1)
    roc_figure(labels, probs, paths[3])
    return paths
