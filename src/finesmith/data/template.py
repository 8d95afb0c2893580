"""Chat templates: the model's own, or a documented ChatML fallback for base models.

A base (non-instruct) model usually ships a tokenizer without a chat template. Rather
than refusing it, finesmith renders conversations in ChatML:

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{content}<|im_end|>\\n

and adds `<|im_start|>`/`<|im_end|>` to the vocabulary as special tokens when missing, so
each marker is one token the model learns. Adding tokens changes the vocabulary size: the
model's embeddings must be resized (`resize_embeddings`) and, for adapter methods, the
embedding and LM head rows trained too (`modules_for_new_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finesmith.model.load import _from_pretrained, resolve_model_path

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any, notify: Callable[[str], None] = print) -> list[str]:
    """Install the ChatML fallback when the tokenizer has no chat template.

    Args:
        tokenizer: a Hugging Face tokenizer, changed in place.
        notify: receives one notice line when the fallback is used.
    Returns:
        The special tokens added to the vocabulary (empty when the model had a template,
        or already knew both ChatML markers).
    """
    if getattr(tokenizer, "chat_template", None):
        return []
    vocab = tokenizer.get_vocab()
    missing = [token for token in CHATML_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    added = f"; added special tokens {', '.join(missing)} (embeddings are resized and trained)" if missing else ""
    notify(f"note: this model has no chat template, so conversations are rendered as ChatML{added}")
    return missing


def load_chat_tokenizer(spec: str, notify: Callable[[str], None] = print) -> tuple[Any, list[str]]:
    """Load a model's tokenizer with a chat template guaranteed (see `ensure_chat_template`).

    Args:
        spec: anything `--model` accepts.
        notify: receives the fallback notice, if any.
    Returns:
        `(tokenizer, added_tokens)`.
    """
    from transformers import AutoTokenizer

    path, gguf_file = resolve_model_path(spec)
    tokenizer = _from_pretrained(AutoTokenizer, spec, path, gguf_file)
    added = ensure_chat_template(tokenizer, notify)
    if tokenizer.pad_token is None:
        # Padding is masked by the attention mask, never by token id, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, added


def resize_embeddings(model: Any, tokenizer: Any) -> bool:
    """Grow the model's embedding (and tied LM head) to the tokenizer's size; True if resized."""
    if model.get_input_embeddings().num_embeddings >= len(tokenizer):
        return False
    model.resize_token_embeddings(len(tokenizer))
    return True


def modules_for_new_tokens(model: Any) -> list[str]:
    """Names of the input-embedding and output-head modules, to train in full next to an adapter.

    New tokens start from (mean-initialised) rows that an adapter on the linear layers
    cannot teach, so these modules are saved and trained alongside it.
    """
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in wanted})
