"""Numerical checks that an export computes what the trained run computes.

Each check compares the exported model against the run loaded the way training left it
(adapter on base, or the full model) on a few chat prompts rendered with the model's
own template: the largest absolute logit difference, and for GGUF also the greedy
continuation and the token ids the rebuilt tokenizer produces.

A GGUF file is read back by llama.cpp itself when the `llama_cpp` bindings are installed
(the program the file is for: logits, greedy tokens, tokenization, chat template, and that
it stops at every token the run stops at), and by transformers' GGUF loader for the
architectures it reads completely (weights, tokenizer, chat template).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finesmith.core.templates import stop_token_ids
from finesmith.data.tokenize import prompt_ids
from finesmith.errors import FinesmithError

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
def greedy_tokens(model: Any, ids: torch.Tensor, count: int = GREEDY_TOKENS) -> list[int]:
    """The `count` tokens greedy decoding appends to the `(1, length)` prompt (no early stop)."""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                         do_sample=False, top_p=None, top_k=None, temperature=None, pad_token_id=0,
                         eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def greedy_mismatches(reference: Any, candidate: Any, prompts: list[torch.Tensor]) -> int:
    """How many prompts get a different greedy continuation of `GREEDY_TOKENS` tokens."""
    return sum(greedy_tokens(reference, ids) != greedy_tokens(candidate, ids) for ids in prompts)


def tokenizer_mismatches(reference: Any, candidate: Any) -> int:
    """How many probe strings (plain and chat-rendered) tokenize differently."""
    from finesmith.data.template import render  # the system turn folded where the template refuses it

    texts = list(PROBE_TEXTS) + [render(reference, c, add_generation_prompt=True) for c in PROBE_CHATS]
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
    from finesmith.model.methods import quiet_expert_rank_warning

    with quiet_expert_rank_warning():
        candidate = PeftModel.from_pretrained(load_model(base_spec), str(folder)).eval()
    return [Check("max |logit diff| adapter reload vs run", max_logit_difference(reference, candidate,
                                                                                  probe_batches(tokenizer)),
                  LOGIT_TOLERANCE["adapter"])]


# GGUF architectures whose every setting transformers' GGUF loader reads back (measured with
# transformers 5.25: it ignores Qwen3's head size and expert width and Gemma 3's window
# pattern and attention scale, and cannot read OLMo 2). For the others llama.cpp, the
# program the file is for, is the check.
TRANSFORMERS_READS_GGUF = ("llama", "qwen2", "phi3")


def gguf_architecture(path: Path) -> str:
    import gguf

    field = gguf.GGUFReader(str(path)).fields["general.architecture"]
    return str(field.contents())


def verify_gguf(reference: Any, tokenizer: Any, path: Path, quant: str) -> list[Check]:
    """Compare a GGUF file with the run in llama.cpp and, where it reads the file fully, in
    transformers' GGUF loader.

    Raises:
        FinesmithError: neither can read this file here (llama.cpp bindings not installed).
    """
    checks = []
    if gguf_architecture(path) in TRANSFORMERS_READS_GGUF:
        checks += verify_gguf_in_transformers(reference, tokenizer, path, quant)
    if llama_cpp_installed():
        checks += verify_gguf_in_llama_cpp(reference, tokenizer, path, quant)
    elif not checks:
        raise FinesmithError(f"--verify of a {gguf_architecture(path)} GGUF needs llama.cpp: pip install "
                             "llama-cpp-python (transformers' GGUF loader does not read this architecture fully)")
    return checks


def verify_gguf_in_transformers(reference: Any, tokenizer: Any, path: Path, quant: str) -> list[Check]:
    """Reload a GGUF with transformers' GGUF loader and compare weights, tokenizer and template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' loader reads no RoPE scaling for Llama; give it the run's, so its
    # checks cover the weights (llama.cpp's checks cover the file's own RoPE factors).
    rope = getattr(reference.config, "rope_parameters", None) or {}
    scaled = {"rope_parameters": dict(rope)} if rope.get("rope_type", "default") != "default" else {}
    exported = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                    **scaled).eval()
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


# --- llama.cpp ---------------------------------------------------------------------------

def llama_cpp_installed() -> bool:
    """True when the llama.cpp bindings (`pip install llama-cpp-python`) can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def load_llama_cpp(path: Path, n_ctx: int = 512) -> Any:
    """The GGUF file loaded by llama.cpp on the CPU, logits kept for the last position only.

    Raises:
        FinesmithError: the bindings are installed but their native library does not load.
        ValueError: llama.cpp refuses the file.
    """
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as exc:
        raise FinesmithError(f"the llama.cpp bindings are installed but do not load ({exc}); reinstall "
                             "llama-cpp-python, or uninstall it to verify with transformers only") from None
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=False, n_gpu_layers=0, verbose=False)


def llama_cpp_next_logits(llm: Any, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits for the token after the prompt `ids` (evaluated from an empty cache)."""
    import llama_cpp
    import numpy as np

    llm.reset()
    llm.eval(ids)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return torch.from_numpy(logits.copy())


def llama_cpp_greedy(llm: Any, ids: list[int], count: int = GREEDY_TOKENS) -> list[int]:
    """The `count` tokens llama.cpp's greedy sampler appends to the prompt `ids` (no early stop)."""
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == count:
            break
    return out


def probe_texts(tokenizer: Any) -> list[str]:
    """Plain probe strings and the probe chats rendered as finesmith renders them."""
    from finesmith.data.tokenize import render

    return list(PROBE_TEXTS) + [render(tokenizer, list(c), add_generation_prompt=True) for c in PROBE_CHATS]


@torch.no_grad()
def verify_gguf_in_llama_cpp(reference: Any, tokenizer: Any, path: Path, quant: str) -> list[Check]:
    """Load the file in llama.cpp; compare next-token logits, greedy output, tokenization, the
    chat template and the tokens generation stops at."""
    import llama_cpp

    from finesmith.export.gguf_vocab import model_stop_ids

    prompts = probe_batches(tokenizer)
    try:
        llm = load_llama_cpp(path, n_ctx=max(p.shape[1] for p in prompts) + GREEDY_TOKENS)
    except ValueError:  # the bindings report a file llama.cpp cannot build a model from this way
        return [Check("llama.cpp load failures", 1, 0)]
    worst, scale, differ = 0.0, 0.0, 0
    try:
        for ids in prompts:
            expected = reference(input_ids=ids).logits[0, -1].float()
            worst = max(worst, (llama_cpp_next_logits(llm, ids[0].tolist()) - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
            differ += int(llama_cpp_greedy(llm, ids[0].tolist()) != greedy_tokens(reference, ids))
        tokens_differ = sum(llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
                            != tokenizer(t, add_special_tokens=False)["input_ids"] for t in probe_texts(tokenizer))
        stops = model_stop_ids(tokenizer, reference.generation_config.eos_token_id)
        not_stopping = sum(not llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) for token in stops)
        template_changed = llm.metadata.get("tokenizer.chat_template") != tokenizer.chat_template
    finally:
        llm.close()
    limit = 0 if quant == "f16" else len(prompts)
    return [Check(f"max |next-token logit diff| / max |logit|, llama.cpp {quant} vs run", worst / (scale or 1.0),
                  LOGIT_TOLERANCE[quant]),
            Check(f"llama.cpp greedy continuations that differ ({len(prompts)} prompts)", differ, limit),
            Check("llama.cpp tokenizer mismatches", tokens_differ, 0),
            Check("llama.cpp chat template differs from the run's", float(template_changed), 0),
            Check(f"stop tokens llama.cpp does not end generation at ({len(stops)} stop tokens)", not_stopping, 0)]


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
