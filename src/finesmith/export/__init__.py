"""Export a trained run: merged Hugging Face folder, PEFT adapter, or GGUF file.

The heavy modules (`run`, `merge`, `gguf`, `verify`) are imported where used, so the
command line can list these choices without loading torch.
"""

FORMATS = ("hf", "adapter", "gguf")
QUANTS = ("f16", "q8_0")
