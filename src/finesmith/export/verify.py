"""Numerical checks that an export computes what the trained run computes.

Each check compares the exported model against the run loaded the way training left it
(adapter on base, or the full model) on a few chat prompts rendered with the model's
own template: the largest absolute logit difference, and for GGUF also the greedy
continuation and the token ids the rebuilt tokenizer produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finesmith.data.tokenize import prompt_ids
from finesmith.evaluate.generate import stop_token_ids

PROBE_CHATS = (
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 plus 30?"}],
    [{"role": "user", "content": "List three colours, separated by commas."}],
)
PROBE_TEXTS = ("Hello world", "  two leading spaces", "numbers 12345 and symbols #!?", "ünïcödé ✓", "line\nbreak")
GREEDY_TOKENS = 8

# Largest allowed |logit difference|. Merging LoRA only reorders float32 arithmetic, so
# merge and adapter are absolute. GGUF rounds every weight (f16: 11 significant bits;
# q8_0: 8 bits per block of 32) and the error grows with depth and with the size of the
# logits, so GGUF limits are relative to the largest |logit| of the run.
LOGIT_TOLERANCE = {"merge": 1e-4, "adapter": 1e-5, "f16": 1e-2, "q8_0": 1e-1}


@dataclass(frozen=True)
class Check:
    """One measured check: `value` must not exceed `limit` (for yes/no checks 0 or 1 vs 0)."""

    name: str
    value: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.value <= self.limit

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.value:.3g} (limit {self.limit:g})"


def probe_batches(tokenizer: Any) -> list[torch.Tensor]:
    """The probe conversations as generation prompts, one `(1, length)` tensor each."""
    return [torch.tensor([prompt_ids(tokenizer, chat)]) for chat in PROBE_CHATS]


@torch.no_grad()
def max_logit_difference(reference: Any, candidate: Any, prompts: list[torch.Tensor],
                         relative: bool = False) -> float:
    """Largest |logit difference| over every position and vocabulary entry of the prompts.

    With `relative`, divided by the largest |logit| of the reference on the same prompts.
    """
    worst, scale = 0.0, 0.0
    for ids in prompts:
        a = reference(input_ids=ids).logits.float()
        b = candidate(input_ids=ids).logits.float()
        worst = max(worst, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
    return worst / scale if relative else worst


@torch.no_grad()
def greedy_mismatches(reference: Any, candidate: Any, prompts: list[torch.Tensor]) -> int:
    """How many prompts get a different greedy continuation of `GREEDY_TOKENS` tokens."""
    differ = 0
    for ids in prompts:
        kwargs = {"max_new_tokens": GREEDY_TOKENS, "do_sample": False, "top_p": None, "top_k": None,
                  "temperature": None, "pad_token_id": 0, "eos_token_id": None}
        a = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        b = candidate.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        differ += int(not torch.equal(a, b))
    return differ


def tokenizer_mismatches(reference: Any, candidate: Any) -> int:
    """How many probe strings (plain and chat-rendered) tokenize differently."""
    texts = list(PROBE_TEXTS) + [reference.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                                 for c in PROBE_CHATS]
    ids = [(reference(t, add_special_tokens=False)["input_ids"], candidate(t, add_special_tokens=False)["input_ids"])
           for t in texts]
    return sum(a != b for a, b in ids)


def verify_hf(reference: Any, tokenizer: Any, folder: Path) -> list[Check]:
    """Reload a merged/full export with plain transformers and compare it to the run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    exported_tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = probe_batches(tokenizer)
    stops = set(_as_list(exported.generation_config.eos_token_id))
    return [Check("max |logit diff| merged vs run (fp32)", max_logit_difference(reference, exported, prompts),
                  LOGIT_TOLERANCE["merge"]),
            Check("tokenizer mismatches", tokenizer_mismatches(tokenizer, exported_tokenizer), 0),
            Check("chat template changed", float(exported_tokenizer.chat_template != tokenizer.chat_template), 0),
            Check("stop tokens missing from generation_config", len(set(stop_token_ids(tokenizer)) - stops), 0)]


def verify_adapter(reference: Any, tokenizer: Any, base_spec: str, folder: Path) -> list[Check]:
    """Put the exported adapter on a fresh base model with plain peft and compare."""
    from peft import PeftModel

    from finesmith.model.load import load_model

    candidate = PeftModel.from_pretrained(load_model(base_spec), str(folder)).eval()
    return [Check("max |logit diff| adapter reload vs run", max_logit_difference(reference, candidate,
                                                                                  probe_batches(tokenizer)),
                  LOGIT_TOLERANCE["adapter"])]


def verify_gguf(reference: Any, tokenizer: Any, path: Path, quant: str) -> list[Check]:
    """Reload a GGUF with transformers' GGUF loader and compare logits, greedy output, tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    exported_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompts = probe_batches(tokenizer)
    checks = [Check(f"max |logit diff| / max |logit|, gguf {quant} vs run",
                    max_logit_difference(reference, exported, prompts, relative=True), LOGIT_TOLERANCE[quant]),
              Check("tokenizer mismatches", tokenizer_mismatches(tokenizer, exported_tokenizer), 0),
              Check("chat template changed", float(exported_tokenizer.chat_template != tokenizer.chat_template), 0)]
    # q8_0 may legitimately flip a near-tie between two tokens; f16 must not.
    limit = 0 if quant == "f16" else len(prompts)
    checks.append(Check(f"greedy continuations that differ ({len(prompts)} prompts)",
                        greedy_mismatches(reference, exported, prompts), limit))
    return checks


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
