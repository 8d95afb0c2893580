"""Chat templates and stop tokens, shared by training, evaluation, export and serving.

A base (non-instruct) model usually ships a tokenizer without a chat template. Rather
than refusing it, finesmith renders conversations in ChatML:

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{content}<|im_end|>\\n

and adds `<|im_start|>`/`<|im_end|>` to the vocabulary as special tokens when missing, so
each marker is one token the model learns. Adding tokens changes the vocabulary size: the
model's embeddings must be resized and, for adapter methods, the embedding and LM head
rows trained too. Every command that loads a tokenizer goes through
`ensure_chat_template`, so training and inference render conversations identically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


def ensure_chat_template(tokenizer: Any, notify: Callable[[str], None] | None = None) -> list[str]:
    """Install the ChatML fallback when the tokenizer has no chat template.

    Args:
        tokenizer: a Hugging Face tokenizer, changed in place.
        notify: receives one notice line when the fallback is used.
    Returns:
        The special tokens added to the vocabulary (empty when the model had a template,
        or already knew both ChatML markers).
    """
    if tokenizer.pad_token is None:
        # Padding is masked by the attention mask, never by token id, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None):
        return []
    vocab = tokenizer.get_vocab()
    missing = [token for token in CHATML_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    if notify:
        added = f"; added special tokens {', '.join(missing)} (embeddings are resized and trained)" if missing else ""
        notify(f"note: this model has no chat template, so conversations are rendered as ChatML{added}")
    return missing


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus whichever end-of-turn tokens the vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)
