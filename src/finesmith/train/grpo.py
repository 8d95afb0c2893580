"""Reinforcement fine-tuning with rewards a program computes: GRPO, one more objective of the loop.

Each micro-batch is a set of prompts. Its batch is made by sampling: the current model
(dropout off, the KV cache, every prompt's `group_size` samples in one batch,
`finesmith.serve.batch.decode_batch`) answers each prompt G times; the reward functions
score each answer; each answer's advantage is its reward minus its group's mean, divided by
the group's standard deviation (population, + 1e-4; `scale_rewards: false` skips the
division). A group whose rewards are all equal has advantage 0 everywhere: it teaches
nothing and gives exactly zero policy gradient.

The loss of a completion token t of answer i (log-probability `logp`, from the model being
trained, `old` from the model that sampled, `ref` from the reference: the base with the
adapter disabled) is

    -min(ratio · A_i, clip(ratio, 1 - ε, 1 + ε) · A_i) + β · (exp(ref - logp) - (ref - logp) - 1),
    ratio = exp(logp - old)

summed over every completion token of the step and divided once by their number (over all
micro-batches and ranks): token-level normalisation, so accumulation stays exact. With
`iterations: 1` the samples are used for one step and `old` is `logp` itself, so the ratio is
1 (its gradient is the plain policy gradient); with `iterations: k` each batch of samples
is trained on for k steps and `old` is kept from sampling, which is where clipping acts.

Sampling draws its per-answer seeds from torch's global generator, which every checkpoint
saves, so a resumed run samples exactly what the uninterrupted run sampled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from finesmith.config import GRPOSettings
from finesmith.errors import FinesmithError
from finesmith.train.rewards import Reward, RewardScorer

NORM_EPSILON = 1e-4


@dataclass(frozen=True)
class PromptExample:
    """One prompt to answer: its tokens, its text, the fields the rewards receive, its `file:line`."""

    prompt_ids: tuple[int, ...]
    prompt: str
    fields: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids)


def is_prompt_row(row: Any) -> bool:
    """A conversation that ends in a user turn (the hosted reinforcement fine-tuning shape):
    `{"messages": [..., {"role": "user", ...}], <any other fields>}`."""
    messages = row.get("messages") if isinstance(row, dict) else None
    return (isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "user")


def prompt_example(row: dict[str, Any], where: str) -> Any:
    """The Example of a prompt row (`is_prompt_row`), checked as a conversation would be (roles,
    order, content, tools) except that it ends in the user turn the model answers.

    Raises:
        FinesmithError: `where` and every problem found.
    """
    from finesmith.data.formats import Example, conversation_problems
    from finesmith.data.tools import normalise_message, normalise_tools

    tools, problems = normalise_tools(row.get("tools", row.get("functions")))
    messages = [normalise_message(m, i, problems) for i, m in enumerate(row["messages"], start=1)]
    answered = messages + [{"role": "assistant", "content": "-"}]  # the turn sampling adds
    problems += conversation_problems(answered, tools)
    if problems:
        raise FinesmithError(f"{where}: " + "; ".join(problems))
    return Example(tuple(messages), where, tools)


def parse_prompt_records(path: str, fmt: str = "auto", fields: dict[str, str] | None = None) -> Any:
    """`finesmith.data.formats.parse_records`, reading rows that end in a user turn as prompts
    (their Example has no assistant turn) instead of refusing them."""
    from finesmith.data.formats import apply_fields, parse_records

    for record, example, problem in parse_records(path, fmt, fields):
        row = apply_fields(record.row, fields or {}) if isinstance(record.row, dict) else None
        if problem and fmt in ("auto", "chat") and is_prompt_row(row):
            try:
                yield record, prompt_example(row, record.where), None
            except FinesmithError as exc:
                yield record, None, str(exc)
        else:
            yield record, example, problem


def load_prompts(tokenizer: Any, path: str, fmt: str = "auto", fields: dict[str, str] | None = None,
                 max_prompt_tokens: int = 1024) -> list[PromptExample]:
    """Prompts from any SFT-shaped file: the conversation up to its last assistant turn; that
    turn (when present) is the `reference` field, the row's other columns are fields too.
    Rows ending in a user turn (the hosted reinforcement shape) are prompts as they are.
    The first problem is an error naming its `file:line`."""
    prompts = []
    for prompt, problem in iter_prompts(tokenizer, path, fmt, fields, max_prompt_tokens):
        if problem:
            raise FinesmithError(problem)
        prompts.append(prompt)
    return prompts


def iter_prompts(tokenizer: Any, path: str, fmt: str = "auto", fields: dict[str, str] | None = None,
                 max_prompt_tokens: int = 1024) -> Iterator[tuple[PromptExample | None, str | None]]:
    """`(prompt, None)` for each prompt of `path`, `(None, problem)` for each row that is not one
    (`finesmith data check --objective grpo` lists them all; training stops at the first)."""
    from finesmith.data.formats import Example
    from finesmith.data.tokenize import prompt_ids

    for record, example, problem in parse_prompt_records(path, fmt, fields):
        if problem:
            yield None, problem
            continue
        if example is None:
            continue
        if not isinstance(example, Example):
            yield None, (f"{example.source}: objective grpo needs prompts (chat, prompt/completion or "
                         "instruction rows), not text or preference pairs")
            continue
        messages = list(example.messages)
        reference = None
        if messages and messages[-1].get("role") == "assistant":
            reference = example.answer
            messages = messages[:-1]
        try:
            ids = prompt_ids(tokenizer, messages, tools=example.tools)
        except Exception as exc:  # the chat template's own refusal
            yield None, f"{example.source}: the model's chat template refused this conversation: {exc}"
            continue
        if len(ids) > max_prompt_tokens:
            yield None, (f"{example.source}: the prompt has {len(ids)} tokens, over max_length "
                         f"{max_prompt_tokens}; shorten it or raise max_length")
            continue
        row = record.row if isinstance(record.row, dict) else {}
        extra = {k: v for k, v in row.items() if k not in ("messages", "conversations", "prompt", "completion")
                 and k.isidentifier()}
        user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        yield PromptExample(tuple(ids), str(user or ""), {**extra, "reference": reference}, example.source), None


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """`[P, G]` rewards → advantages: minus the group mean, over the group's std (population) + 1e-4."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + NORM_EPSILON)


def token_loss(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               epsilon: float, beta: float = 0.0, ref: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss (+ β · KL to `ref`), summed over `mask`ed tokens.

    Args:
        logp, old, ref: `[N, T]` log-probabilities of the sampled tokens.
        advantages: `[N]`; mask: `[N, T]`, 1 on completion tokens.
    Returns:
        (loss sum, token count, {"clipped": tokens clipped, "kl": summed KL}).
    """
    ratio = torch.exp(logp - old)
    a = advantages.unsqueeze(1)
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a
    per_token = -torch.minimum(unclipped, clipped)
    mask = mask.to(per_token.dtype)
    kl = torch.zeros_like(per_token)
    if ref is not None:
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1  # k3: non-negative, unbiased for KL(policy || reference)
        per_token = per_token + beta * kl
    was_clipped = ((clipped < unclipped) & (mask > 0)).sum()
    return (per_token * mask).sum(), mask.sum(), {"clipped": was_clipped.detach(), "kl": (kl * mask).sum().detach()}


def sequence_logprobs(model: Any, unit: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[N, T-1]` log-probabilities of each row's next tokens (right-padded rows)."""
    out = model(input_ids=unit["input_ids"], attention_mask=unit["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, unit["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)


class GRPO:
    """The sampler (the loop's collate) and the objective of GRPO, over one model and its rewards."""

    needs_reference = False  # the reference is the base with the adapter disabled, computed while sampling
    measure_before = True  # the loop measures the held-out reward before the first step too

    def __init__(self, model: Any, tokenizer: Any, settings: GRPOSettings, rewards: list[Reward]) -> None:
        from finesmith.core.templates import stop_token_ids

        if settings.group_size < 2:
            raise FinesmithError("config: `grpo.group_size` must be at least 2: advantages compare answers "
                                 "to the same prompt")
        if settings.beta > 0 and not hasattr(model, "disable_adapter"):
            raise FinesmithError("grpo.beta > 0 needs a reference model: use an adapter method (lora, ia3, qlora), "
                                 "whose reference is the base with the adapter disabled, or set grpo.beta: 0")
        from finesmith.core.console import console
        from finesmith.train.rewards import with_grader_settings

        rewards = with_grader_settings(rewards, settings.reward_timeout, settings.grader_errors, console.print)
        self.model, self.tokenizer, self.settings, self.rewards = model, tokenizer, settings, rewards
        self.scorer = RewardScorer(rewards, settings.reward_timeout)  # user code: its own process, a timeout
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        self._reuse: dict[tuple[str, ...], tuple[int, dict[str, Any]]] = {}

    # --- sampling: the loop's collate -----------------------------------------------------------
    def collate(self, prompts: Sequence[PromptExample]) -> dict[str, Any]:
        """Sample, score and lay out one micro-batch; in eval mode, one greedy answer per prompt."""
        if not self.model.training:
            return self._score_greedy(prompts)
        key = tuple(p.source for p in prompts)
        if key in self._reuse:  # iterations > 1: the same samples, trained on again
            left, batch = self._reuse.pop(key)
            if left > 1:
                self._reuse[key] = (left - 1, batch)
            for name in ("_clipped", "_kl", "_tokens"):  # this step's own counts
                batch["log"].pop(name, None)
            return batch
        batch = self._sample(prompts)
        if self.settings.iterations > 1:
            self._reuse[key] = (self.settings.iterations - 1, batch)
        return batch

    def _sample(self, prompts: Sequence[PromptExample]) -> dict[str, Any]:
        s = self.settings
        g = s.group_size
        seeds = torch.randint(0, 2**62, (len(prompts) * g,)).tolist()  # from the checkpointed global generator
        completions = self._generate(prompts, g, s.temperature, s.top_p, seeds)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        values = self.scorer.score([(p.prompt, texts[i * g + j], p.fields, p.source)
                                    for i, p in enumerate(prompts) for j in range(g)])
        if values is None:  # a stop signal came while rewards ran: this step is skipped (non-finite), then the stop
            scores = torch.full((len(prompts), g, len(self.rewards)), math.nan)
        else:
            scores = torch.tensor(values, dtype=torch.float32).view(len(prompts), g, len(self.rewards))
        weights = torch.tensor([r.weight for r in self.rewards])
        total = (scores * weights).sum(-1)  # [P, G]
        advantages = group_advantages(total, s.scale_rewards)
        units = []
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                unit = self._unit(prompt, completions[i * g:(i + 1) * g], advantages[i])
                if s.iterations > 1:
                    unit["old_logps"] = sequence_logprobs(self.model, unit).detach()
                if s.beta > 0:
                    with self.model.disable_adapter():
                        unit["ref_logps"] = sequence_logprobs(self.model, unit).detach()
                units.append(unit)
        tokens = sum(int(u["completion_mask"].sum()) for u in units)
        std = total.std(dim=1, unbiased=False)
        log = {"reward": float(total.mean()), "reward_std": float(std.mean()),
               "zero_variance_groups": float((std < 1e-8).float().mean()),
               "completion_length": tokens / max(1, len(completions)),
               **{f"reward_{_short(r.name)}": float(scores[..., k].mean()) for k, r in enumerate(self.rewards)}}
        for unit in units:
            unit["log"] = log
        return {"units": units, "count": tokens, "real_tokens": sum(int(u["attention_mask"].sum()) for u in units),
                "log": log}

    def _generate(self, prompts: Sequence[PromptExample], g: int, temperature: float, top_p: float,
                  seeds: list[int] | None) -> list[list[int]]:
        from finesmith.serve.batch import Row, decode_batch, row_generator

        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        rows = [Row(list(p.prompt_ids), self.settings.max_new_tokens, temperature, top_p,
                    row_generator(seeds[i * g + j] if seeds else 0, device), lambda piece: True, lambda: False)
                for i, p in enumerate(prompts) for j in range(g)]
        decode_batch(self.model, self.tokenizer, rows, self.stop_ids, self.pad_id, lambda: None)
        if was_training:
            self.model.train()
        return [row.tokens for row in rows]

    def _unit(self, prompt: PromptExample, completions: list[list[int]], advantages: torch.Tensor) -> dict[str, Any]:
        """G right-padded rows `prompt + completion`, the completion mask and the advantages."""
        width = len(prompt.prompt_ids) + max(1, max(len(c) for c in completions))
        ids = torch.full((len(completions), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        completion = torch.zeros_like(ids)
        n = len(prompt.prompt_ids)
        for r, tokens in enumerate(completions):
            ids[r, :n + len(tokens)] = torch.tensor(list(prompt.prompt_ids) + tokens)
            attention[r, :n + len(tokens)] = 1
            completion[r, n:n + len(tokens)] = 1
        device = next(self.model.parameters()).device
        return {"input_ids": ids.to(device), "attention_mask": attention.to(device),
                "completion_mask": completion.to(device), "advantages": advantages.to(device)}

    # --- the loss ---------------------------------------------------------------------------------
    def __call__(self, model: Any, unit: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.objective(model, unit)

    def objective(self, model: Any, unit: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logp = sequence_logprobs(model, unit)
        mask = unit["completion_mask"][:, 1:]
        old = unit.get("old_logps", logp.detach())
        loss, count, stats = token_loss(logp, old, unit["advantages"], mask, self.settings.epsilon,
                                        self.settings.beta, unit.get("ref_logps"))
        log = unit.get("log")
        if log is not None:  # per-step metrics, summed here and averaged by the loop's log line
            log["_clipped"] = log.get("_clipped", 0.0) + float(stats["clipped"])
            log["_kl"] = log.get("_kl", 0.0) + float(stats["kl"])
            log["_tokens"] = log.get("_tokens", 0.0) + float(count)
        return loss, count

    # --- held-out reward ------------------------------------------------------------------------
    def _score_greedy(self, prompts: Sequence[PromptExample]) -> dict[str, Any]:
        completions = self._generate(prompts, 1, 0.0, 1.0, None)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        scores = self.scorer.score([(p.prompt, t, p.fields, p.source) for p, t in zip(prompts, texts)])
        if scores is None:  # stopping: no held-out reward this time
            scores = [[math.nan] * len(self.rewards) for _ in prompts]
        return {"units": [{"scores": scores, "weights": [r.weight for r in self.rewards],
                           "names": [r.name for r in self.rewards]}], "count": len(prompts)}

    def measure(self, model: Any, units: Any) -> dict[str, float]:
        """Held-out greedy answers' mean reward; `loss` is its negative (lower is better, as the loop expects)."""
        rows, names, weights = [], [], []
        for unit in units:
            rows += unit["scores"]
            names, weights = unit["names"], unit["weights"]
        if not rows:
            return {"loss": math.nan}
        total = sum(sum(w * s for w, s in zip(weights, row)) for row in rows) / len(rows)
        out = {"loss": -total, "reward": total}
        for k, name in enumerate(names):
            out[f"reward_{_short(name)}"] = sum(row[k] for row in rows) / len(rows)
        return out


def _short(name: str) -> str:
    """A metric-friendly name of a reward: `rewards.py:correct` → `correct`, `regex:...` → `regex`."""
    head = name.rsplit(":", 1)[-1] if ".py:" in name else name.split(":")[0]
    return "".join(c if c.isalnum() else "_" for c in head)
