"""Confidence intervals, the paired test and calibration against hand-computed values."""

from __future__ import annotations

import pytest

from finesmith.evaluate.metrics import classification_metrics
from finesmith.evaluate.stats import (expected_calibration_error, label_confidences, mcnemar_exact, paired_difference,
                                      verdict, wilson_interval)


@pytest.mark.parametrize("k, n, low, high", [
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_newcombes_published_table(k, n, low, high):
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-4)


def test_mcnemar_exact_is_the_binomial_tail_of_the_discordant_pairs():
    # 5 vs 1 discordant: P(X <= 1 | n=6, 1/2) = (1 + 6) / 64, doubled
    assert mcnemar_exact(5, 1) == pytest.approx(14 / 64)
    assert mcnemar_exact(1, 5) == pytest.approx(14 / 64)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)


def test_paired_interval_by_hand():
    """20 examples: both right 10, only A 5, only B 1, neither 4.

    p1 = .75, p2 = .55; Wilson(15/20) = [.53128, .88813], Wilson(11/20) = [.34208, .74181];
    phi = (10·4 − 5·1) / sqrt(15·5·11·9) = .40618;
    lower = .2 − sqrt(.21872² − 2·phi·.21872·.19181 + .19181²) = −.02483;
    upper = .2 + sqrt(.13813² − 2·phi·.13813·.20792 + .20792²) = .39743.
    """
    a = [True] * 15 + [False] * 5
    b = [True] * 10 + [False] * 5 + [True] + [False] * 4
    paired = paired_difference(a, b)
    assert paired["difference"] == pytest.approx(0.2)
    assert paired["ci"] == pytest.approx([-0.02483, 0.39743], abs=2e-5)
    assert (paired["only_a"], paired["only_b"]) == (5, 1)
    assert paired["p_value"] == pytest.approx(14 / 64)
    words = verdict("fine-tuned", "4-shot", paired)
    assert "cannot be told apart" in words and "+20.0 points" in words


def test_verdict_names_the_winner_when_the_test_rejects():
    a = [True] * 30 + [False] * 10
    b = [False] * 20 + [True] * 10 + [False] * 10
    paired = paired_difference(a, b)  # 20 only A, 0 only B
    assert paired["p_value"] == pytest.approx(2 / 2 ** 20)
    assert verdict("fine-tuned", "base", paired).startswith("fine-tuned beats base by 50.0 points")
    assert verdict("base", "fine-tuned", paired_difference(b, a)).startswith("fine-tuned beats base by 50.0 points")


def test_expected_calibration_error_by_hand():
    # bin (0.5, 0.6]: confidences .55, .55, accuracy 1/2 -> |.5 - .55| · 2/4
    # bin (0.9, 1.0]: confidences .95, .95, accuracy 2/2 -> |1 - .95| · 2/4
    result = expected_calibration_error([0.55, 0.55, 0.95, 0.95], [True, False, True, True])
    assert result["ece"] == pytest.approx(0.05 * 0.5 + 0.05 * 0.5)
    assert [b["n"] for b in result["bins"]] == [2, 2]
    # two labels with log-likelihoods log .8 and log .2 -> confidence .8, whatever the scale
    import math
    assert label_confidences([[math.log(0.8) - 3, math.log(0.2) - 3]]) == pytest.approx([0.8])


def test_classification_metrics_carry_intervals():
    refs = ["a"] * 6 + ["b"] * 4
    preds = ["a"] * 5 + ["b"] + ["b"] * 3 + ["a"]
    m = classification_metrics(refs, preds, ["a", "b"])
    assert m["accuracy"] == 0.8 and m["accuracy_ci"] == pytest.approx(list(wilson_interval(8, 10)))
    low, high = m["macro_f1_ci"]
    assert low <= m["macro_f1"] <= high and 0 <= low < high <= 1
    perfect = classification_metrics(refs, refs, ["a", "b"])
    assert perfect["macro_f1_ci"] == [1.0, 1.0]
