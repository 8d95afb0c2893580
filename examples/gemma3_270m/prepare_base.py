"""Make the Gemma 3 270M GGUF a model folder with Gemma's own turn format as its chat template.

The base model ships no chat template. Given the `.gguf` as it is, finesmith renders ChatML and
adds `<|im_start|>`/`<|im_end|>` to the vocabulary, so LoRA must also train the embedding and
LM head in full (339M trainable parameters, 56%) and the model must learn a brand-new stop
token: in one epoch it learned the answers but not to stop (README, "Measured"). Gemma's own
markers, `<start_of_turn>` and `<end_of_turn>`, are already in the base vocabulary, so this
script dequantises the GGUF once with finesmith's own converter (transformers' GGUF loader)
and installs Gemma 3's turn format (a system text goes in front of the first user turn):

    python examples/gemma3_270m/prepare_base.py GGUF_FILE OUT_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

GEMMA_TURNS = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] | trim + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (prefix if loop.first else '') + m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def main(gguf_file: str, out: str) -> None:
    from transformers import AutoTokenizer

    from finesmith.model.load import convert_gguf

    target = Path(out)
    if not (target / "config.json").is_file():
        convert_gguf(Path(gguf_file), target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    missing = [t for t in ("<start_of_turn>", "<end_of_turn>") if t not in tokenizer.get_vocab()]
    if missing:
        raise SystemExit(f"{gguf_file} has no {', '.join(missing)} token; this is not a Gemma 3 vocabulary")
    tokenizer.chat_template = GEMMA_TURNS
    tokenizer.save_pretrained(target)
    print(f"{target}: Gemma 3 270M base with Gemma's turn format")


if __name__ == "__main__":
    main(*sys.argv[1:3])
