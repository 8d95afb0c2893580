"""Greedy answers and label log-likelihoods for many prompts: the evaluation passes.

`answer_and_score` runs `finesmith.evaluate.engine` (one prefill per prompt, shared prefixes
once, bounded memory) when the model allows it, else one pass per purpose: batched
`model.generate` here and packed label tries (`finesmith.evaluate.loglik`). Imports go one
way: this module uses the engine and the log-likelihood module; neither uses this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from finesmith.core.templates import stop_token_ids
from finesmith.data import tokenize  # module attribute calls: tests may swap `prompt_ids`
from finesmith.evaluate.engine import Job, PromptEngine, continuation_trie, unsupported_reason
from finesmith.evaluate.loglik import answer_only, label_logprobs
from finesmith.evaluate.progress import eval_progress

__all__ = ["answer_and_score", "engine_jobs", "generate", "generate_batch", "generate_batched", "stop_token_ids"]


def generate(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]],
             max_new_tokens: int = 32, batch_size: int = 16,
             tools: Sequence[Sequence[dict[str, Any]] | None] | None = None,
             groups: Sequence[Any] | None = None, memory: int | None = None) -> list[str]:
    """Greedy answers for each conversation (rendered with the generation prompt).

    Runs on `finesmith.evaluate.engine` (shared prefixes computed once, the KV cache, finished
    rows leaving the batch); `groups` names prompts that share a prefix; `memory` bounds what
    the pass holds beyond the weights (bytes, None: auto). Models the engine cannot run use
    `generate_batched`.
    """
    return answer_and_score(model, tokenizer, conversations, None, max_new_tokens, batch_size, tools, groups,
                            description="generating", memory=memory)[0]


def answer_and_score(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict[str, Any]]],
                     candidates: Sequence[str] | None = None, max_new_tokens: int = 32, batch_size: int = 16,
                     tools: Sequence[Sequence[dict[str, Any]] | None] | None = None,
                     groups: Sequence[Any] | None = None, description: str = "evaluating",
                     memory: int | None = None) -> tuple[list[str] | None, list[list[float]] | None]:
    """Greedy answers (when `max_new_tokens` > 0) and candidate log-likelihoods (when
    `candidates` is given) for each conversation, each prompt computed once.

    Args:
        conversations: prompts, rendered with the generation prompt by the chat template.
        candidates: answer texts scored after every prompt (summed log-probability of their
            supervised tokens, end-of-turn included, exactly as training tokenizes them).
        tools: each conversation's function schemas (or None).
        groups: a key per conversation naming the prompts that share a prefix (e.g. their
            few-shot examples); prompts of a group are batched together.
        description: what the progress bar (or, in a log, the progress lines) calls the pass.
        memory: bytes the pass may hold beyond the weights (None: auto, see
            `finesmith.evaluate.budget`); the engine's batch and pool sizes follow from it.

    Returns:
        (answers or None, scores or None); `scores[i][c]` is candidate c after prompt i.
    Models the engine cannot run (virtual-token methods, sliding-window attention) take the
    one-pass-per-purpose path: batched `generate` and packed label tries.
    """
    tools = list(tools) if tools is not None else [None] * len(conversations)
    reason = unsupported_reason(model)
    if reason is not None:
        _say_fallback(reason)
        answers = (generate_batched(model, tokenizer, conversations, max_new_tokens, batch_size, tools)
                   if max_new_tokens > 0 else None)
        scores = label_logprobs(model, tokenizer, conversations, candidates, tools=tools) if candidates else None
        return answers, scores
    engine = PromptEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), batch_size, memory=memory)
    with eval_progress(description, len(conversations)) as progress:
        jobs, fallback = engine_jobs(tokenizer, conversations, candidates, tools, groups)
        outcomes = engine.run(jobs, max_new_tokens, len(candidates or ()), progress.advance)
    answers = ([tokenizer.decode(o.answer_ids, skip_special_tokens=True).strip() for o in outcomes]
               if max_new_tokens > 0 else None)
    scores = [o.scores for o in outcomes] if candidates else None
    if fallback:  # a template that merges the answer into the prompt's last token: score those one way
        redo = label_logprobs(model, tokenizer, [conversations[i] for i in fallback], candidates,
                              tools=[tools[i] for i in fallback])
        for i, row in zip(fallback, redo):
            scores[i] = row
    return answers, scores


def engine_jobs(tokenizer: Any, conversations: Sequence[Sequence[dict[str, Any]]], candidates: Sequence[str] | None,
                tools: Sequence[Sequence[dict[str, Any]] | None], groups: Sequence[Any] | None = None
                ) -> tuple[list[Job], list[int]]:
    """Each conversation as an engine job (prompt tokens, candidate trie, group), and the indices
    whose template merges the answer into the prompt's last token (no trie: scored one way)."""
    groups = list(groups) if groups is not None else [None] * len(conversations)
    jobs, fallback = [], []
    for i, (messages, conv_tools, group) in enumerate(zip(conversations, tools, groups, strict=True)):
        ids = tokenize.prompt_ids(tokenizer, list(messages), conv_tools)
        trie = None
        if candidates:
            rendered = [tokenize.tokens_and_mask(tokenizer, answer_only(messages, c), conv_tools) for c in candidates]
            trie = continuation_trie(ids, rendered)
            if trie is None:
                fallback.append(i)
        jobs.append(Job(ids, trie, group))
    return jobs, fallback


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
    encoded = [tokenize.prompt_ids(tokenizer, conv, conv_tools)
               for conv, conv_tools in zip(conversations, tools, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    stops = stop_token_ids(tokenizer)
    with eval_progress("generating", len(order)) as progress:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = generate_batch(model, tokenizer, [encoded[i] for i in index], stops, max_new_tokens)
            for i, answer in zip(index, batch):
                answers[i] = answer
            progress.advance(len(index))
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


_SAID: set[str] = set()


def _say_fallback(reason: str) -> None:
    """Say once per process why evaluation runs without the prefix-caching engine."""
    if reason in _SAID:
        return
    _SAID.add(reason)
    from finesmith.core.console import console

    console.print(f"note: evaluation runs without the prefix-caching engine because {reason}; answers and "
                  "scores come from batched generate and packed label tries (same results, slower)")
