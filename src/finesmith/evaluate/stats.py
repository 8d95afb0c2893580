"""How sure is a number? Confidence intervals, paired tests and calibration for eval results.

- **Accuracy-like shares** (accuracy, exact match, preference accuracy): the Wilson score
  interval, which stays inside [0, 1] and behaves at 0% and 100% and on small n.
- **Macro-F1 and mean token F1**: a percentile bootstrap over examples (seeded, 2,000
  resamples), since they have no closed form.
- **Two approaches on the same examples**: the difference in accuracy with Newcombe's
  hybrid-score interval for paired proportions (his method 10, built from the two Wilson
  intervals and the correlation of the paired outcomes), and McNemar's exact test on the
  examples where exactly one of them is right. The verdict says "beats" only when the test
  rejects "no difference" at 95% confidence.
- **Calibration** of the label log-likelihood: expected calibration error over 10 equal-width
  confidence bins (confidence: the top label's probability, normalised over the label set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n` ((0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile_interval(values: Any) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of bootstrap statistics (any 1-D array-like)."""
    import numpy as np

    ordered = np.sort(np.asarray(values, dtype=float))
    last = len(ordered) - 1
    return float(ordered[int(math.floor(0.025 * last))]), float(ordered[int(math.ceil(0.975 * last))])


def mean_interval(values: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
                  ) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of per-example values (e.g. token F1)."""
    import numpy as np

    if not values:
        return 0.0, 0.0
    data = np.asarray(values, dtype=float)
    return percentile_interval(data[np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))]
                               .mean(axis=1))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant outcomes as a fair binomial."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(a_correct: Sequence[bool], b_correct: Sequence[bool], z: float = Z95) -> dict[str, Any]:
    """Accuracy of A minus accuracy of B on the same examples, with Newcombe's paired interval
    and McNemar's exact test.

    Returns:
        `{"n", "a", "b", "difference", "ci": [low, high], "only_a", "only_b", "p_value"}` with
        accuracies and the difference as fractions.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError("paired results need the same examples")
    n = len(a_correct)
    both = sum(1 for x, y in zip(a_correct, b_correct) if x and y)
    only_a = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    only_b = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / max(1, n), (both + only_b) / max(1, n)
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    margins = [(both + only_a), (neither + only_b), (both + only_b), (neither + only_a)]
    denom = math.prod(margins)
    phi = (both * neither - only_a * only_b) / math.sqrt(denom) if denom > 0 else 0.0
    diff = p1 - p2
    lower = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"n": n, "a": p1, "b": p2, "difference": diff, "ci": [max(-1.0, lower), min(1.0, upper)],
            "only_a": only_a, "only_b": only_b, "p_value": mcnemar_exact(only_a, only_b)}


def verdict(name_a: str, name_b: str, paired: dict[str, Any], alpha: float = 0.05) -> str:
    """One sentence a non-statistician reads: who is better, by how much, and how sure."""
    diff = paired["difference"] * 100
    low, high = (x * 100 for x in paired["ci"])
    interval = f"95% CI [{low:+.1f}, {high:+.1f}] points"
    p = paired["p_value"]
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    detail = (f"on {paired['n']} examples, {paired['only_a']} only {name_a} got right and "
              f"{paired['only_b']} only {name_b}; McNemar exact test {p_text}")
    if p < alpha and diff > 0:
        return f"{name_a} beats {name_b} by {diff:.1f} points ({interval}): unlikely to be chance ({detail})."
    if p < alpha and diff < 0:
        return f"{name_b} beats {name_a} by {-diff:.1f} points ({interval}): unlikely to be chance ({detail})."
    return (f"{name_a} and {name_b} cannot be told apart at 95% confidence: the difference of {diff:+.1f} points "
            f"({interval}) could be chance ({detail}); more held-out examples would settle it.")


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
                               ) -> dict[str, Any]:
    """ECE over equal-width confidence bins: sum over bins of |accuracy - mean confidence|,
    weighted by the bin's share of examples. Returns the ECE, mean confidence and the bins."""
    n = len(confidences)
    table = []
    ece = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if (low < c <= high) or (b == 0 and c == 0)]
        if not members:
            continue
        accuracy = sum(bool(correct[i]) for i in members) / len(members)
        confidence = sum(confidences[i] for i in members) / len(members)
        ece += len(members) / n * abs(accuracy - confidence)
        table.append({"bin": [round(low, 2), round(high, 2)], "n": len(members), "accuracy": accuracy,
                      "confidence": confidence})
    return {"ece": ece, "mean_confidence": sum(confidences) / max(1, n), "bins": table}


def label_confidences(scores: Sequence[Sequence[float]]) -> list[float]:
    """Each example's top label probability, the log-likelihoods normalised over the label set."""
    out = []
    for row in scores:
        top = max(row)
        total = sum(math.exp(s - top) for s in row)
        out.append(1.0 / total)
    return out
