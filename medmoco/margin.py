"""How often an equally good candidate passes the non-inferiority rule at a margin: a margin a lab
can afford, said before looking.

The rule (:func:`medmoco.comparison.non_inferior`) promotes when the lower bound of the paired
patient-bootstrap interval of the mean-AUC difference is at or above ``-margin`` (and no class
falls below ``-2 x margin``). If the difference's standard deviation is ``sigma``, a candidate
exactly as good as the reference passes with probability about ``Phi(margin / sigma - z)``
(``z = 1.96`` for a 95% interval), so a pass rate of 80% needs ``margin >= (1.96 + 0.84) sigma``;
with 2,000 test patients ``sigma`` was about 0.0035, where a margin of 0.005 refuses an equal
candidate most of the time.

:func:`margin_plan` estimates it on the split's own patients and the reference's predictions by
simulation. Two equally good models are drawn around the reference: each is the reference's
logit plus its own noise, made of a per-unit (patient) part and a per-slice part, of standard
deviation ``disagreement`` times the SD of the reference's logits (split evenly between the two
parts); the two are exchangeable, so their true difference is 0. Each draw runs the rule as
promotion does, on the same units and labels. ``disagreement`` is the one modelling choice:
0.5 makes the two models' logits correlate about 0.8, as retrained models of one architecture
usually do; a lab that has two real models can read their correlation instead.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from .comparison import compare_predictions, non_inferior
from .intervals import MIN_GROUPS, wilson

EPS = 1e-7


def margin_plan(reference_probs: np.ndarray, labels: np.ndarray, groups, margin: float, n_sim: int = 100,
                replicates: int = 300, level: float = 0.95, seed: int = 0, disagreement: float = 0.5,
                power: float = 0.8, min_groups: int = MIN_GROUPS) -> dict:
    """Estimate how often an equally good candidate passes the rule at ``margin`` (see the module docstring).

    Args:
        reference_probs, labels: (N, 6) of the split promotion compares on.
        groups: the grouping unit of each slice (``CTCache.groups(rows)``).
        margin: the non-inferiority margin on the mean AUC.
        n_sim: simulated candidate pairs; replicates: bootstrap replicates per comparison.

    Returns:
        ``{"margin", "pass_rate", "pass_rate_ci" (Wilson over the draws), "n_sim", "sd_delta"
        (SD of the simulated mean-AUC differences), "margin_for_power" (``(z(level) + z(power)) x
        sd_delta``), "power", "n_units", "disagreement", "refusals" (reasons, counted)}``.
    """
    probs = np.clip(np.asarray(reference_probs, dtype=np.float64), EPS, 1 - EPS)
    labels = np.asarray(labels, dtype=np.float64)
    logits = np.log(probs) - np.log1p(-probs)
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    units = int(codes.max()) + 1 if len(codes) else 0
    scale = disagreement * logits.std(axis=0, keepdims=True) / np.sqrt(2.0)
    rng = np.random.default_rng(seed)
    passed, deltas, refusals = [], [], {}

    def draw():
        noise = rng.normal(size=(units, logits.shape[1]))[codes] + rng.normal(size=logits.shape)
        return 1.0 / (1.0 + np.exp(-(logits + scale * noise)))

    for k in range(n_sim):
        candidate, reference = draw(), draw()
        comparison = compare_predictions(labels, candidate, reference, groups, replicates, level, seed + 1 + k,
                                         min_groups)
        ok, why = non_inferior(comparison, margin)
        passed.append(ok)
        if comparison["mean"]["delta"] is not None:
            deltas.append(comparison["mean"]["delta"])
        if not ok:
            key = why.split(",")[0].split(":")[0]
            refusals[key] = refusals.get(key, 0) + 1
    sd = float(np.std(deltas, ddof=1)) if len(deltas) > 1 else None
    z = float(norm.ppf(0.5 + level / 2) + norm.ppf(power))
    return {"margin": float(margin), "pass_rate": float(np.mean(passed)) if passed else None,
            "pass_rate_ci": wilson(float(np.sum(passed)), len(passed)) if passed else None, "n_sim": int(n_sim),
            "sd_delta": sd, "margin_for_power": None if sd is None else z * sd, "power": float(power),
            "n_units": units, "disagreement": float(disagreement), "refusals": refusals}
