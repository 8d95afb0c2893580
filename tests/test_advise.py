"""The advisor: model shape arithmetic, memory components, the decision rules on hand-made
scenarios, the advise command's written config, and the dry run's fit check."""

from __future__ import annotations

import pytest

from conftest import chat, write_jsonl
from finesmith.advise.datastats import DataStats
from finesmith.advise.hardware import GIB, Hardware
from finesmith.advise.memory import RunShape, estimate_memory
from finesmith.advise.model_shape import ModelShape, read_model_shape
from finesmith.advise.rules import Plan, recommend
from finesmith.advise.timing import estimate_time
from finesmith.cli import main
from finesmith.config import load_config

LLAMA_7B = ModelShape.from_config_dict({
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}, name="llama-7b")
ONE_B = ModelShape.from_config_dict({
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}, name="llama-1b")


def gpu(gib: float, name: str = "NVIDIA A100-SXM4-80GB") -> Hardware:
    return Hardware("cuda", name, int(gib * GIB), 64 * GIB, 16)


def test_parameter_counts_match_the_real_models(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert read_model_shape(tiny_model).params == sum(p.numel() for p in model.parameters())
    assert 6.6e9 < LLAMA_7B.params < 6.8e9  # Llama-2-7B has 6.74B


def test_memory_components_follow_the_method():
    full = estimate_memory(LLAMA_7B, RunShape("full", 2048, 1000, "cuda"))
    lora = estimate_memory(LLAMA_7B, RunShape("lora", 2048, 1000, "cuda"))
    qlora = estimate_memory(LLAMA_7B, RunShape("qlora", 2048, 1000, "cuda"))
    assert full.components["optimizer"] == 8 * LLAMA_7B.params
    assert full.components["gradients"] == 4 * LLAMA_7B.params
    assert lora.components["gradients"] == 4 * LLAMA_7B.lora_params(16)
    assert qlora.components["weights"] < lora.components["weights"] / 6
    assert full.peak > lora.peak > qlora.peak
    eight_bit = estimate_memory(LLAMA_7B, RunShape("full", 2048, 1000, "cuda", optimizer="adamw_8bit"))
    assert eight_bit.components["optimizer"] == 2 * LLAMA_7B.params


def test_checkpointing_and_supervised_logits_shrink_activations():
    plain = estimate_memory(ONE_B, RunShape("lora", 8192, 4096, "cuda"))
    ckpt = estimate_memory(ONE_B, RunShape("lora", 8192, 4096, "cuda", checkpointing=True))
    assert ckpt.components["activations"] < plain.components["activations"] / 5
    fewer = estimate_memory(ONE_B, RunShape("lora", 8192, 512, "cuda"))
    assert fewer.components["logits"] * 8 == plain.components["logits"]


def test_time_states_its_source():
    flops = estimate_time(ONE_B, "lora", 10**6, 512, gpu(80, "NVIDIA H100 80GB HBM3"))
    assert "H100" in flops.source
    calibrated = estimate_time(ONE_B, "lora", 10**6, 512, gpu(80), calibrated_tokens_per_second=1000.0)
    assert calibrated.source == "calibrated on this machine" and calibrated.seconds_per_epoch == 1000.0


def plan(hardware, shape, data, **kw):
    return recommend(Plan(hardware, shape, data, **kw))


def test_rule_few_examples_small_gpu_prompts_or_tunes_a_prompt():
    data = DataStats.synthetic(40, 200)
    assert plan(gpu(8, "NVIDIA RTX 4060"), ONE_B, data).approach == "few_shot"
    assert plan(gpu(8, "NVIDIA RTX 4060"), ONE_B, data, goal="max-quality").approach == "prompt_tuning"


def test_rule_much_data_big_gpu_max_quality_trains_everything():
    rec = plan(gpu(80), ONE_B, DataStats.synthetic(50_000, 400), task="generation", goal="max-quality")
    assert rec.approach == "full"
    assert [r.split(":")[0] for r in rec.reasons] == [
        "available resources", "dataset size", "task specificity", "performance requirement"]


def test_rule_7b_on_16gb_needs_qlora():
    rec = plan(gpu(16, "NVIDIA T4"), LLAMA_7B, DataStats.synthetic(5_000, 512))
    assert rec.approach == "qlora"
    assert not rec.estimates["lora"].fits and not rec.estimates["full"].fits


def test_rule_large_domain_corpus_pretrains_then_tunes():
    corpus = DataStats.synthetic(4_000, 1024, raw_text=True)
    assert plan(gpu(80), ONE_B, corpus, task="domain").approach == "cpt_sft"
    assert plan(gpu(80), ONE_B, corpus, task="generation").approach != "cpt_sft"


def test_rule_nothing_fits_falls_back_to_prompting():
    rec = plan(Hardware("cpu", None, 0, 2 * GIB, 2), LLAMA_7B, DataStats.synthetic(5_000, 512))
    assert rec.approach == "few_shot" and rec.rule.startswith("R7")


def test_time_budget_rules_out_slow_approaches():
    data = DataStats.synthetic(50_000, 400)
    rec = plan(gpu(80, "NVIDIA T4"), ONE_B, data, goal="max-quality", time_budget_hours=0.01)
    assert not rec.estimates["full"].fits and "budget" in rec.estimates["full"].why_not


def test_advise_recommends_lora_for_the_demo_data_and_writes_a_runnable_config(tiny_model, tmp_path, capsys):
    from finesmith.demo import demo_data

    out = tmp_path / "advised.yaml"
    code = main(["advise", "--model", tiny_model, "--data", demo_data()[0], "--task", "classification",
                 "--write-config", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "recommendation: LoRA" in stdout
    for criterion in ("available resources", "dataset size", "task specificity", "performance requirement"):
        assert criterion in stdout
    config = load_config(str(out))
    assert config.method == "lora" and config.model == tiny_model


def test_dry_run_fits_then_refuses_a_tiny_budget(tiny_model, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"question {i}?", f"answer {i}") for i in range(12)])
    args = ["train", "--model", tiny_model, "--data", data, "--output", str(tmp_path / "run"), "--dry-run"]
    assert main(args) == 0
    assert "fits; nothing was trained" in capsys.readouterr().out
    assert not (tmp_path / "run" / "config.yaml").exists()
    monkeypatch.setenv("FINESMITH_MEMORY_GB", "0.1")
    assert main(args + ["--method", "full"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: predicted peak memory") and len(err.splitlines()) == 1
    assert "lower batch_size" in err or "method=" in err or "gradient_checkpointing" in err
