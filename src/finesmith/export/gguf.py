"""Writing a model as a GGUF file (llama.cpp's format), for every family finesmith trains.

The file is built with gguf-py, the package maintained with llama.cpp (its architecture
enums, tensor name maps, key names and quantisers), in three parts:

- the family's architecture, hyper-parameters and tensors, with its layout rules applied
  (`gguf_arch`: Q/K permutation, norm offsets, experts, fused projections, windows);
- the tokenizer (`gguf_vocab`: byte-level or SentencePiece BPE), its chat template, BOS/EOS
  settings and every token the fine-tuned model stops at, so llama.cpp and Ollama stop where
  the run stops;
- matrices in f16 or q8_0, norms, biases and the expert router in float32 (as llama.cpp's own
  converter stores them).

An Ollama `Modelfile` is written next to the file (`gguf_modelfile`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from finesmith.errors import FinesmithError
from finesmith.export import QUANTS
from finesmith.export.gguf_arch import Layout, gguf_tensors, permute_for_rope, write_hyperparameters
from finesmith.export.gguf_arch import check_exportable as check_architecture
from finesmith.export.gguf_modelfile import write_modelfile
from finesmith.export.gguf_vocab import build_vocab, general_name, model_stop_ids, write_vocab

__all__ = ["check_exportable", "encode_tensor", "export_gguf", "gguf_tensors", "permute_for_rope", "write_gguf"]

# Tensors llama.cpp keeps in float32 whatever the file type: 1-D ones (norms, biases, RoPE
# factors) and the MoE router, whose small logits pick the experts.
FLOAT32_SUFFIXES = ("ffn_gate_inp.weight",)


def check_exportable(config: Any) -> Layout:
    """Refuse, before anything is written, a model llama.cpp would compute differently."""
    return check_architecture(config)


def encode_tensor(name: str, weight: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """Encode one tensor: 1-D and router weights in float32, matrices as f16 or q8_0.

    q8_0 packs rows in blocks of 32 values; a matrix whose rows do not divide into blocks
    falls back to f16.
    """
    import gguf

    types = gguf.GGMLQuantizationType
    if weight.ndim == 1 or name.endswith(FLOAT32_SUFFIXES):
        return np.ascontiguousarray(weight, dtype=np.float32), types.F32
    block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
    if quant == "q8_0" and weight.shape[-1] % block == 0:
        return gguf.quants.quantize(np.ascontiguousarray(weight, dtype=np.float32), types.Q8_0), types.Q8_0
    return np.ascontiguousarray(weight, dtype=np.float16), types.F16


def write_gguf(model: Any, tokenizer: Any, path: Path, quant: str = "f16", name: str = "model") -> Path:
    """Write `model` (a plain transformers causal LM) and its tokenizer to one GGUF file.

    Args:
        model: a merged model of a supported family (`gguf_arch.LAYOUTS`).
        tokenizer: its fast tokenizer with the chat template the run uses.
        path: the `.gguf` file to write.
        quant: `f16` or `q8_0` for the matrices.
        name: `general.name` stored in the file (see `gguf_vocab.general_name`).

    Returns:
        `path`.

    Raises:
        FinesmithError: the model or tokenizer has a shape llama.cpp cannot run as trained.
    """
    import gguf

    if quant not in QUANTS:
        raise FinesmithError(f"unknown GGUF quantisation '{quant}'; use one of {', '.join(QUANTS)}")
    config = model.config
    layout = check_exportable(config)
    tensors = gguf_tensors(model, layout)
    vocab_rows = int(model.get_input_embeddings().weight.shape[0])
    vocab = build_vocab(tokenizer, vocab_rows, model_stop_ids(tokenizer, model.generation_config.eos_token_id))
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, layout.arch)])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(general_name(name, tokenizer))
    write_hyperparameters(writer, config, layout, vocab_rows)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab)
    for tensor_name, weight in tensors:
        data, dtype = encode_tensor(tensor_name, weight, quant)
        writer.add_tensor(tensor_name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export_gguf(model: Any, tokenizer: Any, folder: Path, filename: str, quant: str = "f16",
                name: str = "model") -> list[str]:
    """Write `folder/filename` (the GGUF) and `folder/Modelfile` for Ollama next to it.

    Returns:
        The names of the two files.
    """
    path = write_gguf(model, tokenizer, Path(folder) / filename, quant, name)
    stops = model_stop_ids(tokenizer, model.generation_config.eos_token_id)
    return [path.name, write_modelfile(Path(folder), tokenizer, path.name, stops).name]
