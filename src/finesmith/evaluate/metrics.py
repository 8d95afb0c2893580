"""Metrics over (reference, prediction) pairs: classification and open generation.

Classification compares normalised answers against a fixed label set; anything outside
the set counts as the extra class `OTHER` (it is always wrong, but it shows up in the
confusion matrix, where a reader can see how often the model left the format).
Generation metrics use well-kept libraries for ROUGE-L (`rouge-score`) and chrF
(`sacrebleu`) so the numbers are comparable with published ones.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from finesmith.evaluate.stats import BOOTSTRAP_RESAMPLES, mean_interval, percentile_interval, wilson_interval

OTHER = "(other)"


def normalise_answer(text: str) -> str:
    """First line, lower-cased, whitespace collapsed: what exact match compares."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return re.sub(r"\s+", " ", first).strip().lower()


def classification_metrics(references: Sequence[str], predictions: Sequence[str],
                           labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    Args:
        references: gold labels (already normalised, each one of `labels`).
        predictions: predicted answers (normalised); values outside `labels` become `OTHER`.
        labels: the label set, in the order used for the per-class table and the matrix.

    Returns:
        `{"accuracy", "macro_f1", "per_class": {label: {precision, recall, f1, support}},
        "confusion": {"labels": [...], "matrix": rows=reference, columns=prediction}}`.
        Macro-F1 averages over the true labels only; `OTHER` is a column, never a row.
        `accuracy_ci` (Wilson) and `macro_f1_ci` (bootstrap) are 95% intervals.
    """
    known = set(labels)
    predicted = [p if p in known else OTHER for p in predictions]
    columns = list(labels) + ([OTHER] if OTHER in predicted else [])
    index = {label: i for i, label in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in labels]
    for ref, pred in zip(references, predicted):
        matrix[index[ref]][index[pred]] += 1
    per_class = {}
    for i, label in enumerate(labels):
        true_pos = matrix[i][i]
        support = sum(matrix[i])
        predicted_count = sum(row[i] for row in matrix)
        precision = true_pos / predicted_count if predicted_count else 0.0
        recall = true_pos / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {"accuracy": correct / max(1, len(references)),
            "accuracy_ci": list(wilson_interval(correct, len(references))),
            "macro_f1": sum(c["f1"] for c in per_class.values()) / max(1, len(per_class)),
            "macro_f1_ci": list(macro_f1_interval([index[r] for r in references], [index[p] for p in predicted],
                                                  len(labels), len(columns))),
            "per_class": per_class, "confusion": {"labels": columns, "matrix": matrix}}


def macro_f1_interval(references: Sequence[int], predictions: Sequence[int], n_labels: int, n_columns: int,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of macro-F1 (label indices; predictions may use the
    extra `OTHER` column), vectorised over resamples."""
    import numpy as np

    n = len(references)
    if n == 0:
        return 0.0, 0.0
    refs, preds = np.asarray(references), np.asarray(predictions)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    codes = refs[idx] * n_columns + preds[idx] + (np.arange(resamples) * n_labels * n_columns)[:, None]
    counts = np.bincount(codes.ravel(), minlength=resamples * n_labels * n_columns)
    matrix = counts.reshape(resamples, n_labels, n_columns)
    true_pos = matrix[:, np.arange(n_labels), np.arange(n_labels)]
    support, predicted = matrix.sum(axis=2), matrix[:, :, :n_labels].sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros(true_pos.shape), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros(true_pos.shape), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(true_pos.shape), where=total > 0)
    return percentile_interval(f1.mean(axis=1))


def answer_tokens(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation removed, for token-level F1."""
    return re.findall(r"\w+", text.lower())


def token_f1(reference: str, prediction: str) -> float:
    """Harmonic mean of token precision and recall (bag of words, with multiplicity)."""
    ref, pred = answer_tokens(reference), answer_tokens(prediction)
    if not ref or not pred:
        return float(ref == pred)
    common = sum((Counter(ref) & Counter(pred)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of words, Porter-stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in zip(references, predictions)]
    return sum(scores) / max(1, len(scores))


def chrf(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Corpus-level chrF (character n-gram F-score, 0-100) as sacrebleu computes it."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(list(predictions), [list(references)]).score


def generation_metrics(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Exact match (normalised first line), mean token F1, ROUGE-L and chrF.

    Returns:
        `{"exact_match", "token_f1", "rouge_l", "chrf"}`; the first three in [0, 1], chrF in [0, 100];
        plus `exact_match_ci` (Wilson) and `token_f1_ci` (bootstrap), 95%.
    """
    n = max(1, len(references))
    exact = sum(normalise_answer(r) == normalise_answer(p) for r, p in zip(references, predictions))
    f1s = [token_f1(r, p) for r, p in zip(references, predictions)]
    return {"exact_match": exact / n, "exact_match_ci": list(wilson_interval(exact, len(references))),
            "token_f1": sum(f1s) / n, "token_f1_ci": list(mean_interval(f1s)),
            "rouge_l": rouge_l(references, predictions), "chrf": chrf(references, predictions)}
