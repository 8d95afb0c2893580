"""`text_similarity`: how close the rendered input is to the rendered reference, in [0, 1].

Metrics (`evaluation_metric`), each with a maintained library where one exists:

- `fuzzy_match`: the normalized Indel similarity of the two strings, as `rapidfuzz.fuzz.ratio`
  computes it (2 * longest common subsequence / total length), / 100. rapidfuzz is used when it is
  installed; otherwise the same number comes from a bit-parallel LCS (Hyyrö's algorithm, the one
  rapidfuzz uses), so the value is the same either way.
- `bleu`: sacrebleu's sentence BLEU (13a tokenizer, exponential smoothing) / 100.
- `gleu`: NLTK's sentence GLEU (Google BLEU) over whitespace tokens.
- `meteor`: NLTK's METEOR, which needs the WordNet corpus; refused at validation when the data
  is not installed (this server is offline: `python -m nltk.downloader wordnet omw-1.4`).
- `rouge_1` … `rouge_5`, `rouge_l`: rouge-score's F-measure (its tokenizer: lower-cased
  alphanumeric tokens, no stemming).
- `cosine`: the cosine similarity of the two texts' embeddings, from an embedding function the
  caller provides (`embed(texts) -> vectors`); refused at validation when there is none.

`pass_threshold` (optional) sets `passed`; the reward is the similarity either way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from finesmith.graders.result import GraderError, GradingFailure
from finesmith.graders.templates import check_template

METRICS = ("cosine", "fuzzy_match", "bleu", "gleu", "meteor",
           "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
Embed = Callable[[Sequence[str]], Sequence[Sequence[float]]]


def validate(grader: dict[str, Any], param: str, embed: Embed | None = None) -> dict[str, Any]:
    metric = grader.get("evaluation_metric")
    if metric not in METRICS:
        raise GraderError(f"{param}.evaluation_metric", f"must be one of {', '.join(METRICS)}, not {metric!r}")
    if metric == "meteor" and not wordnet_available():
        raise GraderError(f"{param}.evaluation_metric", "meteor needs NLTK's WordNet data, which this server does "
                          "not have (install it with `python -m nltk.downloader wordnet omw-1.4`); choose "
                          "another metric, e.g. bleu or rouge_l")
    if metric == "cosine" and embed is None:
        raise GraderError(f"{param}.evaluation_metric", "cosine needs an embedding model, and this server has none "
                          "configured; choose another metric, e.g. fuzzy_match or rouge_l")
    out = {"type": "text_similarity", "name": grader["name"],
           "input": check_template(grader.get("input"), f"{param}.input"),
           "reference": check_template(grader.get("reference"), f"{param}.reference"),
           "evaluation_metric": metric}
    threshold = grader.get("pass_threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise GraderError(f"{param}.pass_threshold", f"must be a number, not {threshold!r}")
        out["pass_threshold"] = float(threshold)
    return out


def similarity(metric: str, text: str, reference: str, embed: Embed | None = None) -> float:
    """The `metric` similarity of `text` to `reference`."""
    if metric == "fuzzy_match":
        return fuzzy_ratio(text, reference)
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(text, [reference]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        hypothesis, references = text.split(), [reference.split()]
        if not hypothesis or not references[0]:
            return float(hypothesis == references[0])
        return float(sentence_gleu(references, hypothesis))
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([reference.split()], text.split()))
    if metric.startswith("rouge_"):
        key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
        return float(_rouge(key).score(reference, text)[key].fmeasure)
    if metric == "cosine":
        if embed is None:
            raise GradingFailure("other_error", "cosine needs an embedding model and none is configured")
        vectors = embed([text, reference])
        return cosine(vectors[0], vectors[1])
    raise GradingFailure("other_error", f"unknown evaluation_metric {metric!r}")


@functools.lru_cache(maxsize=None)
def _rouge(key: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([key], use_stemmer=False)


@functools.lru_cache(maxsize=1)
def wordnet_available() -> bool:
    """Whether NLTK and its WordNet corpus can be loaded here (METEOR needs both)."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except Exception:  # noqa: BLE001 - LookupError (no data), ImportError (no nltk), a broken corpus
        return False
    return True


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    norm = math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b))
    return dot / norm if norm else 0.0


def fuzzy_ratio(a: str, b: str) -> float:
    """rapidfuzz's `fuzz.ratio(a, b) / 100`: 2 * LCS(a, b) / (len(a) + len(b)); 1.0 for two empty strings."""
    if not a and not b:
        return 1.0
    try:
        from rapidfuzz import fuzz
    except ImportError:
        return 2.0 * lcs_length(a, b) / (len(a) + len(b))
    return fuzz.ratio(a, b) / 100.0


def lcs_length(a: str, b: str) -> int:
    """The length of the longest common subsequence of `a` and `b` (bit-parallel, Hyyrö 2004)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(b):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(b)) - 1
    row = full
    for ch in a:
        matches = row & masks.get(ch, 0)
        row = ((row + matches) | (row - matches)) & full
    return len(b) - bin(row).count("1")
