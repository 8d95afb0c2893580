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
   none), the row waits in a pool with the cache columns it sees (its own prompt tokens and
   its path); once the pool is full, its rows are decoded together, each seeing only its own
   prompt and path; finished rows leave the batch.

Memory stays flat however many prompts there are (see `finesmith.advise.memory`, evaluation):

- a group's prefix is held once and lent to every batch and pool by reference
  (`finesmith.evaluate.kvcache`), never copied per row;
- what a waiting row keeps is its own prompt tokens and path, not the batch's padding, the
  other trie branches or the prefix; the pool is decoded once it holds `plan.pool` rows, and
  nothing of a row outlives its answer but the answer and the scores;
- the LM head runs only where logits are read (the prompt's last token, the trie's real
  nodes, `HEAD_ROWS` at a time, each decoding step), and only a node's greedy token and its
  targets' log-probabilities are kept;
- the batch and pool sizes are the largest (up to `batch_size` and `decode_rows`) whose
  estimate fits the memory budget (`finesmith.evaluate.budget`);
- on the CPU, the memory of freed tensors goes back to the operating system after every batch
  and pool (glibc's heap would otherwise keep it and grow with fragmentation).

Every attention mask is an explicit 4-D boolean mask over the cache, so padding in the middle
of a row (after a shared prefix), trie branches and decoded tokens are kept apart exactly:
the results equal computing each prompt alone (tested).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from finesmith.advise.memory import HEAD_ROWS, EvalShape
from finesmith.data.pairs import ancestor_mask
from finesmith.evaluate.budget import plan_batches, release_freed_memory
from finesmith.evaluate.kvcache import Prefix, PrefixedCache

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
class Outcome:
    answer_ids: list[int] | None = None  # greedy answer tokens (stop token excluded)
    scores: list[float] | None = None  # per candidate


@dataclass
class _NodeReadings:
    """What is kept of a row's trie forward: each node's greedy token, and the log-probability of
    each target predicted by a node (the targets with node >= 0, in `Continuations.targets` order)."""

    greedy: list[int]
    targets: list[float]


@dataclass
class _Waiting:
    """Rows of one prompt batch waiting to be decoded: their own keys and values after `prefix`
    (only the columns they see: their prompt's tokens and the trie path their answer took), the
    next input token and its position."""

    prefix: Prefix | None
    layers: list[tuple[torch.Tensor, torch.Tensor] | None]  # [rows, kv_heads, columns, head_dim]
    visible: torch.Tensor  # [rows, columns]
    tokens: list[int]
    positions: list[int]
    outcomes: list[Outcome]


class PromptEngine:
    """Greedy answers and candidate log-probabilities for many prompts, each prompt computed once.

    Args:
        model: a causal LM (or a peft model wrapping one) whose decoder takes a 4-D mask,
            position ids and a cache, and whose logits are its output embedding of the last
            hidden state (see `supports`).
        pad_id: token used for padding (masked out, never attended to).
        stops: token ids that end an answer.
        batch_size: prompts per forward, at most.
        decode_rows: rows decoded together, at most (default 4 × batch_size).
        memory: bytes the evaluation may hold beyond the weights (None: `budget.auto_budget`);
            the batch and pool sizes are the largest up to the two above whose estimate fits.
    """

    def __init__(self, model: Any, pad_id: int, stops: Sequence[int], batch_size: int = 16,
                 decode_rows: int | None = None, memory: int | None = None) -> None:
        self.model, self.pad_id, self.stops, self.batch_size = model, pad_id, set(stops), max(1, batch_size)
        # Decoding reads every weight once per step whatever the rows, so rows waiting to be
        # decoded are pooled across prompt batches and decoded together.
        self.decode_rows = decode_rows or 4 * self.batch_size
        self.memory = memory
        self.device = next(model.parameters()).device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # The decoder and the head separately: the head runs only where logits are read.
        self._decoder, self._head = base.get_decoder(), base.get_output_embeddings()
        self._layers = base.config.get_text_config(decoder=True).num_hidden_layers
        # transformers 5.x renames `past_key_values` to `cache`; pass whichever this model takes
        params = inspect.signature(self._decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._prefix: Prefix | None = None  # the current group's shared prefix
        self._pool: list[_Waiting] = []
        self._pool_prefix: Prefix | None = None  # what every pooled row's own keys follow
        self._progress: Callable[[int], Any] | None = None
        self.plan: EvalShape | None = None  # lengths, batch and pool of the last run
        self.tokens_computed = 0  # tokens run through the model, for benchmarks

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def run(self, jobs: Sequence[Job], max_new_tokens: int, n_candidates: int = 0,
            progress: Callable[[int], Any] | None = None) -> list[Outcome]:
        """Answer (when `max_new_tokens` > 0) and score (jobs with a trie) every job.

        `progress(n)` is called as rows get their final answer and scores."""
        self.model.eval()
        outcomes = [Outcome() for _ in jobs]
        if not jobs:
            return outcomes
        order = self.plan_work(jobs, max_new_tokens)
        self._progress = progress
        try:
            for start in range(0, len(order), self.plan.batch):
                index = order[start:start + self.plan.batch]
                for i, outcome in zip(index, self._batch([jobs[i] for i in index], max_new_tokens, n_candidates)):
                    outcomes[i] = outcome
                release_freed_memory(self.device)  # the batch's tensors are freed: keep the process that size
            self._flush(max_new_tokens)
        finally:
            self._prefix, self._pool, self._pool_prefix, self._progress = None, [], None, None
        return outcomes

    def plan_work(self, jobs: Sequence[Job], max_new_tokens: int) -> list[int]:
        """Order the jobs by group (storing each group's shared prefix length on its jobs) and set
        `plan`: the work's lengths, and the batch and pool sizes that fit the memory budget.

        Returns:
            The job indices in the order they run.
        """
        order = _order(jobs)
        shared = [job.group_prefix if job.group_prefix >= MIN_SHARED_PREFIX else 0 for job in jobs]
        wanted = EvalShape(prefix=max(shared), prompt=max(len(job.ids) - s for job, s in zip(jobs, shared)),
                           candidates=max((len(job.trie.ids) for job in jobs if job.trie is not None), default=0),
                           answer=max_new_tokens, batch=self.batch_size, pool=max(self.decode_rows, self.batch_size),
                           device=self.device.type)
        self.plan = plan_batches(self.model, wanted, self.memory)
        return order

    def _done(self, rows: int) -> None:
        if self._progress is not None and rows:
            self._progress(rows)

    # ------------------------------------------------------------------ one batch
    def _batch(self, jobs: Sequence[Job], max_new_tokens: int, n_candidates: int) -> list[Outcome]:
        prefix = self._shared_prefix(jobs)
        shared = len(prefix) if prefix is not None else 0
        cache = PrefixedCache(prefix, self._layers)
        rows = len(jobs)
        suffix = [job.ids[shared:] for job in jobs]
        width = max(len(s) for s in suffix)
        # each row's own tokens, right-aligned in `width` columns after the prefix
        own = torch.zeros(rows, width, dtype=torch.bool)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        for r, s in enumerate(suffix):
            ids[r, width - len(s):] = torch.tensor(s)
            positions[r, width - len(s):] = torch.arange(shared, shared + len(s))
            own[r, width - len(s):] = True
        visible = torch.cat([torch.ones(rows, shared, dtype=torch.bool), own], dim=1)
        first = self._logits(self._hidden(ids, positions, _causal(visible, width), cache)[:, -1])
        self.tokens_computed += sum(len(s) for s in suffix)
        prompt_len = [len(job.ids) for job in jobs]

        tries = [job.trie for job in jobs]
        readings: list[_NodeReadings | None] = [None] * rows
        if any(t is not None and t.ids for t in tries):
            readings = self._read_nodes(tries, prompt_len, visible, cache)
        first_logp = torch.log_softmax(first, dim=-1)
        outcomes = [Outcome(scores=None if trie is None else _scores(trie, first_logp[r], readings[r], n_candidates))
                    for r, trie in enumerate(tries)]
        if max_new_tokens > 0:
            self._answer(jobs, outcomes, first, readings, own, prompt_len, cache, prefix, max_new_tokens)
        else:
            self._done(rows)
        return outcomes

    def _read_nodes(self, tries: Sequence[Continuations | None], prompt_len: Sequence[int], visible: torch.Tensor,
                    cache: Any) -> list[_NodeReadings | None]:
        """Forward every row's trie nodes after its prompt and read them: the LM head runs on the
        rows' real nodes only, `HEAD_ROWS` at a time, and keeps each node's greedy token and the
        log-probabilities of its targets."""
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
        hidden = self._hidden(ids, positions, mask, cache)
        self.tokens_computed += sum(len(t.ids) for t in tries if t is not None)
        # every real node, flattened row by row; the (node, target) pairs to read from them
        where = [(r, i) for r, t in enumerate(tries) if t is not None for i in range(len(t.ids))]
        starts, offset = [], 0
        for t in tries:
            starts.append(offset)
            offset += len(t.ids) if t is not None else 0
        pairs = torch.tensor([(starts[r] + node, target) for r, t in enumerate(tries) if t is not None
                              for node, target, _ in t.targets if node >= 0], dtype=torch.long).view(-1, 2)
        node_rows, node_cols = (torch.tensor(column, dtype=torch.long) for column in zip(*where))
        greedy = torch.empty(len(where), dtype=torch.long)
        values = torch.empty(len(pairs), dtype=torch.float32)
        for lo in range(0, len(where), HEAD_ROWS):
            hi = min(lo + HEAD_ROWS, len(where))
            logits = self._logits(hidden[node_rows[lo:hi].to(hidden.device), node_cols[lo:hi].to(hidden.device)])
            greedy[lo:hi] = logits.argmax(dim=-1).cpu()
            inside = (pairs[:, 0] >= lo) & (pairs[:, 0] < hi)
            if inside.any():
                picked = pairs[inside].to(logits.device)
                values[inside] = torch.log_softmax(logits, dim=-1)[picked[:, 0] - lo, picked[:, 1]].cpu()
        greedy_list, value_list = greedy.tolist(), values.tolist()
        readings: list[_NodeReadings | None] = []
        pair = 0
        for r, t in enumerate(tries):
            if t is None:
                readings.append(None)
                continue
            count = sum(1 for node, _, _ in t.targets if node >= 0)
            readings.append(_NodeReadings(greedy_list[starts[r]:starts[r] + len(t.ids)], value_list[pair:pair + count]))
            pair += count
        return readings

    def _answer(self, jobs: Sequence[Job], outcomes: list[Outcome], first: torch.Tensor,
                readings: Sequence[_NodeReadings | None], own: torch.Tensor, prompt_len: Sequence[int],
                cache: PrefixedCache, prefix: Prefix | None, max_new_tokens: int) -> None:
        """Greedy answers: walk each row's trie while the greedy token is in it; rows that leave
        it (or have none) wait in the pool for decoding."""
        width = own.shape[1]
        waiting: list[tuple[int, int, int, list[int]]] = []  # (row, next input token, its position, path columns)
        for r, job in enumerate(jobs):
            answer: list[int] = []
            path: list[int] = []  # the trie nodes the answer walked, as columns of the row's own cache
            token = int(first[r].argmax())
            node = -1
            while True:
                if token in self.stops:
                    break
                answer.append(token)
                if len(answer) >= max_new_tokens:
                    break
                child = job.trie.child(node, token) if job.trie is not None else None
                if child is None:
                    waiting.append((r, token, prompt_len[r] + len(answer) - 1, path))
                    break
                path.append(width + child)
                node = child
                token = readings[r].greedy[child]
            outcomes[r].answer_ids = answer
        self._done(len(jobs) - len(waiting))
        if not waiting:
            return
        # keep only the columns each waiting row sees: its prompt tokens and its path
        columns = [own[r].nonzero().flatten().tolist() + path for r, _, _, path in waiting]
        index = torch.zeros(len(waiting), max(len(c) for c in columns), dtype=torch.long)
        seen = torch.zeros(index.shape, dtype=torch.bool)
        for k, cols in enumerate(columns):
            index[k, :len(cols)] = torch.tensor(cols)
            seen[k, :len(cols)] = True
        rows = torch.tensor([r for r, _, _, _ in waiting])
        layers = [(_gather(keys, rows, index), _gather(values, rows, index)) for keys, values in cache.own_layers()]
        self._wait(_Waiting(prefix, layers, seen, [t for _, t, _, _ in waiting], [p for _, _, p, _ in waiting],
                            [outcomes[r] for r, _, _, _ in waiting]), max_new_tokens)

    # ------------------------------------------------------------------ the decoding pool
    def _wait(self, rows: _Waiting, max_new_tokens: int) -> None:
        """Pool `rows` for decoding; decode the pool once it holds `plan.pool` rows.

        Pooled rows share one prefix by reference: the group's, when theirs extends it (the part
        beyond it is copied into each row). Rows whose prefix does not extend the pool's are
        decoded in the next pool.
        """
        if self._pool and not _extends(rows.prefix, self._pool_prefix):
            self._flush(max_new_tokens)
        if not self._pool:
            group = self._prefix is not None and _extends(rows.prefix, self._prefix)
            self._pool_prefix = self._prefix if group else rows.prefix
        self._pool.append(_rebase(rows, self._pool_prefix))
        if sum(len(chunk.outcomes) for chunk in self._pool) >= self.plan.pool:
            self._flush(max_new_tokens)

    def _flush(self, max_new_tokens: int) -> None:
        """Decode every pooled row together: own caches padded to one width (padding masked, zeros
        so that it stays finite) with room for the answers, each chunk freed layer by layer as it
        is copied in."""
        chunks, self._pool = self._pool, []
        if not chunks:
            return
        width = max(chunk.visible.shape[1] for chunk in chunks)
        total = sum(len(chunk.outcomes) for chunk in chunks)
        cache = PrefixedCache(self._pool_prefix, self._layers)
        for i, layer in enumerate(cache.layers):
            sample = chunks[0].layers[i][0]
            # with room for the answers' tokens, written in place as they are decoded
            keys = sample.new_zeros(total, sample.shape[1], width + max_new_tokens, sample.shape[3])
            values = torch.zeros_like(keys)
            row = 0
            for chunk in chunks:
                chunk_keys, chunk_values = chunk.layers[i]
                n, length = chunk_keys.shape[0], chunk_keys.shape[2]
                keys[row:row + n, :, :length], values[row:row + n, :, :length] = chunk_keys, chunk_values
                chunk.layers[i] = None
                row += n
            layer.own(keys, values, width)
        visible = torch.cat([torch.nn.functional.pad(c.visible, (0, width - c.visible.shape[1])) for c in chunks])
        outcomes = [o for c in chunks for o in c.outcomes]
        self._decode(outcomes, [t for c in chunks for t in c.tokens], [p for c in chunks for p in c.positions],
                     visible, len(self._pool_prefix or ()), cache, max_new_tokens)
        del cache
        release_freed_memory(self.device)
        self._done(total)

    def _decode(self, outcomes: list[Outcome], first: list[int], first_positions: list[int], own: torch.Tensor,
                shared: int, cache: Any, max_new_tokens: int) -> None:
        """Decode each row from its `first` token, one token at a time with the cache; finished
        rows leave the batch. `own`: which of the rows' own cache columns they see (every row sees
        the `shared` prefix columns)."""
        rows = list(range(len(outcomes)))
        tokens = torch.tensor([[t] for t in first])
        positions = torch.tensor([[p] for p in first_positions])
        visible = torch.cat([torch.ones(len(rows), shared, dtype=torch.bool), own], dim=1)
        while rows:
            visible = torch.cat([visible, torch.ones(len(rows), 1, dtype=torch.bool)], dim=1)
            logits = self._logits(self._hidden(tokens, positions, visible[:, None, None, :], cache)[:, -1])
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
    def _shared_prefix(self, jobs: Sequence[Job]) -> Prefix | None:
        """The batch's common prefix, computed once (from the group's stored prefix when it has
        one); None when not worth it."""
        common = _common_prefix([job.ids for job in jobs])
        common = min(common, min(len(job.ids) for job in jobs) - 1)  # every row keeps a token to prefill
        stored = self._prefix
        if stored is not None and not (len(stored) <= common and tuple(jobs[0].ids[:len(stored)]) == stored.ids):
            stored = None
        if stored is None:
            group_common = jobs[0].group_prefix
            if MIN_SHARED_PREFIX <= group_common <= common:
                stored = self._compute_prefix(jobs[0].ids[:group_common], None)
                self._prefix = stored
        length = len(stored) if stored is not None else 0
        if common - length >= MIN_SHARED_PREFIX:
            stored = self._compute_prefix(jobs[0].ids[:common], stored)
        return stored

    def _compute_prefix(self, ids: Sequence[int], base: Prefix | None) -> Prefix:
        """Keys and values of `ids` for one row, extending `base` (a stored shorter prefix)."""
        cache = PrefixedCache(base, self._layers)
        start = len(base) if base is not None else 0
        new = list(ids[start:])
        visible = torch.ones(1, len(ids), dtype=torch.bool)
        self._hidden(torch.tensor([new]), torch.arange(start, len(ids))[None], _causal(visible, len(new)), cache)
        self.tokens_computed += len(new)
        layers = cache.own_layers()
        if base is not None:
            layers = [(torch.cat([base_keys, keys], dim=2), torch.cat([base_values, values], dim=2))
                      for (base_keys, base_values), (keys, values) in zip(base.layers, layers)]
        return Prefix(tuple(ids), layers)

    # ------------------------------------------------------------------ model call
    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """The decoder's last hidden states (`[rows, tokens, hidden]`); no logits."""
        out = self._decoder(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                            attention_mask=mask.to(self.device), use_cache=True, **{self._cache_kw: cache})
        return out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the given hidden states only."""
        return self._head(hidden).float()


def _scores(trie: Continuations, first_logp: torch.Tensor, readings: _NodeReadings | None, n_candidates: int
            ) -> list[float]:
    """Summed log-probability of each candidate's scored tokens after its prompt."""
    totals = [0.0] * n_candidates
    after_nodes = iter(readings.targets if readings is not None else ())
    for node, target, cand in trie.targets:
        totals[cand] += float(first_logp[target]) if node < 0 else next(after_nodes)
    return totals


def _gather(states: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`states[rows[k], :, columns[k]]` for each k: `[len(rows), kv_heads, columns, head_dim]`, a copy."""
    rows, columns = rows.to(states.device), columns.to(states.device)
    return states[rows[:, None], :, columns].transpose(1, 2).contiguous()


def _extends(prefix: Prefix | None, base: Prefix | None) -> bool:
    """Whether `base` (None: nothing) is `prefix` or a beginning of it."""
    return base is None or (prefix is not None and prefix.extends(base))


def _rebase(rows: _Waiting, base: Prefix | None) -> _Waiting:
    """`rows` with their own keys following `base`: the part of their prefix beyond it copied
    in front of each row's own keys."""
    if rows.prefix is base:
        return rows
    start, n = (len(base) if base is not None else 0), len(rows.outcomes)
    extra = len(rows.prefix) - start
    for i, (keys, values) in enumerate(rows.layers):
        tail_keys, tail_values = rows.prefix.tail(start, i, n)
        rows.layers[i] = (torch.cat([tail_keys, keys], dim=2), torch.cat([tail_values, values], dim=2))
    rows.visible = torch.cat([torch.ones(n, extra, dtype=torch.bool), rows.visible], dim=1)
    rows.prefix = base
    return rows


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config keys that change logits


def supports(model: Any) -> bool:
    """Whether the engine can run `model` (see `unsupported_reason`)."""
    return unsupported_reason(model) is None


def unsupported_reason(model: Any) -> str | None:
    """Why the engine cannot run `model`, or None when it can: it needs a packed-layout causal LM
    without sliding windows, whose logits are its output embedding applied to the decoder's last
    hidden state."""
    from finesmith.model.methods import PADDED, method_of

    if method_of(model).layout == PADDED:
        return "the method prepends virtual tokens (prompt or prefix tuning)"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config(decoder=True)
    transformed = [key for key in LOGIT_TRANSFORMS if getattr(config, key, None) not in (None, 1, 1.0)]
    if base.get_output_embeddings() is None or transformed:
        return f"the model transforms its logits ({', '.join(transformed) or 'no output embedding'})"
    if getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False:
        return None
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ["sliding_attention"]):
        return None
    return f"the model has sliding-window attention layers (window {config.sliding_window})"


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
