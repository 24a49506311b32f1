"""Patient-bootstrap intervals: medmoco's vectorised bootstrap vs a naive resampling loop, one core.

    python benchmarks/evaluation.py [--slices 40000] [--patients 1000] [--replicates 2000]

Both sides get the same input (a test split of RSNA size: 40,000 slices of 1,000 patients, six
classes at RSNA-like prevalence) and the same replicates (the same per-patient counts), and give
the same output: the AUC of every class in every replicate. The naive side materialises each
resample (the slices of each drawn patient, as often as drawn) and calls scikit-learn's
``roc_auc_score``. The script checks that both agree to 1e-9, and times the whole
``evaluate_split`` (all intervals, calibration, operating points) too. Target: under 60 s on one
core for the full evaluation at 2,000 replicates.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PREVALENCE = (0.004, 0.05, 0.035, 0.05, 0.063, 0.14)  # RSNA stage-2 train slices, epidural .. any


def split_like_rsna(slices: int, patients: int, seed: int = 0):
    """Slices grouped by patient, labels per class, scores that separate them (AUC ~0.9)."""
    rng = np.random.default_rng(seed)
    pid = np.sort(rng.integers(0, patients, slices))
    labels = (rng.random((slices, 6)) < np.array(PREVALENCE)).astype(np.float64)
    effect = rng.normal(0, 0.5, patients)[pid][:, None]
    probs = 1 / (1 + np.exp(-(2.0 * labels - 2.5 + effect + rng.normal(0, 1, (slices, 6)))))
    return labels, probs, pid


def naive_replicates(labels, probs, codes, counts) -> np.ndarray:
    from sklearn.metrics import roc_auc_score

    members = [np.flatnonzero(codes == q) for q in range(counts.shape[1])]
    out = np.full((len(counts), labels.shape[1]), np.nan)
    for r, row in enumerate(counts):
        idx = np.concatenate([members[q].repeat(int(c)) for q, c in enumerate(row) if c])
        for j in range(labels.shape[1]):
            y = labels[idx, j]
            if 0 < y.sum() < len(y):
                out[r, j] = roc_auc_score(y, probs[idx, j])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=40000)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--replicates", type=int, default=2000)
    args = parser.parse_args()
    from medmoco.bootstrap import PatientBootstrap
    from medmoco.evaluation import choose_thresholds, evaluate_split

    labels, probs, pid = split_like_rsna(args.slices, args.patients)
    evaluate_split(labels[:200], probs[:200], pid[:200], None, 10)  # warm-up: MONAI's import (~10 s) is not timed
    boot = PatientBootstrap(pid, args.replicates, seed=0)
    start = time.perf_counter()
    ours = np.stack([boot.auc(labels[:, j], probs[:, j]) for j in range(6)], axis=1)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_replicates(labels, probs, boot.codes, boot.counts)
    t_naive = time.perf_counter() - start
    agree = np.nanmax(np.abs(ours - naive))
    thresholds = choose_thresholds(labels, probs, 0.9)  # stand-in for thresholds fixed on validation
    start = time.perf_counter()
    evaluation = evaluate_split(labels, probs, pid, thresholds, args.replicates, 0.95, 0)
    t_full = time.perf_counter() - start
    print(f"input: {args.slices} slices of {args.patients} patients, 6 classes, {args.replicates} patient-bootstrap "
          f"replicates, one core")
    print(f"per-class AUC of every replicate   medmoco {t_ours:8.2f} s   naive loop {t_naive:8.2f} s   "
          f"ratio {t_naive / t_ours:6.1f}x   max |difference| {agree:.1e}")
    print(f"whole evaluate_split (AUC, log loss, sensitivity/specificity intervals, ECE, Brier): {t_full:.2f} s "
          f"(target < 60 s)")
    print(f"mean AUC {evaluation['auc_mean']:.4f} {evaluation['auc_mean_ci']}")
    if not agree < 1e-9:
        raise SystemExit(f"the two sides disagree by {agree}")


if __name__ == "__main__":
    main()
