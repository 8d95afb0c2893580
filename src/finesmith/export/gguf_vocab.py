"""A Hugging Face tokenizer as llama.cpp's tokenizer metadata (`tokenizer.ggml.*`).

llama.cpp re-implements two tokenizer shapes that the families finesmith exports use:

- **byte-level BPE** (`gpt2`: GPT-2, Llama 3, Qwen, OLMo 2, SmolLM): the vocabulary spelled in
  GPT-2's byte alphabet, the merges, and a *pre-tokenizer name* (`tokenizer.ggml.pre`) that
  picks the regular expression llama.cpp splits text with before merging;
- **SentencePiece-style BPE** (`llama`: Llama 2, Mistral 7B, Gemma, Phi-3): pieces spelled with
  `▁` for a space, a score per piece (llama.cpp merges the adjacent pair whose joined piece
  scores highest), `<0xNN>` byte pieces for characters outside the vocabulary, and whether a
  space is put before the text (`add_space_prefix`).

The pre-tokenizer name is read from the tokenizer's own definition (its split expression and
its `ignore_merges` flag) against the few llama.cpp implements; a tokenizer that matches none
is refused rather than written with a split that would tokenize differently. SentencePiece
scores are rebuilt from the merges: a piece scores minus the rank of the first merge that
makes it, so llama.cpp merges in the order the run's tokenizer does.

Merges go through gguf-py's `SpecialVocab` (llama.cpp's own reader of a tokenizer folder,
which knows how a merge containing a space must be spelled). Special ids are the tokenizer's;
whether BOS and EOS are added is measured on the tokenizer itself, and every token the run
stops at (end-of-turn markers, the generation config's EOS ids) takes the EOS, EOT or EOM
place, which llama.cpp all treats as end of generation.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

from finesmith.core.templates import END_OF_TURN_TOKENS
from finesmith.data.tokenize import bos_to_prepend
from finesmith.errors import FinesmithError

WAY_OUT = "export with --format hf instead"

# The split expressions of the byte-level tokenizers llama.cpp implements, as tokenizer.json
# spells them, with llama.cpp's name for each and whether it looks a whole word up before
# merging (`ignore_merges`: Llama 3 does, Qwen 2 does not). llama.cpp keeps its own copy of
# each expression and selects it by this name.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = "gpt-2 byte-level expression"      # ByteLevel(use_regex=True) splits with GPT-2's own
DIGITS = "single digits"                          # Digits(individual_digits=True)
PRE_TOKENIZERS = {
    # (splits before the byte mapping, ignore_merges): llama.cpp's name
    ((GPT2_SPLIT,), False): "gpt-2",
    ((DIGITS, GPT2_SPLIT), False): "smollm",
    ((LLAMA3_SPLIT,), True): "llama-bpe",
    ((LLAMA3_SPLIT,), False): "dbrx",
    ((QWEN2_SPLIT,), False): "qwen2",
    ((TEKKEN_SPLIT,), True): "tekken",
}


@dataclass
class Vocab:
    """Everything `write_vocab` puts under `tokenizer.*`."""

    model: str                     # "gpt2" or "llama"
    pre: str                       # llama.cpp pre-tokenizer name ("default" for SentencePiece)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)   # bos, eos, unk, pad, eot, eom, ...
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def backend_spec(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's own definition (tokenizer.json), or a refusal for a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FinesmithError(f"GGUF export needs a fast (tokenizers) tokenizer; this one is "
                             f"{type(tokenizer).__name__}; {WAY_OUT}")
    return json.loads(backend.to_str())


def _flatten(part: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not part:
        return []
    if part.get("type") == "Sequence":
        inner = part.get("pretokenizers") or part.get("normalizers") or part.get("decoders") or []
        return [step for item in inner for step in _flatten(item)]
    return [part]


def byte_level_splits(spec: dict[str, Any]) -> tuple[str, ...] | None:
    """The split steps of a byte-level BPE pre-tokenizer, or None when it is not byte-level."""
    steps = _flatten(spec.get("pre_tokenizer"))
    if not steps or steps[-1].get("type") != "ByteLevel":
        return None
    splits: list[str] = []
    for step in steps[:-1]:
        kind = step.get("type")
        if kind == "Digits" and step.get("individual_digits"):
            splits.append(DIGITS)
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step.get("pattern", {})
            splits.append(pattern.get("Regex") or pattern.get("String") or "?")
        else:
            splits.append(json.dumps(step, sort_keys=True))
    if steps[-1].get("use_regex", True):
        splits.append(GPT2_SPLIT)
    return tuple(splits)


def is_sentencepiece(spec: dict[str, Any]) -> bool:
    """A BPE over `▁`-spelled text with byte fallback: what SentencePiece BPE converts to."""
    model = spec.get("model", {})
    steps = _flatten(spec.get("normalizer")) + _flatten(spec.get("pre_tokenizer"))
    spaces = any((s.get("type") == "Replace" and s.get("content") == "\u2581") or s.get("type") == "Metaspace"
                 for s in steps)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and spaces


def space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer writes `▁` before the text (Llama 2) or not (Gemma).

    llama.cpp's `add_space_prefix` puts a space before every text and after every special
    token, as a `Prepend("▁")` normalizer does. A `Metaspace` pre-tokenizer that prepends
    does so only where the text does not already start with a space (and, with
    `prepend_scheme: first`, not after special tokens), which llama.cpp cannot state.

    Raises:
        FinesmithError: for such a `Metaspace`.
    """
    steps = _flatten(spec.get("normalizer")) + _flatten(spec.get("pre_tokenizer"))
    for step in steps:
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            if scheme != "never":
                raise FinesmithError(f"GGUF export: this SentencePiece tokenizer adds a leading space the way "
                                     f"llama.cpp cannot (Metaspace, prepend_scheme {scheme}); {WAY_OUT}")
    return False


def token_types(tokenizer: Any, by_id: dict[int, str], rows: int, byte_pieces: bool) -> list[int]:
    """llama.cpp's type of each row: control (special added), user-defined, byte, unknown, unused."""
    import re

    import gguf

    added = {index: t.special for index, t in tokenizer.added_tokens_decoder.items()}
    byte = re.compile(r"^<0x[0-9A-F]{2}>$")
    types = []
    for index in range(rows):
        if index not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            types.append(gguf.TokenType.CONTROL if added[index] else gguf.TokenType.USER_DEFINED)
        elif index == tokenizer.unk_token_id and byte_pieces:
            types.append(gguf.TokenType.UNKNOWN)
        elif byte_pieces and byte.match(by_id[index]):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return types


def merge_scores(spec: dict[str, Any], tokens: list[str]) -> list[float]:
    """SentencePiece scores that make llama.cpp merge in the order of the tokenizer's merges.

    llama.cpp repeatedly joins the adjacent pair whose joined piece has the highest score; a
    BPE joins the pair with the lowest merge rank. A piece scored minus the rank of the first
    merge that makes it gives the same order. Pieces no merge makes (characters, bytes,
    special tokens) are never looked up as a pair, so their score does not matter.
    """
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_rank.setdefault(left + right, rank)
    return [-float(first_rank[t]) if t in first_rank else 0.0 for t in tokens]


def bpe_merges(tokenizer: Any, rows: int) -> list[str]:
    """The merges as llama.cpp reads them, by gguf-py's `SpecialVocab` from the saved tokenizer
    (it spells a space inside a merge the way llama.cpp expects)."""
    import gguf

    reader_log = logging.getLogger("gguf.vocab")  # its notes on post-processor shapes are not ours to act on
    level = reader_log.level
    reader_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="finesmith-vocab-") as folder:
            tokenizer.save_pretrained(folder)
            return gguf.SpecialVocab(folder, load_merges=True, n_vocab=rows).merges
    finally:
        reader_log.setLevel(level)


def model_stop_ids(tokenizer: Any, generation_eos: Any = None) -> list[int]:
    """Every token the fine-tuned model stops at: EOS, the end-of-turn markers, and the
    `eos_token_id`s of its generation config."""
    from finesmith.core.templates import stop_token_ids as template_stops

    ids = set(template_stops(tokenizer))
    extra = generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos]
    ids.update(int(i) for i in extra if i is not None)
    return sorted(ids)


def end_markers(tokenizer: Any, stops: list[int]) -> dict[str, int]:
    """`eot`/`eom` ids for the stop tokens other than EOS, end-of-turn markers first.

    llama.cpp stops at EOS, EOT and EOM, and at a few marker spellings it recognises by
    itself, finesmith's end-of-turn markers among them; the file has no list of stop tokens.
    So EOT is the first end-of-turn marker, and EOM the first stop that is not one (Phi-3.5
    also stops at `<|assistant|>`), where llama.cpp would not know it otherwise.
    """
    eos = tokenizer.eos_token_id
    order = {t: i for i, t in enumerate(END_OF_TURN_TOKENS)}
    others = sorted((i for i in stops if i != eos),
                    key=lambda i: (order.get(tokenizer.convert_ids_to_tokens(i), len(order)), i))
    if not others:
        return {}
    rest = others[1:]
    unnamed = [i for i in rest if tokenizer.convert_ids_to_tokens(i) not in order]
    return {"eot": others[0]} | ({"eom": (unnamed or rest)[0]} if rest else {})


# llama.cpp strips the whitespace after every special token (but these) of a model whose
# `general.name` contains "phi-3" or "phi3", as Phi-3's tokenizer does (`rstrip` on its
# markers); the file has no per-token setting for it.
NOT_STRIPPED = ("<unk>", "<s>", "<|endoftext|>")
PHI3_NAME = re.compile(r"phi(-?)3", re.IGNORECASE)


def general_name(name: str, tokenizer: Any) -> str:
    """`name`, adjusted so llama.cpp strips whitespace after special tokens exactly when the
    run's tokenizer does: marked as Phi-3 when it strips, and a "phi3" spelled apart when not."""
    strips = any(t.rstrip for t in tokenizer.added_tokens_decoder.values() if t.special and t.content not in NOT_STRIPPED)
    if strips and not PHI3_NAME.search(name):
        return f"{name} (phi-3 tokenizer)"
    if not strips:
        return PHI3_NAME.sub(lambda m: f"phi{m.group(1)}_3", name)
    return name


def appends_eos(tokenizer: Any) -> bool:
    """True when the tokenizer ends every encoded text with EOS by itself."""
    eos = tokenizer.eos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return eos is not None and bool(probe) and probe[-1] == eos


def build_vocab(tokenizer: Any, rows: int, stops: list[int]) -> Vocab:
    """The tokenizer as llama.cpp metadata for a model with `rows` embedding rows.

    Args:
        tokenizer: the run's fast tokenizer (chat template included).
        rows: embedding rows; rows past the vocabulary become unused `[PADn]` tokens.
        stops: token ids generation must stop at (see `model_stop_ids`).

    Raises:
        FinesmithError: the tokenizer is of a shape llama.cpp would tokenize differently, or
            has more tokens than the model has embeddings.
    """
    spec = backend_spec(tokenizer)
    vocab = tokenizer.get_vocab()
    if len(vocab) > rows:
        raise FinesmithError(f"tokenizer has {len(vocab)} tokens but the model only {rows} embeddings; "
                             "the run's tokenizer does not match its model")
    by_id = {index: token for token, index in vocab.items()}
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(rows)]
    model = spec.get("model", {})
    splits = byte_level_splits(spec)
    if model.get("type") == "BPE" and splits is not None:
        pre = PRE_TOKENIZERS.get((splits, bool(model.get("ignore_merges"))))
        if pre is None:
            raise FinesmithError("GGUF export: llama.cpp has no pre-tokenizer that splits text as this tokenizer "
                                 f"does ({' + '.join(s[:40] for s in splits)}); {WAY_OUT}")
        out = Vocab("gpt2", pre, tokens, token_types(tokenizer, by_id, rows, byte_pieces=False))
        out.merges = bpe_merges(tokenizer, rows)
    elif is_sentencepiece(spec):
        out = Vocab("llama", "default", tokens, token_types(tokenizer, by_id, rows, byte_pieces=True),
                    scores=merge_scores(spec, tokens), add_space_prefix=space_prefix(spec))
    else:
        raise FinesmithError(f"GGUF export supports byte-level BPE and SentencePiece BPE tokenizers; this one "
                             f"is {model.get('type')} with pre-tokenizer "
                             f"{(spec.get('pre_tokenizer') or {}).get('type')}; {WAY_OUT}")
    out.special_ids = {key: getattr(tokenizer, f"{key}_token_id") for key in ("bos", "eos", "unk", "pad")
                       if getattr(tokenizer, f"{key}_token_id", None) is not None}
    out.special_ids.update(end_markers(tokenizer, stops))
    out.add_bos = bos_to_prepend(tokenizer) is not None
    out.add_eos = appends_eos(tokenizer)
    out.chat_template = tokenizer.chat_template
    return out


def write_vocab(writer: Any, vocab: Vocab) -> None:
    """Put `vocab` into a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for key, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
