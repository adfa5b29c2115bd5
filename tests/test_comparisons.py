"""The study table's statistics (gaincell.comparisons): paired SEs over sequences and the verdicts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gaincell import comparisons, study


def test_paired_se_is_the_std_of_differences_over_root_n():
    a = np.array([2.0, 2.4, 1.9, 2.2, 2.1])
    b = a - np.array([0.01, 0.03, -0.01, 0.02, 0.0])
    p = comparisons.paired(a, b)
    d = a - b
    assert p["mean"] == pytest.approx(d.mean(), abs=1e-15)
    assert p["se"] == pytest.approx(math.sqrt(((d - d.mean()) ** 2).sum() / 4 / 5), rel=1e-12)
    with pytest.raises(ValueError, match="two equal-length"):
        comparisons.paired([1.0], [2.0])


@pytest.mark.parametrize("diff,se,verdict", [(0.05, 0.01, "holds"), (-0.05, 0.01, "reversed"),
                                              (0.015, 0.01, "not resolved"), (0.02, 0.01, "not resolved")])
def test_orderings_resolve_only_beyond_two_se(diff, se, verdict):
    assert comparisons.judge_ordering(diff, se, 2.0) == verdict


@pytest.mark.parametrize("diff,se,verdict", [(0.005, 0.002, "equivalent"), (0.05, 0.005, "different"),
                                              (0.015, 0.005, "undetermined"), (-0.005, 0.002, "equivalent")])
def test_equivalence_needs_the_whole_interval_inside_the_margin(diff, se, verdict):
    assert comparisons.judge_equivalence(diff, se, 2.0, 0.02) == verdict


def test_claim_rows_on_synthetic_losses():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.2, 400)
    shift = {"softmax": 0.0, "softmax_long": -0.004, "linear_hw": 0.003, "nonlinear_mapped": 0.10,
             "nonlinear_adapted": 0.05, "nonlinear_finetuned": 0.02}
    losses = {run: base + s + rng.normal(0, 0.01, 400) for run, s in shift.items()}
    own = [c for c in study.CLAIMS if "," not in c.name]  # the profile's own cell, first seed
    rows = {r["claim"]: r for r in comparisons.claim_rows(losses, 2.0, 0.02, own, target_se=0.001)}
    assert set(rows) == {c.name for c in own}
    assert rows["4 worse than 5"]["verdict"] == "holds"
    assert rows["5 worse than 3"]["verdict"] == "holds"
    assert rows["6 better than 5"]["verdict"] == "holds"
    assert rows["3 close to 1"]["verdict"] == "equivalent"
    assert rows["4 worse than 5"]["difference"] == pytest.approx(0.05, abs=3 * rows["4 worse than 5"]["se"])
    assert rows["4 worse than 5"]["se"] == pytest.approx(0.01 * math.sqrt(2) / math.sqrt(400), rel=0.15)
    # SE ~ 0.01 sqrt(2) / 20 = 0.0007 for every pair here: all within a 0.001 target
    assert all(r["se_within_target"] == (r["se"] <= 0.001) for r in rows.values())
    assert all(r["se_within_target"] for r in rows.values())


def test_seed_shift_pairs_each_seed2_claim_with_its_first_seed_twin():
    claims = [{"claim": "3 close to 1", "difference": 0.048}, {"claim": "3 close to 1, seed 2", "difference": 0.041},
              {"claim": "5 worse than 3", "difference": 0.40}, {"claim": "6 better than 5", "difference": 0.7}]
    assert comparisons.seed_shift(claims) == {"3 close to 1": pytest.approx(-0.007, abs=1e-15)}
    assert comparisons.seed_shift(claims[2:]) == {}
