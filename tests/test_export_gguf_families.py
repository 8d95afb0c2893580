"""GGUF export of every model family, checked in llama.cpp itself.

For each family of `tests/families.py` (and Granite, built here) a tiny random model with its
family's tokenizer and chat template is exported in-process (`export_gguf`: the GGUF and its
Ollama Modelfile), loaded once in llama.cpp, and compared by `--verify`'s own llama.cpp check:
next-token logits, greedy continuations, tokenization of plain and chat-rendered text, the
chat template in the file, and that llama.cpp ends generation at every token the run stops at.
The weights are sharpened first (matrices scaled up, norms and biases moved off their initial
values), so a wrong layout rule (Q/K order, norm offset, window, expert split) changes the
logits far beyond the f16 tolerance.

The SentencePiece path is checked with small SentencePiece-style tokenizers built here (Gemma's
shape: no leading space; Llama 2's: a leading space), and the refusals without llama.cpp.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ASSETS
from families import FAMILIES, SPECS, make_family_model

from finesmith.errors import FinesmithError

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="the llama.cpp bindings are not installed: pip install llama-cpp-python "
           "(CI installs the prebuilt wheel from ../shared/wheels in .ci/run)")

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
                 "gemma3": "gemma3", "phi3": "phi3", "olmo2": "olmo2", "granite": "granite"}


def sharpen(model) -> None:
    """Scale matrices up and move norms and biases, deterministically."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
            else:
                param.mul_(4.0)


def make_granite(folder: Path) -> Path:
    """Granite (not in families.py): Llama's layout with attention/embedding/residual/logit multipliers."""
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM

    shutil.copytree(ASSETS / "tokenizer-chatml", folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attention_multiplier=0.05,
                           embedding_multiplier=6.0, residual_multiplier=0.3, logits_scaling=4.0,
                           tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GraniteForCausalLM(config).save_pretrained(folder)
    return folder


def load_sharpened(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sharpen(model)
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=[*FAMILIES, "granite"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(family, model, tokenizer, export folder, files) with the GGUF and Modelfile written."""
    from finesmith.export.gguf import export_gguf

    family = request.param
    root = tmp_path_factory.mktemp(f"gguf-{family}")
    folder = make_granite(root / "model") if family == "granite" else make_family_model(root / "model", family)
    model, tokenizer = load_sharpened(folder)
    files = export_gguf(model, tokenizer, root, f"{family}.gguf", name=family)
    return family, model, tokenizer, root, files


def gguf_fields(path: Path) -> tuple[dict, list[str]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}, [t.name for t in reader.tensors]


@needs_llama_cpp
def test_family_answers_the_same_in_llama_cpp(exported) -> None:
    from finesmith.data.tokenize import prompt_ids
    from finesmith.export.verify import PROBE_CHATS, verify_gguf_in_llama_cpp

    family, model, tokenizer, root, files = exported
    checks = verify_gguf_in_llama_cpp(model, tokenizer, root / files[0], "f16")
    failed = [check.line() for check in checks if not check.ok]
    assert not failed, failed
    # every check ran: logits, greedy, tokens, template, stops (a load failure is one check)
    assert len(checks) == 5
    print(f"{family}: " + "; ".join(check.line() for check in checks))
    if family == "gemma3":  # the probes are longer than the window, so the sliding layer is exercised
        assert max(len(prompt_ids(tokenizer, list(c))) for c in PROBE_CHATS) > model.config.sliding_window


def test_family_file_states_the_architecture_template_and_stops(exported) -> None:
    from finesmith.export.gguf_vocab import model_stop_ids

    family, model, tokenizer, root, files = exported
    fields, tensors = gguf_fields(root / files[0])
    arch = ARCHITECTURES[family]
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == model.config.num_hidden_layers
    assert fields[f"{arch}.vocab_size"] == model.get_input_embeddings().weight.shape[0]
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    stops = model_stop_ids(tokenizer, model.generation_config.eos_token_id)
    marked = {fields.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")}
    end_of_turn = [t for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>") if t in tokenizer.get_vocab()]
    if end_of_turn and tokenizer.convert_tokens_to_ids(end_of_turn[0]) != tokenizer.eos_token_id:
        assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids(end_of_turn[0])
    assert set(stops) - marked <= {tokenizer.convert_tokens_to_ids(t) for t in ("</s>", "<|endoftext|>",
                                                                                  "<|end_of_text|>")}
    tied = model.config.tie_word_embeddings
    assert ("output.weight" in tensors) == (not tied)
    if family == "qwen3_moe":
        assert fields["qwen3moe.expert_count"] == 4 and fields["qwen3moe.expert_used_count"] == 2
        assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"} <= set(tensors)
    if family == "gemma3":
        assert fields["gemma3.attention.sliding_window"] == SPECS["gemma3"].config["sliding_window"]
        assert list(fields["gemma3.attention.sliding_window_pattern"]) == [True, False]


def test_family_modelfile_has_the_chat_format_and_stops(exported) -> None:
    from finesmith.data.tokenize import bos_to_prepend, render
    from finesmith.export.gguf_modelfile import CHECKS, chat_format
    from finesmith.export.gguf_vocab import model_stop_ids

    family, model, tokenizer, root, files = exported
    assert files[1] == "Modelfile"
    text = (root / "Modelfile").read_text(encoding="utf-8")
    assert f"FROM ./{files[0]}\n" in text
    stops = tokenizer.convert_ids_to_tokens(model_stop_ids(tokenizer, model.generation_config.eos_token_id))
    assert [line for line in text.splitlines() if line.startswith("PARAMETER stop")] == \
        [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(stops)]
    # every family's template is a fixed text around each message, so each gets a TEMPLATE...
    found, why = chat_format(tokenizer)
    assert found is not None, why
    assert f'TEMPLATE """{found.go_template()}"""' in text
    # ...that writes what finesmith renders (a BOS the tokenizer adds itself is left to Ollama)
    bos = tokenizer.bos_token if bos_to_prepend(tokenizer) is not None else None
    for conversation in CHECKS:
        try:
            expected = render(tokenizer, list(conversation), add_generation_prompt=True)
        except FinesmithError:  # a template that refuses this shape of conversation
            continue
        expected = expected[len(bos):] if bos and expected.startswith(bos) else expected
        assert found.render(list(conversation)) == expected


@needs_llama_cpp
def test_moe_experts_quantise_to_q8_0_and_stay_within_tolerance(tmp_path: Path) -> None:
    """3-D expert tensors are quantised per row like matrices; llama.cpp reads them back."""
    import gguf

    from finesmith.export.gguf import write_gguf
    from finesmith.export.verify import verify_gguf_in_llama_cpp

    model, tokenizer = load_sharpened(make_family_model(tmp_path / "model", "qwen3_moe"))
    path = write_gguf(model, tokenizer, tmp_path / "q8.gguf", quant="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32  # the router stays exact
    failed = [c.line() for c in verify_gguf_in_llama_cpp(model, tokenizer, path, "q8_0") if not c.ok]
    assert not failed, failed


# --- SentencePiece ----------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def sentencepiece_tokenizer(folder: Path, leading_space: bool):
    """A SentencePiece-style BPE (pieces spelled with ▁, `<0xNN>` byte fallback) as transformers
    converts Gemma's (no leading space) or Llama 2's (a leading space) tokenizer."""
    from assets.make_tokenizers import corpus
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spaces = normalizers.Replace(" ", "\u2581")
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = spaces
    trained.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                              show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if leading_space else spaces
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


@needs_llama_cpp
@pytest.mark.parametrize("leading_space", [False, True], ids=["gemma-style", "llama2-style"])
def test_sentencepiece_tokenizer_tokenizes_the_same_in_llama_cpp(leading_space: bool, tmp_path: Path) -> None:
    import llama_cpp
    from transformers import LlamaConfig, LlamaForCausalLM

    from finesmith.export.gguf import write_gguf
    from finesmith.export.verify import PROBE_TEXTS

    tokenizer = sentencepiece_tokenizer(tmp_path / "tok", leading_space)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf")
    fields, _ = gguf_fields(path)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is leading_space
    texts = [*PROBE_TEXTS, "The quick brown fox jumps over the lazy dog.", "  two  spaces  ", "\n\nnew lines\n",
             "tabs\tand\r\nCRLF 🙂 中文", "x<|im_end|> after a special token", "What is the capital of France?",
             tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                           add_generation_prompt=True)]
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tokenizer(text, add_special_tokens=False)["input_ids"], text
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
        ids = tokenizer("ünïcödé ✓ 中文 x", add_special_tokens=False)["input_ids"]
        assert "<0xE4>" in tokenizer.convert_ids_to_tokens(ids)  # characters outside the vocabulary: bytes
        assert llm.detokenize(ids).decode().strip() == tokenizer.decode(ids).strip()
    finally:
        llm.close()


# --- refusals (no llama.cpp needed) -----------------------------------------------------------

@pytest.mark.parametrize("family, change, reason", [
    ("qwen3_moe", {"norm_topk_prob": False}, "renormalises the top-k expert weights"),
    ("qwen2", {"use_sliding_window": True}, "without a sliding window"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "no attention logit soft-capping"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 64}}, "rope_type 'yarn'"),
])
def test_configs_llama_cpp_would_compute_differently_are_refused(family: str, change: dict, reason: str) -> None:
    from transformers import AutoTokenizer

    from families import family_config
    from finesmith.export.gguf import check_exportable

    config = family_config(family, AutoTokenizer.from_pretrained(ASSETS / f"tokenizer-{SPECS[family].tokenizer}"))
    check_exportable(config)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(FinesmithError, match=reason):
        check_exportable(config)


def test_tokenizers_llama_cpp_would_split_differently_are_refused(tmp_path: Path) -> None:
    from tokenizers import pre_tokenizers

    from finesmith.export.gguf_vocab import build_vocab

    tokenizer = sentencepiece_tokenizer(tmp_path / "spm", leading_space=False)
    backend = tokenizer.backend_tokenizer
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    with pytest.raises(FinesmithError, match="prepend_scheme first"):
        build_vocab(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(FinesmithError, match="byte-level BPE and SentencePiece BPE"):
        build_vocab(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


@needs_llama_cpp
@pytest.mark.parametrize("strips", [True, False], ids=["rstrip", "no-rstrip"])
def test_whitespace_after_markers_is_stripped_in_llama_cpp_exactly_when_the_tokenizer_does(
        strips: bool, tmp_path: Path) -> None:
    """llama.cpp strips after special tokens only for a model *named* Phi-3; the name is set to match."""
    import llama_cpp
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finesmith.export.gguf import write_gguf

    shutil.copytree(ASSETS / "tokenizer-phi35", tmp_path, dirs_exist_ok=True)
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    for token in spec["added_tokens"]:
        token["rstrip"] = strips and token["content"] not in ("<unk>", "<s>", "<|endoftext|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", name="my-phi3-run" if not strips else "my-run")
    text = "<|user|>\nHi there<|end|>\n<|assistant|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (tokenizer.convert_tokens_to_ids("\u010a") in ids) is not strips  # the newline after a marker
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    finally:
        llm.close()
