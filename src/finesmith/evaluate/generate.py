"""Batched greedy generation with left padding and the KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from finesmith.core.templates import stop_token_ids
from finesmith.data.tokenize import prompt_ids

__all__ = ["eval_progress", "generate", "generate_batch", "generate_batched", "stop_token_ids"]


def eval_progress() -> Progress:
    """A progress bar for evaluation passes (cleared when done, so results stay readable)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=True)


def generate(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]],
             max_new_tokens: int = 32, batch_size: int = 16,
             tools: Sequence[Sequence[dict[str, Any]] | None] | None = None,
             groups: Sequence[Any] | None = None) -> list[str]:
    """Greedy answers for each conversation (rendered with the generation prompt).

    Runs on `finesmith.evaluate.engine` (shared prefixes computed once, the KV cache, finished
    rows leaving the batch); `groups` names prompts that share a prefix. Models the engine
    cannot run use `generate_batched`.
    """
    from finesmith.evaluate.engine import answer_and_score

    return answer_and_score(model, tokenizer, conversations, None, max_new_tokens, batch_size, tools, groups,
                            description="generating")[0]


@torch.no_grad()
def generate_batched(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]],
                     max_new_tokens: int = 32, batch_size: int = 16,
                     tools: Sequence[Sequence[dict[str, Any]] | None] | None = None) -> list[str]:
    """Greedy answers with `model.generate`, one left-padded batch at a time.

    `tools`, when given, holds each conversation's function schemas (or None), rendered into
    its prompt by the chat template. Prompts are sorted by length so each batch pads little;
    padding goes on the left and is masked by the attention mask (pad may equal EOS, so
    never mask by id).
    """
    model.eval()
    tools = tools if tools is not None else [None] * len(conversations)
    encoded = [prompt_ids(tokenizer, conv, conv_tools) for conv, conv_tools in zip(conversations, tools, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    stops = stop_token_ids(tokenizer)
    with eval_progress() as progress:
        task = progress.add_task("generating", total=len(order))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = generate_batch(model, tokenizer, [encoded[i] for i in index], stops, max_new_tokens)
            for i, answer in zip(index, batch):
                answers[i] = answer
            progress.advance(task, len(index))
    return answers


def generate_batch(model: Any, tokenizer: Any, encoded: list[list[int]], stops: list[int],
                   max_new_tokens: int) -> list[str]:
    """Greedy answers for one batch of token prompts, left-padded to a common width."""
    device = next(model.parameters()).device
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, prompt in enumerate(encoded):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None)
    return [tokenizer.decode(out[row, width:], skip_special_tokens=True).strip() for row in range(len(encoded))]
