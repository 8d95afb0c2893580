"""Metrics on hand-computed examples."""

from __future__ import annotations

import pytest

from finesmith.evaluate.metrics import OTHER, classification_metrics, generation_metrics, token_f1
from finesmith.evaluate.tasks import infer_task, label_set


def test_classification_metrics_by_hand():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "zzz", "c"]
    m = classification_metrics(refs, preds, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2, R 2/3 -> F1 0.8; b: P 1/2, R 1/2 -> 0.5; c: P 1, R 1 -> 1
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert m["confusion"]["labels"] == ["a", "b", "c", OTHER]
    assert m["confusion"]["matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]


def test_a_class_never_predicted_has_zero_precision_not_an_error():
    m = classification_metrics(["a", "b"], ["a", "a"], ["a", "b"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)


def test_token_f1_by_hand():
    # prediction tokens: the cat sat (3); reference: the cat sat down (4); common 3
    assert token_f1("The cat sat down.", "the cat sat") == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "") == 1.0


def test_generation_metrics():
    m = generation_metrics(["Paris is the capital", "blue"], ["paris is the capital", "the sky is blue"])
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["token_f1"] == pytest.approx((1.0 + 2 * 0.25 * 1.0 / 1.25) / 2)
    # ROUGE-L: pair 1 identical (1.0); pair 2 LCS 1 word, P 1/4 R 1 -> 0.4
    assert m["rouge_l"] == pytest.approx((1.0 + 0.4) / 2)
    assert 0 < m["chrf"] < 100
    assert generation_metrics(["same text"], ["same text"])["chrf"] == pytest.approx(100.0)


def test_task_inference():
    assert infer_task(["billing / high", "account / low"] * 10) == "classification"
    assert infer_task([f"answer number {i}" for i in range(20)]) == "generation"
    labels, surface = label_set(["Yes", "yes", " Yes", "No"])
    assert labels == ["no", "yes"] and surface == ["No", "Yes"]
