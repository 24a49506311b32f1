"""The margin plan: how often an equally good candidate passes the non-inferiority rule."""
import numpy as np

from medmoco.margin import margin_plan


def _split(rng, patients=80, slices=5):
    pid = np.repeat(np.arange(patients), slices)
    labels = (rng.random((patients, 6)) < 0.35)[pid].astype(float)
    logits = 1.5 * labels - 1.0 + rng.normal(0, 1.0, (patients, 6))[pid] + rng.normal(0, 0.5, labels.shape)
    return 1 / (1 + np.exp(-logits)), labels, pid


def test_an_equal_candidate_passes_a_wide_margin_and_fails_a_zero_margin_as_the_interval_says():
    rng = np.random.default_rng(0)
    probs, labels, pid = _split(rng)
    wide = margin_plan(probs, labels, pid, margin=0.2, n_sim=30, replicates=150, seed=1)
    zero = margin_plan(probs, labels, pid, margin=0.0, n_sim=30, replicates=150, seed=1)
    assert wide["pass_rate"] == 1.0 and wide["n_units"] == 80
    assert zero["pass_rate"] <= 0.1  # lower bound >= 0 for an equal model: ~2.5% of the time
    # at the margin the normal approximation asks for 80% power, the simulated rate is near 80%
    planned = margin_plan(probs, labels, pid, margin=wide["margin_for_power"], n_sim=40, replicates=150, seed=2)
    assert 0.6 <= planned["pass_rate"] <= 0.97, planned
    assert planned["pass_rate_ci"][0] <= planned["pass_rate"] <= planned["pass_rate_ci"][1]
