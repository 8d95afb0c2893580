"""How well a tokenizer fits a domain, and adding domain terms as new tokens.

Fragmentation is measured as tokens per whitespace word, on the domain corpus and on the
shipped general-English sample, so the two numbers differ only by vocabulary fit. Candidate
terms are frequent words of the corpus that the tokenizer splits into several pieces and
that the general sample does not use; the saving of adding them is measured, not guessed,
by re-tokenizing the corpus with the terms added.

New tokens are added in their in-sentence form (with the leading space a byte-level BPE
attaches to a word), so ` kubelet` inside running text becomes one token.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch

from finesmith.errors import FinesmithError

TERM = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:[-.][A-Za-z0-9_]+)*")


def general_english_text() -> str:
    """The shipped general-English sample (prose written for this project)."""
    return resources.files("finesmith").joinpath("resources", "general_english.txt").read_text(encoding="utf-8")


@dataclass
class TermInfo:
    """One candidate domain term: occurrences, pieces it is split into, tokens saved if added."""

    term: str
    count: int
    pieces: list[str]
    saving: int  # (pieces - 1) x count


@dataclass
class VocabReport:
    """Tokenizer fit on a domain corpus versus general English, with candidate new tokens."""

    domain_words: int
    domain_tokens: int
    general_words: int
    general_tokens: int
    fragmented: list[TermInfo] = field(default_factory=list)
    added: int = 0  # terms added for the measured estimate
    tokens_with_added: int = 0  # corpus tokens once those terms are single tokens

    @property
    def domain_tokens_per_word(self) -> float:
        return self.domain_tokens / max(1, self.domain_words)

    @property
    def general_tokens_per_word(self) -> float:
        return self.general_tokens / max(1, self.general_words)

    @property
    def saved_fraction(self) -> float:
        return 1 - self.tokens_with_added / max(1, self.domain_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "domain_tokens_per_word": round(self.domain_tokens_per_word, 4),
                "general_tokens_per_word": round(self.general_tokens_per_word, 4),
                "saved_fraction": round(self.saved_fraction, 4)}


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> int:
    """Tokens of the texts without special tokens."""
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]) if texts else 0


def term_pieces(tokenizer: Any, term: str) -> list[str]:
    """How the tokenizer splits `term` inside a sentence (preceded by a space)."""
    return tokenizer.tokenize(" " + term)


def candidate_terms(tokenizer: Any, texts: Sequence[str], general: str, min_count: int = 3,
                    min_pieces: int = 3) -> list[TermInfo]:
    """Frequent corpus words split into `min_pieces`+ tokens and absent from general text, best saving first."""
    general_words = {w.lower() for w in TERM.findall(general)}
    counts = Counter(w for text in texts for w in TERM.findall(text))
    out = []
    for term, count in counts.items():
        if count < min_count or term.lower() in general_words:
            continue
        pieces = term_pieces(tokenizer, term)
        if len(pieces) >= min_pieces:
            out.append(TermInfo(term, count, pieces, (len(pieces) - 1) * count))
    return sorted(out, key=lambda t: (-t.saving, t.term))


def vocab_report(tokenizer: Any, texts: Sequence[str], top: int = 20, general: str | None = None) -> VocabReport:
    """Tokens per word on `texts` versus general English; the `top` most fragmented frequent terms.

    Args:
        tokenizer: the model's tokenizer (left unchanged).
        texts: the domain documents.
        top: how many candidate terms to list and to add for the measured saving.
        general: general-English text to compare with (default: the shipped sample).
    Returns:
        A VocabReport; `tokens_with_added` is the corpus re-tokenized with the listed terms added.
    """
    if not texts:
        raise FinesmithError("the corpus is empty; nothing to measure")
    general = general_english_text() if general is None else general
    report = VocabReport(sum(len(t.split()) for t in texts), count_tokens(tokenizer, texts),
                         len(general.split()), count_tokens(tokenizer, [general]))
    report.fragmented = candidate_terms(tokenizer, texts, general)[:top]
    extended = copy.deepcopy(tokenizer)
    add_terms_to_tokenizer(extended, [t.term for t in report.fragmented])
    report.added = len(report.fragmented)
    report.tokens_with_added = count_tokens(extended, texts)
    return report


def add_terms_to_tokenizer(tokenizer: Any, terms: Sequence[str]) -> list[str]:
    """Add each term (in its in-sentence form) as one token; returns the token strings added."""
    from tokenizers import AddedToken

    tokens = [" " + term for term in terms if len(term_pieces(tokenizer, term)) > 1]
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in tokens])
    return tokens


def add_domain_tokens(model: Any, tokenizer: Any, terms: Sequence[str]) -> dict[str, list[int]]:
    """Add terms as tokens and initialise each new embedding row as the mean of its former pieces.

    The mean of the pieces is a point the model already reads as (roughly) this word, so
    training starts from a sensible place instead of a random vector the model has never seen.
    Input embeddings are initialised, and output embeddings too when they are not tied.

    Args:
        model: a causal LM (resized in place).
        tokenizer: its tokenizer (extended in place).
        terms: the words to add; ones that already are a single token are skipped.
    Returns:
        New token string -> the ids of the pieces it replaced.
    """
    pieces = {" " + t: tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in terms}
    added = add_terms_to_tokenizer(tokenizer, terms)
    if not added:
        return {}
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    inputs = model.get_input_embeddings().weight
    outputs = model.get_output_embeddings()
    untied = outputs is not None and outputs.weight.data_ptr() != inputs.data_ptr()
    with torch.no_grad():
        for token in added:
            new_id = tokenizer.convert_tokens_to_ids(token)
            inputs[new_id] = inputs[pieces[token]].mean(dim=0)
            if untied:
                outputs.weight[new_id] = outputs.weight[pieces[token]].mean(dim=0)
    return {token: pieces[token] for token in added}


def format_report(report: VocabReport) -> str:
    """The report as a few lines of text for the terminal."""
    ratio = report.domain_tokens_per_word / max(1e-9, report.general_tokens_per_word)
    lines = [f"domain corpus: {report.domain_words:,} words, {report.domain_tokens:,} tokens, "
             f"{report.domain_tokens_per_word:.3f} tokens/word",
             f"general English sample: {report.general_words:,} words, {report.general_tokens:,} tokens, "
             f"{report.general_tokens_per_word:.3f} tokens/word",
             f"the domain text needs {ratio:.2f}x the tokens per word of general English"]
    if report.fragmented:
        lines.append("most fragmented frequent domain terms (count × pieces → tokens saved if added):")
        lines += [f"  {t.term:<28} {t.count:>5} × {len(t.pieces)} → {t.saving:>6}   {' '.join(t.pieces)}"
                  for t in report.fragmented]
        lines.append(f"adding these {report.added} terms as tokens: {report.domain_tokens:,} → "
                     f"{report.tokens_with_added:,} tokens ({100 * report.saved_fraction:.1f}% fewer); "
                     f"use `add_tokens: {{auto: {report.added}}}` in a cpt stage")
    else:
        lines.append("no frequent domain term is split into 3 or more pieces; adding tokens would not help")
    return "\n".join(lines)


def corpus_vocab_report(corpus: str, model: str, top: int = 20) -> VocabReport:
    """`finesmith data vocab`: ingest `corpus` (cleaned and deduplicated, not split) and report on it.

    Args:
        corpus: a folder of documents or one file (see `finesmith.domain.ingest`).
        model: model spec whose tokenizer is measured.
        top: candidate terms to list.
    Returns:
        The VocabReport.
    """
    from finesmith.domain.ingest import ingest_corpus
    from finesmith.model.load import load_tokenizer

    if top < 1:
        raise FinesmithError(f"--top must be at least 1, got {top}")
    documents = ingest_corpus(corpus, eval_fraction=0).train
    return vocab_report(load_tokenizer(model), [d.text for d in documents], top)
