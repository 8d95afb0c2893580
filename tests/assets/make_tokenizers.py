"""Build the small tokenizers the tests use (run once; the output is committed).

A byte-level BPE trained on a few hundred lines of text, saved with the chat templates of
three simple families: ChatML (SmolLM2/Qwen style), Llama-3 style headers, and Mistral-style
[INST] turns (`tokenizer-chatml`, `-llama3`, `-mistral`).

And one per real chat format of the model families in `tests/families.py`
(`tokenizer-llama32`, `-qwen3`, `-gemma`, `-mistral-nemo`, `-phi35`, `-olmo2`): the same kind of
byte-level BPE (what llama.cpp's gpt2-style vocabulary takes), whose special tokens are every
marker that family's template emits, with that family's BOS/EOS/pad choice, whether the tokenizer
adds BOS itself (Llama 3, Gemma, Mistral do; their templates render `bos_token` too), and the
family's own template from `templates/` (finesmith's restatement of its rules).

    python tests/assets/make_tokenizers.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}")

FAMILIES = {
    # name: (template, special tokens, bos, eos, add BOS by itself?)
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", False),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", True),
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", True),
}


TEMPLATES = HERE / "templates"
# name: (template file, special tokens in id order, added non-special tokens, bos, eos, pad, add BOS by itself?)
FAMILY_TOKENIZERS = {
    # Llama 3.2 Instruct: EOS is the end of turn; the tokenizer adds <|begin_of_text|> and so does the template.
    "llama32": ("llama32", ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"], [],
                "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", True),
    # Qwen2.5 / Qwen3: no BOS at all; EOS <|im_end|>; the think and tool tags are added tokens that are not
    # special (decoding keeps them), as in Qwen's own tokenizer.
    "qwen3": ("qwen3", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"],
              None, "<|im_end|>", "<|endoftext|>", False),
    # Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3 as in Gemma's vocabulary; the tokenizer adds <bos>.
    "gemma": ("gemma2", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], [],
              "<bos>", "<eos>", "<pad>", True),
    # Mistral Nemo (Tekken): control tokens in Tekken's order; the tokenizer adds <s>.
    "mistral-nemo": ("mistral_nemo", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                                      "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "<pad>"],
                     [], "<s>", "</s>", "<pad>", True),
    # Phi-3.5-mini: EOS <|endoftext|> (only at the very end of a conversation), <|end|> closes each turn, no BOS added.
    "phi35": ("phi35", ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"], [],
              "<s>", "<|endoftext|>", "<|endoftext|>", False),
    # OLMo 2 Instruct: <|endoftext|> is BOS and EOS; the template renders BOS, the tokenizer adds none.
    "olmo2": ("olmo2", ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"], [],
              "<|endoftext|>", "<|endoftext|>", "<|pad|>", False),
}


def corpus() -> list[str]:
    root = HERE.parents[1] / "src" / "finesmith" / "resources" / "demo"
    lines = []
    for name in ("train.jsonl", "eval.jsonl"):
        for row in map(json.loads, (root / name).read_text().splitlines()):
            lines.extend(m["content"] for m in row["messages"])
    lines += ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
              "Answer with one word.", "You are a helpful assistant."] * 5
    return lines


def train_bpe(specials: list[str]) -> Tokenizer:
    """A byte-level BPE of 600 entries (special tokens first, in the order given)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def build_family(name: str) -> None:
    from tokenizers import AddedToken, processors

    template, specials, plain, bos, eos, pad, add_bos = FAMILY_TOKENIZERS[name]
    tok = train_bpe(specials)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    if "<unk>" in specials:
        named["unk_token"] = "<unk>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in named.items() if v is not None})
    named_tokens = set(named.values())
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in named_tokens]},
                            replace_extra_special_tokens=False)
    fast.chat_template = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    out = HERE / f"tokenizer-{name}"
    fast.save_pretrained(out)
    print(f"wrote {out} ({len(fast)} tokens)")


def build(name: str) -> None:
    template, specials, bos, eos, add_bos = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if add_bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=eos if name != "mistral" else "<unk>")
    fast.chat_template = template
    out = HERE / f"tokenizer-{name}"
    fast.save_pretrained(out)
    print(f"wrote {out} ({len(fast)} tokens)")


if __name__ == "__main__":
    import sys

    wanted = sys.argv[1:] or [*FAMILIES, *FAMILY_TOKENIZERS]
    for family in wanted:
        (build if family in FAMILIES else build_family)(family)
