"""Paired bootstrap intervals (evaluation.bootstrap) against closed-form cases."""
import numpy as np
import pytest

from core.errors import WorkbenchError
from evaluation.bootstrap import items_needed, paired_delta_ci


def test_mean_change_matches_the_normal_interval():
    """Per-item changes with known mean and spread: the percentile interval is mean +- 1.96 sd / sqrt(n)."""
    rng = np.random.default_rng(1)
    n, mu, sd = 2000, 0.01, 0.05
    ref = rng.normal(0.9, 0.02, n)
    cand = ref + rng.normal(mu, sd, n)
    ci = paired_delta_ci(cand, ref, n_boot=4000, seed=3)
    d = cand - ref
    half = 1.959964 * d.std(ddof=1) / np.sqrt(n)
    assert ci["delta"] == pytest.approx(d.mean())
    assert ci["low"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert ci["high"] == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_ratio_change_is_paired():
    """A shared per-item difficulty cancels: the candidate makes exactly one more edit on every 10th utterance,
    so the CER change is known and its interval narrow, however much the items differ from each other."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 60, 500).astype(float)
    ref_edits = rng.poisson(lengths * 0.08).astype(float)   # widely varying per-utterance error
    cand_edits = ref_edits + (np.arange(500) % 10 == 0)
    ci = paired_delta_ci(cand_edits, ref_edits, lengths, seed=0)
    assert ci["delta"] == pytest.approx(50 / lengths.sum())
    d = cand_edits - ref_edits  # the delta method's closed form of the ratio's standard error
    se = np.std(d - ci["delta"] * lengths, ddof=1) / (lengths.mean() * np.sqrt(len(d)))
    assert (ci["high"] - ci["low"]) / 2 == pytest.approx(1.959964 * se, rel=0.15)
    unpaired = np.sqrt(np.var(ref_edits) + np.var(cand_edits)) / (lengths.mean() * np.sqrt(len(d)))
    assert se < unpaired / 5  # what pairing buys: the per-utterance difficulty both models share cancels


def test_identical_models_give_a_zero_interval_and_the_seed_reproduces():
    x = np.arange(10.0)
    assert paired_delta_ci(x, x, seed=5) == paired_delta_ci(x, x, seed=5)
    ci = paired_delta_ci(x, x)
    assert ci["delta"] == ci["low"] == ci["high"] == 0.0


def test_items_needed_follows_one_over_root_n():
    rng = np.random.default_rng(2)
    ref = rng.normal(0, 1, 400)
    cand = ref + rng.normal(0, 0.1, 400)
    n1, n2 = items_needed(cand, ref, None, 0.01), items_needed(cand, ref, None, 0.005)
    assert n1 == pytest.approx((1.96 * 0.1 / 0.01) ** 2, rel=0.2)
    assert n2 == pytest.approx(4 * n1, rel=0.02)


@pytest.mark.parametrize("args,match", [(([1.0], [1.0]), "equal-length"), (([1.0, 2.0], [1.0]), "equal-length"),
                                        (([1.0, np.nan], [1.0, 2.0]), "finite")])
def test_bad_inputs_are_one_line(args, match):
    with pytest.raises(WorkbenchError, match=match):
        paired_delta_ci(*args)
