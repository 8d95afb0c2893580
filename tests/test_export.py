"""Export: merged HF folder, PEFT adapter and GGUF, each checked numerically against the run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import QA, chat, write_jsonl

from finesmith.cli import main
from finesmith.errors import FinesmithError
from finesmith.export import verify as verify_module
from finesmith.export.gguf import check_exportable, permute_for_rope
from finesmith.model.load import load_model
from finesmith.model.methods import load_for_inference

PROMPTS = ["<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n", "Hello world, 12345!"]


def train_run(root: Path, model: str, method: str) -> Path:
    data = write_jsonl(root / f"train-{method}.jsonl", [chat(q, a) for q, a in QA])
    out = root / f"run-{method}"
    # A high learning rate so two steps move the weights visibly away from the base.
    code = main(["train", "--model", model, "--data", data, "--method", method, "--output", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--seed", "0"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("export-lora"), tiny_model, "lora")


@pytest.fixture(scope="module")
def full_run(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("export-full"), tiny_model, "full")


def logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def max_diff(a, b, tokenizer) -> float:
    return max((logits(a, tokenizer, p) - logits(b, tokenizer, p)).abs().max().item() for p in PROMPTS)


def test_hf_export_of_lora_equals_adapter_on_base(lora_run: Path, tiny_model: str, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(lora_run), "--format", "hf", "--output", str(out), "--verify"]) == 0
    assert "ok   max |logit diff| merged vs run" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    reference, tokenizer = load_for_inference(str(lora_run))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_diff(reference, merged, tokenizer) <= 1e-4
    # ...and the adapter matters, so the equality above is not trivially true.
    assert max_diff(load_model(tiny_model).eval(), merged, tokenizer) > 1e-3

    exported_tokenizer = AutoTokenizer.from_pretrained(out)
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_model_card_names_base_method_data_hashes_and_metrics(lora_run: Path, tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "--format", "adapter", "--output", str(out)]) == 0
    card = (out / "README.md").read_text()
    data = lora_run.parent / "train-lora.jsonl"
    assert hashlib.sha256(data.read_bytes()).hexdigest() in card
    assert tiny_model in card and "| method | lora |" in card and "finesmith 0.1.0" in card
    last_loss = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)][-1]["loss"]
    assert f"- loss: {last_loss}" in card


def test_adapter_export_reloads_with_plain_peft(lora_run: Path, tiny_model: str, tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "--format", "adapter", "--output", str(out), "--verify"]) == 0
    reference, tokenizer = load_for_inference(str(lora_run))
    reloaded = PeftModel.from_pretrained(load_model(tiny_model), str(out)).eval()
    assert max_diff(reference, reloaded, tokenizer) == 0.0
    assert (out / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def gguf_f16(lora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf-f16")
    assert main(["export", str(lora_run), "--format", "gguf", "--output", str(out), "--overwrite"]) == 0
    return out / f"{lora_run.name}-f16.gguf"


def test_gguf_f16_round_trip(lora_run: Path, gguf_f16: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(gguf_f16.parent, gguf_file=gguf_f16.name,
                                                    dtype=torch.float32).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(gguf_f16.parent, gguf_file=gguf_f16.name)
    reference, tokenizer = load_for_inference(str(lora_run))
    merged = reference.merge_and_unload()

    # Weights come back exactly as f16-rounded originals: the Q/K permutation is undone exactly.
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                "model.embed_tokens.weight", "model.norm.weight"):
        expected = merged.state_dict()[key]
        expected = expected if expected.ndim == 1 else expected.half().float()
        assert torch.equal(reloaded.state_dict()[key], expected), key
    assert max_diff(merged, reloaded, tokenizer) <= 1e-3  # logits here are O(1)

    for text in ["Hello world", " two  spaces", "<|im_start|>user\nhi<|im_end|>\n", "12345 ünïcödé ✓"]:
        assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert reloaded_tokenizer.eos_token == "<|im_end|>" and reloaded_tokenizer.bos_token == "<|im_start|>"
    assert "| method | lora |" in (gguf_f16.parent / "README.md").read_text()


def test_gguf_verify_passes_for_q8_0_and_file_is_smaller(lora_run: Path, gguf_f16: Path, tmp_path: Path,
                                                         capsys) -> None:
    out = tmp_path / "q8"
    assert main(["export", str(lora_run), "--format", "gguf", "--quant", "q8_0", "--output", str(out),
                 "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "ok   max |logit diff| / max |logit|, gguf q8_0 vs run" in printed
    assert "ok   tokenizer mismatches: 0" in printed
    assert (out / f"{lora_run.name}-q8_0.gguf").stat().st_size < gguf_f16.stat().st_size


def test_verify_fails_when_out_of_tolerance(lora_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(verify_module.LOGIT_TOLERANCE, "f16", 0.0)
    code = main(["export", str(lora_run), "--format", "gguf", "--output", str(tmp_path / "g"), "--verify"])
    captured = capsys.readouterr()
    assert code == 1 and "FAIL max |logit diff| / max |logit|, gguf f16" in captured.out
    assert "beyond tolerance" in captured.err


def test_full_run_exports_unchanged_and_has_no_adapter(full_run: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert main(["export", str(full_run), "--format", "hf", "--output", str(out), "--verify"]) == 0
    reference, tokenizer = load_for_inference(str(full_run))
    assert max_diff(reference, AutoModelForCausalLM.from_pretrained(out).eval(), tokenizer) == 0.0
    assert "| method | full |" in (out / "README.md").read_text()

    capsys.readouterr()
    assert main(["export", str(full_run), "--format", "adapter", "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "full fine-tune with no adapter" in err


def test_export_refuses_to_overwrite_and_bad_runs(lora_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(lora_run), "--format", "hf", "--output", str(out)]) == 2
    assert main(["export", str(tmp_path / "missing"), "--format", "hf", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not empty" in err[0] and "run folder not found" in err[1]
    assert (out / "keep.txt").read_text() == "mine"


def test_gguf_refuses_other_architectures() -> None:
    from transformers import GPT2Config

    with pytest.raises(FinesmithError, match="GGUF export supports .*qwen3_moe.*; this model is 'gpt2'"):
        check_exportable(GPT2Config())


def test_rope_permutation_matches_the_inverse_transformers_applies() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.arange(8 * 6 * 3, dtype=torch.float32).reshape(8 * 6, 3).numpy()
    processor = LlamaTensorProcessor({"num_attention_heads": 6, "num_key_value_heads": 2})
    for name, heads in (("blk.0.attn_q.weight", 6), ("blk.0.attn_k.weight", 2)):
        permuted = permute_for_rope(weight, heads)
        assert not (permuted == weight).all()
        assert (processor.process(permuted, name).weights == weight).all()


def test_gguf_refuses_rope_it_cannot_store() -> None:
    from transformers import LlamaConfig

    for rope, reason in (({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_type 'yarn'"),
                         ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "rope_type 'dynamic'"),
                         ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, "whole head")):
        with pytest.raises(FinesmithError, match=reason):
            check_exportable(LlamaConfig(rope_parameters=rope))
    check_exportable(LlamaConfig(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "rope_theta": 5e5,
                                                  "original_max_position_embeddings": 64}))


def tiny_llama(tokenizer_folder: Path, **config):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(LlamaConfig(**(settings | config))).eval(), tokenizer


def test_gguf_writes_the_head_whenever_it_differs_from_the_embedding(tiny_model: str) -> None:
    from finesmith.export.gguf import gguf_tensors

    model, _ = tiny_llama(Path(tiny_model))
    assert "output.weight" not in dict(gguf_tensors(model))
    # A head trained apart from a tied embedding, with a config that still says "tied"
    # (what an older peft leaves after merging): the trained head must be written.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 0.01)
    assert model.config.tie_word_embeddings
    written = dict(gguf_tensors(model))
    assert (written["output.weight"] == model.lm_head.weight.detach().numpy()).all()


def test_gguf_states_an_explicit_head_size(tiny_model: str, tmp_path: Path) -> None:
    import gguf
    from transformers import AutoModelForCausalLM

    from finesmith.export.gguf import write_gguf

    model, tokenizer = tiny_llama(Path(tiny_model), head_dim=32)  # hidden / heads would be 16
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf")
    fields = {name: f.contents() for name, f in gguf.GGUFReader(str(path)).fields.items()}
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 32
    assert fields["llama.rope.dimension_count"] == 32 and fields["llama.vocab_size"] == len(tokenizer)
    assert fields["tokenizer.ggml.add_eos_token"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert max_diff(model, reloaded, tokenizer) <= 1e-3


def test_lora_on_a_tied_head_merges_without_moving_the_embedding(tiny_model: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from finesmith.export.merge import save_merged

    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    run = tmp_path / "run"
    assert main(["train", "lora.target_modules=[q_proj,v_proj,lm_head]", "--model", tiny_model, "--data", data,
                 "--method", "lora", "--output", str(run), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2",
                 "--seed", "0"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(save_merged(run, tmp_path / "merged"), dtype=torch.float32).eval()
    reference, tokenizer = load_for_inference(str(run))
    assert max_diff(reference, merged, tokenizer) <= 1e-4
    base = load_model(tiny_model)
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not merged.config.tie_word_embeddings
