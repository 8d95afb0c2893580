"""One prefill per prompt: greedy answers and label log-likelihoods from the same KV cache.

Evaluation asks two things of every prompt: what the model answers (greedy decoding) and how
probable each candidate label is. Both start from the same prompt, so the engine computes it
once:

1. **Shared prefixes once.** Prompts that start alike (the same system prompt and few-shot
   examples, i.e. fixed shots) share a token prefix. It is computed once (batch of one) and
   its keys and values are reused by every batch of its group (prefix caching); a batch's
   own longer common prefix is computed once for the batch.
2. **Prefill** each prompt's remaining tokens, left-padded inside the batch, on top of the
   prefix. The last position gives the first answer token's distribution.
3. **Label tries from the cache.** The candidate answers after a prompt form a token trie
   (shared beginnings merged). Its nodes are forwarded in one step with the prompt's cache:
   each node attends to the prompt and its own ancestors only. Summing the log-probabilities
   of each candidate's supervised tokens gives the label log-likelihood.
4. **Greedy answers walk the trie first.** Greedy decoding needs the distribution after each
   token it picks; while it picks a trie path, those distributions are already computed, so
   an answer that is a label costs no decoding step. Where it leaves the trie (or there is
   none), decoding continues with the KV cache from that point, each row seeing only its
   own prompt and path; finished rows leave the batch.

Every attention mask is an explicit 4-D boolean mask over the cache, so padding in the middle
of a row (after a shared prefix), trie branches and decoded tokens are kept apart exactly:
the results equal computing each prompt alone (tested).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from finesmith.data.pairs import ancestor_mask

MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth its own forward


@dataclass
class Continuations:
    """Candidate answers after one prompt, as a trie of the tokens that follow the prompt.

    `parents[i]` is the node token `i` follows (-1: the prompt's last token) and `depth[i]`
    its distance from the prompt end (0 for an answer's first token). `targets` holds
    (predicting node or -1, target token, candidate index) for every scored token. Only the
    nodes that predict a target (or lead to one) are kept, since nothing is read after a
    candidate's last scored token.
    """

    ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    targets: list[tuple[int, int, int]] = field(default_factory=list)

    def child(self, node: int, token: int) -> int | None:
        """The node for `token` right after `node`, if the trie has one."""
        return self._children.get((node, token))

    @functools.cached_property
    def _children(self) -> dict[tuple[int, int], int]:
        return {(p, t): i for i, (p, t) in enumerate(zip(self.parents, self.ids))}


def continuation_trie(prompt: Sequence[int], rendered: Sequence[tuple[Sequence[int], Sequence[bool]]]
                      ) -> Continuations | None:
    """Merge each candidate's tokens after `prompt` into a trie.

    Args:
        prompt: the generation prompt's tokens.
        rendered: (token ids, supervised mask) of prompt + each candidate, as training
            tokenizes the conversation.

    Returns:
        The trie, or None when a rendering does not start with exactly the prompt's tokens
        (a template or tokenizer that merges across the boundary): such prompts are scored
        by the one-row path instead.
    """
    trie = Continuations()
    n = len(prompt)
    nodes: dict[tuple[int, int], int] = {}
    for c, (ids, mask) in enumerate(rendered):
        if list(ids[:n]) != list(prompt) or any(mask[:n]):
            return None
        scored = [j for j in range(n, len(ids)) if mask[j]]
        if not scored:
            continue
        node = -1
        for j in range(n, scored[-1] + 1):
            if mask[j]:
                trie.targets.append((node, ids[j], c))
            if j == scored[-1]:
                break  # nothing is predicted from the last scored token
            key = (node, ids[j])
            if key not in nodes:
                nodes[key] = len(trie.ids)
                trie.ids.append(ids[j])
                trie.parents.append(node)
                trie.depth.append(j - n)
            node = nodes[key]
    return trie


@dataclass
class Job:
    """One prompt: its tokens, optional candidate trie, and the group it shares a prefix with."""

    ids: list[int]
    trie: Continuations | None = None
    group: Any = None
    group_prefix: int = 0  # tokens every prompt of the group starts with (set by the engine)


@dataclass
class _Chunk:
    """Rows of one prompt batch waiting to be decoded: their cache rows and where they stand."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    visible: torch.Tensor
    tokens: list[int]
    positions: list[int]
    outcomes: list["Outcome"]


def _pad_to(states: torch.Tensor, length: int) -> torch.Tensor:
    """`[B, H, L, D]` key/value states padded with zeros to `length` positions (masked out)."""
    return torch.nn.functional.pad(states, (0, 0, 0, length - states.shape[2]))


@dataclass
class Outcome:
    answer_ids: list[int] | None = None  # greedy answer tokens (stop token excluded)
    scores: list[float] | None = None  # per candidate


class PromptEngine:
    """Greedy answers and candidate log-probabilities for many prompts, each prompt computed once.

    Args:
        model: a causal LM (or a peft model wrapping one) whose forward takes a 4-D mask,
            position ids and a `DynamicCache`.
        pad_id: token used for padding (masked out, never attended to).
        stops: token ids that end an answer.
        batch_size: prompts per forward.
        decode_rows: rows decoded together (default 4 × batch_size).
    """

    def __init__(self, model: Any, pad_id: int, stops: Sequence[int], batch_size: int = 16,
                 decode_rows: int | None = None) -> None:
        self.model, self.pad_id, self.stops, self.batch_size = model, pad_id, set(stops), max(1, batch_size)
        # Decoding reads every weight once per step whatever the rows, so rows waiting to be
        # decoded are pooled across prompt batches and decoded together.
        self.decode_rows = decode_rows or 4 * self.batch_size
        self._pool: list[_Chunk] = []
        self.device = next(model.parameters()).device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers 5.x renames `past_key_values` to `cache`; pass whichever this model takes
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self._prefix: tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.tokens_computed = 0  # tokens run through the model, for benchmarks

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def run(self, jobs: Sequence[Job], max_new_tokens: int, n_candidates: int = 0,
            progress: Any = None) -> list[Outcome]:
        """Answer (when `max_new_tokens` > 0) and score (jobs with a trie) every job."""
        self.model.eval()
        order = _order(jobs)
        outcomes = [Outcome() for _ in jobs]
        self._prefix, self._pool = None, []
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            for i, outcome in zip(index, self._batch([jobs[i] for i in index], max_new_tokens, n_candidates)):
                outcomes[i] = outcome
            if sum(len(chunk.outcomes) for chunk in self._pool) >= self.decode_rows:
                self._flush(max_new_tokens)
            if progress is not None:
                progress(len(index))
        self._flush(max_new_tokens)
        self._prefix = None
        return outcomes

    # ------------------------------------------------------------------ one batch
    def _batch(self, jobs: Sequence[Job], max_new_tokens: int, n_candidates: int) -> list[Outcome]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self._config())
        shared = self._shared_prefix(jobs, cache)
        rows = len(jobs)
        suffix = [job.ids[shared:] for job in jobs]
        width = max(len(s) for s in suffix)
        # columns [0, shared) are the prefix; each row's suffix is right-aligned in the next `width`
        visible = torch.zeros(rows, shared + width, dtype=torch.bool)
        visible[:, :shared] = True
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        for r, s in enumerate(suffix):
            ids[r, width - len(s):] = torch.tensor(s)
            positions[r, width - len(s):] = torch.arange(shared, shared + len(s))
            visible[r, shared + width - len(s):] = True
        mask = _causal(visible, width)
        logits = self._forward(ids, positions, mask, cache, 1)[:, -1].float()
        self.tokens_computed += sum(len(s) for s in suffix)
        prompt_len = [len(job.ids) for job in jobs]

        tries = [job.trie for job in jobs]
        node_logits: list[torch.Tensor | None] = [None] * rows
        trie_start = visible.shape[1]
        if any(t is not None and t.ids for t in tries):
            node_logits = self._score_nodes(tries, prompt_len, visible, cache)
            depth = max(len(t.ids) for t in tries if t is not None)
            visible = torch.cat([visible, torch.zeros(rows, depth, dtype=torch.bool)], dim=1)
        last_logp = torch.log_softmax(logits, dim=-1)
        outcomes = []
        for r, trie in enumerate(tries):
            scores = None
            if trie is not None:
                totals = [0.0] * n_candidates
                for node, target, cand in trie.targets:
                    row = last_logp[r] if node < 0 else node_logits[r][node]
                    totals[cand] += float(row[target])
                scores = totals
            outcomes.append(Outcome(scores=scores))
        if max_new_tokens > 0:
            self._answer(jobs, outcomes, logits, node_logits, visible, trie_start, prompt_len, cache, max_new_tokens)
        return outcomes

    def _score_nodes(self, tries: Sequence[Continuations | None], prompt_len: Sequence[int], visible: torch.Tensor,
                     cache: Any) -> list[torch.Tensor | None]:
        """Forward every row's trie nodes after its prompt; return log-probabilities per node."""
        rows, before = visible.shape
        depth = max(len(t.ids) for t in tries if t is not None)
        ids = torch.full((rows, depth), self.pad_id, dtype=torch.long)
        positions = torch.zeros(rows, depth, dtype=torch.long)
        mask = torch.zeros(rows, 1, depth, before + depth, dtype=torch.bool)
        mask[:, 0, :, :before] = visible[:, None, :]
        for r, trie in enumerate(tries):
            n = len(trie.ids) if trie is not None else 0
            if n:
                ids[r, :n] = torch.tensor(trie.ids)
                positions[r, :n] = torch.tensor(trie.depth) + prompt_len[r]
                mask[r, 0, :n, before:before + n] = ancestor_mask([trie.parents])
            for i in range(n, depth):  # padding nodes: see only themselves (no row may see nothing)
                mask[r, 0, i, :] = False
                mask[r, 0, i, before + i] = True
        logits = self._forward(ids, positions, mask, cache, depth)
        self.tokens_computed += sum(len(t.ids) for t in tries if t is not None)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return [logp[r, :len(t.ids)] if t is not None else None for r, t in enumerate(tries)]

    def _answer(self, jobs: Sequence[Job], outcomes: list[Outcome], logits: torch.Tensor,
                node_logits: Sequence[torch.Tensor | None], visible: torch.Tensor, trie_start: int,
                prompt_len: Sequence[int], cache: Any, max_new_tokens: int) -> None:
        """Greedy answers: walk each row's trie while the greedy token is in it, then decode."""
        pending: list[tuple[int, int, int]] = []  # (row, next input token, its position)
        for r, job in enumerate(jobs):
            answer: list[int] = []
            token = int(logits[r].argmax())
            node = -1
            while True:
                if token in self.stops:
                    break
                answer.append(token)
                if len(answer) >= max_new_tokens:
                    break
                child = job.trie.child(node, token) if job.trie is not None else None
                if child is None:
                    pending.append((r, token, prompt_len[r] + len(answer) - 1))
                    break
                visible[r, trie_start + child] = True  # the path so far stays visible to decoding
                node = child
                token = int(node_logits[r][child].argmax())
            outcomes[r].answer_ids = answer
        if pending:
            rows = torch.tensor([r for r, _, _ in pending], device=self.device)
            self._pool.append(_Chunk([(layer.keys[rows], layer.values[rows]) for layer in cache.layers],
                                     visible[rows.cpu()], [t for _, t, _ in pending], [p for _, _, p in pending],
                                     [outcomes[r] for r, _, _ in pending]))

    def _flush(self, max_new_tokens: int) -> None:
        """Decode every pooled row together: caches padded to one length (padding masked)."""
        from transformers import DynamicCache

        chunks, self._pool = self._pool, []
        if not chunks:
            return
        length = max(chunk.visible.shape[1] for chunk in chunks)
        cache = DynamicCache(config=self._config())
        for i, layer in enumerate(cache.layers):
            keys = [_pad_to(chunk.layers[i][0], length) for chunk in chunks]
            values = [_pad_to(chunk.layers[i][1], length) for chunk in chunks]
            layer.update(torch.cat(keys), torch.cat(values))
        visible = torch.cat([torch.nn.functional.pad(c.visible, (0, length - c.visible.shape[1])) for c in chunks])
        tokens = [t for c in chunks for t in c.tokens]
        positions = [p for c in chunks for p in c.positions]
        self._decode([o for c in chunks for o in c.outcomes], tokens, positions, visible, cache, max_new_tokens)

    def _decode(self, outcomes: list[Outcome], first: list[int], first_positions: list[int], visible: torch.Tensor,
                cache: Any, max_new_tokens: int) -> None:
        """Decode each row from its `first` token, one token at a time with the cache; finished
        rows leave the batch."""
        rows = list(range(len(outcomes)))
        tokens = torch.tensor([[t] for t in first])
        positions = torch.tensor([[p] for p in first_positions])
        while rows:
            visible = torch.cat([visible, torch.ones(len(rows), 1, dtype=torch.bool)], dim=1)
            logits = self._forward(tokens, positions, visible[:, None, None, :], cache, 1)[:, -1]
            self.tokens_computed += len(rows)
            chosen = logits.argmax(dim=-1).tolist()
            keep = []
            for k, (r, token) in enumerate(zip(rows, chosen)):
                answer = outcomes[r].answer_ids
                if token not in self.stops:
                    answer.append(token)
                if token not in self.stops and len(answer) < max_new_tokens:
                    keep.append(k)
            if not keep:
                break
            if len(keep) < len(rows):
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
                visible = visible[keep]
            rows = [rows[k] for k in keep]
            tokens = torch.tensor([[chosen[k]] for k in keep])
            positions = positions[keep] + 1

    # ------------------------------------------------------------------ prefixes
    def _shared_prefix(self, jobs: Sequence[Job], cache: Any) -> int:
        """Fill `cache` with the batch's common prefix (from the group's stored prefix when it
        has one) expanded to every row; return its length (0 when not worth it)."""
        rows = len(jobs)
        common = _common_prefix([job.ids for job in jobs])
        common = min(common, min(len(job.ids) for job in jobs) - 1)  # every row keeps a token to prefill
        stored = self._prefix
        if stored is not None and (len(stored[0]) > common or tuple(jobs[0].ids[:len(stored[0])]) != stored[0]):
            stored = None
        if stored is None:
            group_common = jobs[0].group_prefix
            if MIN_SHARED_PREFIX <= group_common <= common:
                stored = self._compute_prefix(jobs[0].ids[:group_common], None)
                self._prefix = stored
        length = len(stored[0]) if stored is not None else 0
        if common - length >= MIN_SHARED_PREFIX:
            stored = self._compute_prefix(jobs[0].ids[:common], stored)
            length = common
        if stored is None or length == 0:
            return 0
        for layer, (keys, values) in zip(cache.layers, stored[1]):
            layer.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
        return length

    def _compute_prefix(self, ids: Sequence[int], base: tuple | None
                        ) -> tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Keys and values of `ids` for one row, extending `base` (a stored shorter prefix)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self._config())
        start = 0
        if base is not None:
            start = len(base[0])
            for layer, (keys, values) in zip(cache.layers, base[1]):
                layer.update(keys, values)
        new = list(ids[start:])
        visible = torch.ones(1, len(ids), dtype=torch.bool)
        self._forward(torch.tensor([new]), torch.arange(start, len(ids))[None], _causal(visible, len(new)), cache, 1)
        self.tokens_computed += len(new)
        return tuple(ids), [(layer.keys, layer.values) for layer in cache.layers]

    # ------------------------------------------------------------------ model call
    def _config(self) -> Any:
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return model.config

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any,
                 keep: int) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                         attention_mask=mask.to(self.device), use_cache=True, **{self._cache_kw: cache},
                         logits_to_keep=keep)
        return out.logits


def supports(model: Any) -> bool:
    """Whether the engine can run `model`: a packed-layout causal LM without sliding windows."""
    from finesmith.model.methods import PADDED, method_of

    if method_of(model).layout == PADDED:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config(decoder=True)
    if getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False:
        return True
    return "sliding_attention" not in (getattr(config, "layer_types", None) or ["sliding_attention"])


def _causal(visible: torch.Tensor, query: int) -> torch.Tensor:
    """`[B, 1, query, K]` mask for the last `query` columns of `visible` (`[B, K]`): each query
    sees the visible columns up to itself, and always itself (padding rows stay finite)."""
    rows, total = visible.shape
    start = total - query
    cols = torch.arange(total)
    causal = cols[None, :] <= (start + torch.arange(query))[:, None]  # [query, K]
    mask = visible[:, None, :] & causal[None]
    mask[:, torch.arange(query), start + torch.arange(query)] = True
    return mask[:, None]


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _order(jobs: Sequence[Job]) -> list[int]:
    """Jobs grouped by shared prefix (first appearance of each group), shortest first within a group.

    Also stores on each job the length of its group's common prefix, so the group's prefix is
    computed once for all of its batches.
    """
    groups: dict[Any, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.group, []).append(i)
    order: list[int] = []
    for members in groups.values():
        common = _common_prefix([jobs[i].ids for i in members]) if members else 0
        for i in members:
            jobs[i].group_prefix = min(common, len(jobs[i].ids) - 1)
        order.extend(sorted(members, key=lambda i: len(jobs[i].ids)))
    return order


def answer_and_score(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict[str, Any]]],
                     candidates: Sequence[str] | None = None, max_new_tokens: int = 32, batch_size: int = 16,
                     tools: Sequence[Sequence[dict[str, Any]] | None] | None = None,
                     groups: Sequence[Any] | None = None, description: str = "evaluating"
                     ) -> tuple[list[str] | None, list[list[float]] | None]:
    """Greedy answers (when `max_new_tokens` > 0) and candidate log-likelihoods (when
    `candidates` is given) for each conversation, each prompt computed once.

    Args:
        conversations: prompts, rendered with the generation prompt by the chat template.
        candidates: answer texts scored after every prompt (summed log-probability of their
            supervised tokens, end-of-turn included, exactly as training tokenizes them).
        tools: each conversation's function schemas (or None).
        groups: a key per conversation naming the prompts that share a prefix (e.g. their
            few-shot examples); prompts of a group are batched together.

    Returns:
        (answers or None, scores or None); `scores[i][c]` is candidate c after prompt i.
    Models the engine cannot run (virtual-token methods, sliding-window attention) take the
    one-pass-per-purpose path: batched `generate` and packed label tries.
    """
    from finesmith.core.templates import stop_token_ids
    from finesmith.data.tokenize import prompt_ids, tokens_and_mask
    from finesmith.evaluate.generate import eval_progress, generate_batched
    from finesmith.evaluate.loglik import answer_only, label_logprobs

    tools = list(tools) if tools is not None else [None] * len(conversations)
    if not supports(model):
        answers = (generate_batched(model, tokenizer, conversations, max_new_tokens, batch_size, tools)
                   if max_new_tokens > 0 else None)
        scores = label_logprobs(model, tokenizer, conversations, candidates, tools=tools) if candidates else None
        return answers, scores
    groups = list(groups) if groups is not None else [None] * len(conversations)
    jobs, fallback = [], []
    for i, (messages, conv_tools, group) in enumerate(zip(conversations, tools, groups, strict=True)):
        ids = prompt_ids(tokenizer, list(messages), conv_tools)
        trie = None
        if candidates:
            rendered = [tokens_and_mask(tokenizer, answer_only(messages, c), conv_tools) for c in candidates]
            trie = continuation_trie(ids, rendered)
            if trie is None:
                fallback.append(i)
        jobs.append(Job(ids, trie, group))
    engine = PromptEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), batch_size)
    with eval_progress() as progress:
        task = progress.add_task(description, total=len(jobs))
        outcomes = engine.run(jobs, max_new_tokens, len(candidates or ()), lambda n: progress.advance(task, n))
    answers = ([tokenizer.decode(o.answer_ids, skip_special_tokens=True).strip() for o in outcomes]
               if max_new_tokens > 0 else None)
    scores = [o.scores for o in outcomes] if candidates else None
    if fallback:  # a template that merges the answer into the prompt's last token: score those one way
        redo = label_logprobs(model, tokenizer, [conversations[i] for i in fallback], candidates,
                              tools=[tools[i] for i in fallback])
        for i, row in zip(fallback, redo):
            scores[i] = row
    return answers, scores
