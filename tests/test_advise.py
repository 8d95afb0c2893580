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
    # CUDA: the frozen base in bf16, the adapters in fp32; NF4 is ~4x smaller still
    assert lora.components["weights"] == 2 * LLAMA_7B.params + 4 * LLAMA_7B.lora_params(16)
    assert qlora.components["weights"] < lora.components["weights"] / 3
    assert full.peak > lora.peak > qlora.peak
    eight_bit = estimate_memory(LLAMA_7B, RunShape("full", 2048, 1000, "cuda", optimizer="adamw_8bit"))
    assert eight_bit.components["optimizer"] == 2 * LLAMA_7B.params


def test_several_gpus_shard_full_fine_tuning_and_replicate_adapters():
    one = estimate_memory(LLAMA_7B, RunShape("full", 2048, 1000, "cuda"))
    four = estimate_memory(LLAMA_7B, RunShape("full", 2048, 1000, "cuda", gpus=4, sharded=True))
    for key in ("weights", "gradients", "optimizer"):  # FSDP2: a quarter of the state on each GPU
        assert four.components[key] == pytest.approx(one.components[key] / 4, abs=1)
    block = LLAMA_7B.linear_params // 32 + 2 * 4096
    root = LLAMA_7B.params - 32 * block  # embeddings, LM head, final norm
    assert four.components["gathered weights"] == 2 * (root + 2 * block)  # bf16 gathers on CUDA
    assert four.components["activations"] == one.components["activations"]
    ddp = estimate_memory(LLAMA_7B, RunShape("lora", 2048, 1000, "cuda", gpus=4))
    lora = estimate_memory(LLAMA_7B, RunShape("lora", 2048, 1000, "cuda"))
    assert ddp.components["weights"] == lora.components["weights"]  # a replica per GPU
    assert ddp.peak == lora.peak + ddp.components["gradient buckets"]


def test_more_gpus_shard_full_fine_tuning_and_are_named_instead_of_qlora():
    import dataclasses

    data = DataStats.synthetic(50_000, 512)
    h100 = gpu(80, "NVIDIA H100 80GB HBM3")
    single = plan(h100, LLAMA_7B, data, goal="max-quality")
    assert not single.estimates["full"].fits and single.approach == "lora"
    assert "full fine-tuning fits on 2 of these GPUs with FSDP" in single.scale_out
    four = plan(dataclasses.replace(h100, gpus=4), LLAMA_7B, data, goal="max-quality")
    assert four.approach == "full" and four.estimates["full"].parallelism == "fsdp"
    assert four.estimates["lora"].parallelism == "ddp"
    # time: the one-GPU time over 4 GPUs at the stated scaling efficiency
    hours = [p.estimates["full"].time.seconds_per_epoch for p in (single, four)]
    assert hours[1] == pytest.approx(hours[0] / (4 * 0.9)) and "over 4 GPUs" in four.estimates["full"].time.source
    t4 = plan(gpu(16, "NVIDIA T4"), LLAMA_7B, DataStats.synthetic(5_000, 512))
    assert t4.approach == "qlora" and "more GPUs instead of 4-bit weights: LoRA fits on 2" in t4.scale_out


def test_advise_plans_for_several_gpus_and_writes_the_launch(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", "a") for i in range(10_000)])
    out = tmp_path / "plan.yaml"
    assert main(["advise", "--model", tiny_model, "--data", data, "--gpu-memory", "80", "--gpus", "4",
                 "--goal", "max-quality", "--write-config", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 × GPU" in printed and "memory per GPU over 4 GPUs" in printed
    assert "--nproc-per-node 4" in out.read_text() and load_config(str(out)).parallelism == "fsdp"
    assert main(["advise", "--model", tiny_model, "--data", data, "--gpus", "2"]) == 2  # no GPU, no memory given
    assert "--gpus plans for GPUs and this machine has none" in capsys.readouterr().err


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
