"""Tokens and the supervised-token mask, produced together in one place.

The conversation is rendered and its trained character spans located by
`finesmith.data.template` (one rendering of the whole conversation, for any chat template);
here the text is tokenized once and each token is trained when it starts inside a span.
Training, `data check`, evaluation and inference all call these functions, so they always
see the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from finesmith.data.formats import AnyExample, Example, FeedbackExample, PreferenceExample, TextExample
from finesmith.data.template import TEMPLATE_FIELDS, assistant_spans, render
from finesmith.errors import FinesmithError


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids with a parallel mask: True where the token is trained (predicted)."""

    input_ids: tuple[int, ...]
    supervised: tuple[bool, ...]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


PROBE_TOOL = {"type": "function", "function": {"name": "finesmith_probe_tool", "description": "probe",
                                               "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
PROBE_CALL = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"id": "probe0001", "type": "function",
                   "function": {"name": "finesmith_probe_call", "arguments": {"q": "finesmith_probe_argument"}}}]},
              {"role": "tool", "tool_call_id": "probe0001", "content": "finesmith_probe_result"}]
PROBE_WORDS = ("finesmith_probe_tool", "finesmith_probe_call", "finesmith_probe_argument", "finesmith_probe_result")


def uses_tools(example: Example) -> bool:
    """True when the conversation lists tools, calls one, or holds a tool result."""
    return bool(example.tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in example.messages)


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template writes out tool schemas, calls (name and arguments) and results.

    Found by rendering a probe conversation (the answer is cached on the tokenizer).
    """
    template = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_finesmith_tool_support", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    try:
        text = render(tokenizer, PROBE_CALL, add_generation_prompt=True, tools=[PROBE_TOOL])
        supported = all(word in text for word in PROBE_WORDS)
    except FinesmithError:
        supported = False
    tokenizer._finesmith_tool_support = (template, supported)
    return supported


def require_tool_support(tokenizer: Any, where: str) -> None:
    """Refuse (one line naming `where`) an example with tools when the template would drop them."""
    if not template_renders_tools(tokenizer):
        raise FinesmithError(
            f"{where}: this example uses tools, but the model's chat template does not render tools, tool calls "
            "and tool results (they would be silently dropped); set tool_format: hermes to render them as text "
            "in the Hermes style, or use a model whose template supports tools")


def text_tokens(tokenizer: Any, text: str) -> tuple[list[int], list[bool]]:
    """Language-modelling tokens for plain text: BOS (when the model uses one), text, EOS; all trained."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = bos_to_prepend(tokenizer)
    if bos is not None:
        ids.insert(0, bos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, [bos is None or index > 0 for index in range(len(ids))]


def tokens_and_mask(tokenizer: Any, messages: list[dict[str, Any]],
                    tools: Sequence[dict[str, Any]] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and the supervised mask, with exactly one BOS."""
    text, spans = assistant_spans(tokenizer, messages, tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    supervised = [any(start <= a < end for start, end in spans) for a, _ in encoded["offset_mapping"]]
    bos = bos_to_prepend(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        supervised.insert(0, False)
    return ids, supervised


def bos_to_prepend(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer adds one by itself (templates may already render it)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
               ) -> list[int]:
    """Token ids for a generation prompt (conversation + the assistant header)."""
    text = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = bos_to_prepend(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    split: int = 0  # plain-text documents cut into several max_length windows


PREFERENCE_NOT_TRAINABLE = (
    "preference pairs (prompt/chosen/rejected) and feedback rows train with a preference objective, not sft; "
    "set objective: dpo (or ipo, orpo, simpo; kto for feedback rows)")


def tokenize_examples(tokenizer: Any, examples: Iterable[AnyExample], max_length: int,
                      truncation: str = "truncate") -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize and mask examples, applying the over-length policy.

    `truncate` keeps the start of the example when that keeps trained tokens, otherwise
    keeps a window that ends with the last trained token (dropping the oldest context);
    `drop` skips over-long examples. Either way the numbers are counted in the stats.
    Plain-text examples are never truncated or dropped: a long document is split into
    consecutive `max_length` windows, so all of its text is trained.

    Raises:
        FinesmithError: for preference pairs, which this objective cannot train.
    """
    stats = TokenizeStats()
    out = []
    for example in examples:
        if isinstance(example, (PreferenceExample, FeedbackExample)):
            raise FinesmithError(f"{example.source}: {PREFERENCE_NOT_TRAINABLE}")
        if isinstance(example, TextExample):
            out += lm_windows(tokenizer, [(example.source, example.text)], max_length, stats)
            continue
        if uses_tools(example):
            require_tool_support(tokenizer, example.source)
        try:
            ids, mask = tokens_and_mask(tokenizer, list(example.messages), example.tools)
        except FinesmithError as exc:
            raise FinesmithError(f"{example.source}: {exc}") from None
        if len(ids) > max_length:
            if truncation == "drop":
                stats.dropped += 1
                continue
            ids, mask = truncate(ids, mask, max_length, bos_to_prepend(tokenizer) is not None or _starts_with_bos(tokenizer, ids))
            stats.truncated += 1
        _keep(out, stats, ids, mask, example.source)
    return out, stats


def lm_windows(tokenizer: Any, texts: Iterable[tuple[str, str]], max_length: int,
               stats: TokenizeStats | None = None) -> list[TokenizedExample]:
    """Plain texts as language-modelling windows, the one way training, evaluation and
    staged runs turn text into tokens.

    Each text is BOS (when the model uses one) + text + EOS with every token trained
    (`text_tokens`), cut into consecutive `max_length` windows (`text_windows`). A window
    with nothing to predict (no trained token after its first) is left out and counted as
    dropped.

    Args:
        tokenizer: the model's tokenizer.
        texts: `(source, text)` pairs; the source names where each window came from.
        max_length: tokens per window.
        stats: counts to add to (windows kept, texts split, windows dropped), if wanted.
    Returns:
        The windows, in the order of the texts.
    """
    stats = stats if stats is not None else TokenizeStats()
    bos = bos_to_prepend(tokenizer)
    out: list[TokenizedExample] = []
    for source, text in texts:
        windows = text_windows(*text_tokens(tokenizer, text), max_length, bos)
        stats.split += len(windows) > 1
        for ids, mask in windows:
            _keep(out, stats, ids, mask, source)
    return out


def _keep(out: list[TokenizedExample], stats: TokenizeStats, ids: list[int], mask: list[bool], source: str) -> None:
    if not any(mask[1:]):
        stats.dropped += 1  # nothing left to learn (e.g. every assistant turn has weight 0)
        return
    out.append(TokenizedExample(tuple(ids), tuple(mask), source))
    stats.examples += 1
    stats.tokens += len(ids)
    stats.supervised_tokens += sum(mask)


def text_windows(ids: list[int], mask: list[bool], max_length: int, bos: int | None
                 ) -> list[tuple[list[int], list[bool]]]:
    """Cut a language-modelling sequence into windows of at most `max_length` tokens.

    Every window after the first starts with a fresh (untrained) BOS when the model uses
    one, so each window looks like the start of a document to the model.
    """
    if len(ids) <= max_length:
        return [(ids, mask)]
    head = [bos] if bos is not None else []
    body, body_mask = (ids[1:], mask[1:]) if head else (ids, mask)
    step = max_length - len(head)
    return [(head + body[i:i + step], [False] * len(head) + body_mask[i:i + step])
            for i in range(0, len(body), step)]


def rendered_lengths(tokenizer: Any, examples: list[AnyExample], problems: list[str] | None = None) -> list[int]:
    """Token counts of examples as training renders them, in one batched tokenizer call.

    Conversations go through `assistant_spans`, exactly as training does (so a conversation
    training would refuse is refused here too), but are tokenized in one batch without
    offsets; the counts equal the lengths `tokens_and_mask` produces.

    Args:
        problems: when given, a conversation that cannot be rendered or masked is recorded
            here (`source: why`) and left out; otherwise the error is raised.
    """
    texts, extra = [], []
    bos = bos_to_prepend(tokenizer)
    for example in examples:
        if isinstance(example, TextExample):
            texts.append(example.text)
            extra.append((bos is not None) + (tokenizer.eos_token_id is not None))
            continue
        answer = example.completion if isinstance(example, FeedbackExample) else getattr(example, "chosen", "")
        messages = list(example.messages) if isinstance(example, Example) else (
            list(example.prompt) + [{"role": "assistant", "content": answer}])
        tools = example.tools if isinstance(example, Example) else None
        if isinstance(example, Example) and uses_tools(example):
            require_tool_support(tokenizer, example.source)
        try:
            texts.append(assistant_spans(tokenizer, messages, tools)[0] if isinstance(example, Example)
                         else render(tokenizer, messages, tools=tools))
        except FinesmithError as exc:
            if problems is None:
                raise FinesmithError(f"{example.source}: {exc}") from None
            problems.append(f"{example.source}: {exc}")
            continue
        extra.append(-1)  # -1: add a BOS only when the rendered text lacks one
    encoded = _batch_ids(tokenizer, texts) if texts else []
    return [len(ids) + (e if e >= 0 else int(bos is not None and (not ids or ids[0] != bos)))
            for ids, e in zip(encoded, extra)]


def _batch_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts; straight through the Rust backend (no offsets) when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in fast(texts, add_special_tokens=False)]


def _starts_with_bos(tokenizer: Any, ids: list[int]) -> bool:
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def truncate(ids: list[int], mask: list[bool], max_length: int, keep_bos: bool) -> tuple[list[int], list[bool]]:
    """Cut an over-long example to `max_length` tokens without losing every trained token."""
    if any(mask[1:max_length]):
        return ids[:max_length], mask[:max_length]
    last = max(i for i, m in enumerate(mask) if m) + 1
    if keep_bos:
        window = range(last - max_length + 1, last)
        return [ids[0]] + [ids[i] for i in window], [False] + [mask[i] for i in window]
    return ids[last - max_length:last], mask[last - max_length:last]
