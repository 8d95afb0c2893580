"""Label log-likelihood: how probable is each candidate answer, given the prompt?

For every prompt and candidate label the score is the summed log-probability of the
candidate's answer tokens *including its end-of-turn token* (so "billing" cannot win by
being a prefix of "billing / high"). The answer tokens are the supervised tokens of the
conversation prompt + candidate, exactly as training sees them.

Speed: the prompt is shared by all candidates, and candidates share their beginnings
("billing / low", "billing / high"), so each example becomes one token *trie*: the prompt
once, then the candidates' tokens merged by common prefix. Every token attends exactly to
its ancestors (its own path from the start), with position ids by depth. Several tries
are packed into one padding-free row with a block mask, and the LM head runs only at the
positions that predict an answer token. One forward pass scores a batch of examples
against all their labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finesmith.data.pairs import ancestor_mask as trie_mask
from finesmith.data.tokenize import tokens_and_mask
from finesmith.evaluate.progress import eval_progress


@dataclass
class TokenTrie:
    """One example's prompt and candidates as a token trie, ready to pack."""

    ids: list[int]
    positions: list[int]
    parents: list[int]  # index of the token each token follows (-1 for the first)
    # (index of the predicting token, target id, candidate index) per scored token
    targets: list[tuple[int, int, int]]


def answer_only(messages: Sequence[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
    """The prompt (earlier assistant turns not trained) followed by `answer` as the trained turn."""
    prompt = [{**{k: v for k, v in m.items() if k != "weight"}, **({"weight": 0} if m["role"] == "assistant" else {})}
              for m in messages]
    return prompt + [{"role": "assistant", "content": answer}]


def build_trie(tokenizer: Any, messages: Sequence[dict[str, Any]], candidates: Sequence[str],
               tools: Sequence[dict[str, Any]] | None = None) -> TokenTrie:
    """Tokenize prompt + each candidate and merge the token sequences into one trie.

    Each candidate is rendered and tokenized whole (as training would), so a template or
    tokenizer that merges text across the prompt/answer boundary still scores exactly the
    tokens a one-by-one computation would; merging only shares identical (token,
    trained?) paths.
    """
    trie = TokenTrie([], [], [], [])
    children: dict[tuple[int, int, bool], int] = {}
    for c, (ids, mask) in enumerate(tokens_and_mask(tokenizer, answer_only(messages, cand), tools)
                                    for cand in candidates):
        node = -1
        for j, (token, trained) in enumerate(zip(ids, mask)):
            if trained:
                trie.targets.append((node, token, c))
            key = (node, token, trained)
            if key not in children:
                children[key] = len(trie.ids)
                trie.ids.append(token)
                trie.positions.append(j)
                trie.parents.append(node)
            node = children[key]
    return trie


def ancestor_mask(tries: Sequence[TokenTrie]) -> torch.Tensor:
    """`[T, T]` bool: each token sees itself and its ancestors in its own trie, nothing else."""
    return trie_mask([trie.parents for trie in tries])


@torch.no_grad()
def score_tries(model: Any, tries: Sequence[TokenTrie], n_candidates: int) -> list[list[float]]:
    """Forward one packed row of tries; return each trie's per-candidate log-probability."""
    device = next(model.parameters()).device
    ids = torch.tensor([[i for t in tries for i in t.ids]], device=device)
    positions = torch.tensor([[p for t in tries for p in t.positions]], device=device)
    offsets, rows, targets, owners = 0, [], [], []
    for k, trie in enumerate(tries):
        for row, target, cand in trie.targets:
            rows.append(offsets + row)
            targets.append(target)
            owners.append(k * n_candidates + cand)
        offsets += len(trie.ids)
    # Candidates sharing a predicting token (e.g. the prompt's last) need its logits once.
    keep, which = torch.tensor(rows, device=device).unique(return_inverse=True)
    out = model(input_ids=ids, position_ids=positions, attention_mask=ancestor_mask(tries)[None, None].to(device),
                logits_to_keep=keep, use_cache=False)
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
    token_scores = logprobs[which, torch.tensor(targets, device=device)]
    totals = torch.zeros(len(tries) * n_candidates, device=device, dtype=torch.float64)
    totals.index_add_(0, torch.tensor(owners, device=device), token_scores.double())
    return totals.view(len(tries), n_candidates).tolist()


def label_logprobs(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, Any]]],
                   candidates: Sequence[str], max_row_tokens: int = 1024,
                   tools: Sequence[Sequence[dict[str, Any]] | None] | None = None) -> list[list[float]]:
    """Log-probability of every candidate answer after every prompt.

    Args:
        model, tokenizer: a causal LM and its tokenizer (the chat template renders prompts).
        prompts: conversations up to (not including) the answer.
        candidates: the label set, as answer texts.
        max_row_tokens: tries are packed into one row until it would exceed this many tokens.
        tools: each prompt's function schemas (or None), rendered by the chat template.

    Returns:
        `scores[i][c]`: summed log-probability of candidate `c`'s answer tokens (end-of-turn
        included) given prompt `i`.
    """
    from finesmith.model.methods import PADDED, method_of

    model.eval()
    tools = tools if tools is not None else [None] * len(prompts)
    if method_of(model).layout == PADDED:
        return padded_label_logprobs(model, tokenizer, prompts, candidates, tools=tools)
    scores: list[list[float]] = []
    with eval_progress("label log-likelihood", len(prompts)) as progress:
        pending: list[TokenTrie] = []
        for messages, prompt_tools in zip(prompts, tools, strict=True):
            trie = build_trie(tokenizer, messages, candidates, prompt_tools)
            if pending and sum(len(t.ids) for t in pending) + len(trie.ids) > max_row_tokens:
                scores.extend(score_tries(model, pending, len(candidates)))
                progress.advance(len(pending))
                pending = []
            pending.append(trie)
        if pending:
            scores.extend(score_tries(model, pending, len(candidates)))
            progress.advance(len(pending))
    return scores


@torch.no_grad()
def padded_label_logprobs(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, Any]]],
                          candidates: Sequence[str], batch_size: int = 16,
                          tools: Sequence[Sequence[dict[str, Any]] | None] | None = None) -> list[list[float]]:
    """Label log-likelihood for methods that put virtual tokens in front of every row.

    Prompt and prefix tuning cannot take a token trie (a 4-D mask over one position stream),
    so each prompt + candidate is scored as its own right-padded row; the tokens scored are
    the same supervised tokens as in `build_trie`.
    """
    from finesmith.data.pack import pad_batch
    from finesmith.data.tokenize import TokenizedExample
    from finesmith.train.objectives import virtual_sequence_logprobs

    device = next(model.parameters()).device
    tools = tools if tools is not None else [None] * len(prompts)
    rows = [TokenizedExample(*map(tuple, tokens_and_mask(tokenizer, answer_only(messages, cand), prompt_tools)), "")
            for messages, prompt_tools in zip(prompts, tools, strict=True) for cand in candidates]
    flat: list[float] = []
    with eval_progress("label log-likelihood", len(rows)) as progress:
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(rows[start:start + batch_size]).items()}
            flat.extend(virtual_sequence_logprobs(model, batch).double().tolist())
            progress.advance(min(batch_size, len(rows) - start))
    n = len(candidates)
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]
