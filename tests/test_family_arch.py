"""Every architecture family trains, packs, merges and shards correctly (tiny models of tests/families.py).

In-process and fast: one tiny model per family, built once per test session. The CLI matrix
(fresh processes, export --verify, GGUF) lives elsewhere and uses the same builder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from families import FAMILIES, SHARED_TEMPLATES, TEMPLATE_FILES, make_family_model, own_template
from finesmith.advise.model_shape import ModelShape
from finesmith.config import TrainConfig
from finesmith.data.pack import pack_batch
from finesmith.data.tokenize import TokenizedExample
from finesmith.model.attention import attention_inputs, pack_varlen, use_varlen
from finesmith.model.load import load_model
from finesmith.model.merge import merge_adapter
from finesmith.model.methods import apply_method, count_parameters, expert_parameters
from finesmith.train.distributed import shard_units
from finesmith.train.objectives import sft_loss

ATTENTION = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
GATED_MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
# What LoRA `all-linear` adapts in every decoder block, by family (names relative to the block).
ALL_LINEAR = {family: ATTENTION | GATED_MLP for family in FAMILIES}
ALL_LINEAR["phi3"] = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
# MoE: attention, the router, and every expert (the fused 3-D expert weights, as parameters).
ALL_LINEAR["qwen3_moe"] = ATTENTION | {"mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
LENGTHS = (40, 23, 7)  # longer and shorter than Gemma 3's tiny sliding window (16)


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_family_model(root / family, family) for family in FAMILIES}


def examples(vocab: int, seed: int = 0) -> list[TokenizedExample]:
    """Random token rows of `LENGTHS`, the first three tokens of each untrained."""
    g = torch.Generator().manual_seed(seed)
    return [TokenizedExample(tuple(torch.randint(10, vocab, (n,), generator=g).tolist()),
                             (False,) * 3 + (True,) * (n - 3), "test") for n in LENGTHS]


def separate_loss(model, rows: list[TokenizedExample]) -> torch.Tensor:
    """Summed next-token loss of each example run alone through the model's own forward (its own masks)."""
    total = torch.zeros(())
    for ex in rows:
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
        targets = torch.tensor(ex.input_ids[1:])
        keep = torch.tensor(ex.supervised[1:])
        total = total + F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return total


def adapted_names(model) -> set[str]:
    """Names (relative to the decoder block) of what an adapter wraps, over every block."""
    tuner = model.base_model
    names = list(tuner.targeted_module_names) + list(getattr(tuner, "targeted_parameter_names", []))
    return {name.split(".layers.", 1)[1].split(".", 1)[1] for name in names if ".layers." in name}


@pytest.mark.skipif(not SHARED_TEMPLATES.is_dir(), reason="../shared/templates is not here")
@pytest.mark.parametrize("stem", [s for s in TEMPLATE_FILES if s != "olmo2"])
def test_own_template_renders_like_the_real_one(stem):
    """finesmith's restatement of a family's rules renders every conversation as the real template does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).parent / "assets" / "tokenizer-chatml")
    real = (SHARED_TEMPLATES / f"{stem}.jinja").read_text(encoding="utf-8")
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    result = {"role": "tool", "tool_call_id": "abc123XYZ", "content": "sunny"}
    system, user, answer = ({"role": r, "content": c} for r, c in
                            (("system", " Be brief. "), ("user", "q1"), ("assistant", "a1")))
    conversations = [[user, answer], [system, user, answer], [system, user, answer, {"role": "user", "content": " q2 "},
                                                              {"role": "assistant", "content": "<think>\nr\n</think>\n\na2"}],
                     [user, {"role": "assistant", "content": "a", "reasoning_content": "why"}, user],
                     [system, user, call, result, answer], [user, answer, answer]]
    for conversation in conversations:
        for options in ({}, {"add_generation_prompt": True}, {"tools": [tool]}, {"enable_thinking": False,
                                                                                 "add_generation_prompt": True}):
            rendered = []
            for template in (real, own_template(stem)):
                try:
                    rendered.append(tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                                  date_string="01 Jan 2025", **options))
                except Exception as exc:  # the real template refuses: the copy must refuse the same way
                    rendered.append(f"{type(exc).__name__}: {exc}")
            assert rendered[0] == rendered[1], (conversation, options)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_adapts_what_users_expect(family, family_folders):
    """LoRA all-linear reaches every linear projection of every block (fused ones, experts and router included),
    and the advisor counts exactly the adapter parameters peft creates."""
    model = apply_method(load_model(str(family_folders[family])), TrainConfig(method="lora"))
    assert adapted_names(model) == ALL_LINEAR[family]
    config = json.loads((family_folders[family] / "config.json").read_text())
    assert ModelShape.from_config_dict(config).lora_params(16) == count_parameters(model)[0]


def test_experts_get_adapters_where_peft_does_not_convert_the_model():
    """gpt-oss stores its experts as fused parameters and peft's v4→v5 conversion does not know it: all-linear
    still adapts them (and the advisor would have counted them)."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    config = GptOssConfig(vocab_size=100, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, eos_token_id=1, pad_token_id=0, bos_token_id=2)
    base = AutoModelForCausalLM.from_config(config)
    assert expert_parameters(base) == ["down_proj", "gate_up_proj"]
    model = apply_method(base, TrainConfig(method="lora"))
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= adapted_names(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_equal_separate_examples(family, family_folders):
    """Dense block masks and variable-length rows both give each example the logits and loss it has alone,
    sliding-window layers included (examples longer than Gemma 3's window)."""
    model = load_model(str(family_folders[family])).eval()
    rows = examples(model.config.vocab_size)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ex.input_ids])).logits[0] for ex in rows]
        reference = separate_loss(model, rows)
        for layout, batch in (("dense", pack_batch(rows)), ("varlen", pack_varlen(rows))):
            if layout == "varlen":
                use_varlen(model)
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           **attention_inputs(batch)).logits[0]
            starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
            for ex, start, logits in zip(rows, starts, alone):
                assert torch.allclose(packed[start:start + len(ex.input_ids)], logits, atol=2e-5), (layout, len(ex))
            loss, count = sft_loss(model, batch)
            assert count == sum(sum(ex.supervised[1:]) for ex in rows)
            assert torch.allclose(loss, reference, rtol=1e-5), layout


def test_sliding_window_counts_positions_inside_a_token_trie(family_folders):
    """Label scoring and preference pairs share a prompt in one row: each branch sees the prompt and its own
    tokens. Gemma 3's sliding-window layers must count distance by position along the branch, as when the
    prompt and the branch run alone."""
    model = load_model(str(family_folders["gemma3"])).eval()
    g = torch.Generator().manual_seed(3)
    prompt, first, second = (torch.randint(10, 590, (n,), generator=g) for n in (20, 10, 12))
    ids = torch.cat([prompt, first, second])[None]
    positions = torch.cat([torch.arange(20), torch.arange(20, 30), torch.arange(20, 32)])[None]
    n = ids.shape[1]
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:30, :30] = torch.ones(30, 30, dtype=torch.bool).tril()  # the prompt, then the first branch
    mask[30:, :20] = True  # the second branch sees the prompt ...
    mask[30:, 30:] = torch.ones(12, 12, dtype=torch.bool).tril()  # ... and itself, not the first branch
    with torch.no_grad():
        row = model(input_ids=ids, position_ids=positions, attention_mask=mask[None, None]).logits[0]
        alone_first = model(input_ids=torch.cat([prompt, first])[None]).logits[0]
        alone_second = model(input_ids=torch.cat([prompt, second])[None]).logits[0]
    assert torch.allclose(row[:30], alone_first, atol=2e-5)
    assert torch.allclose(row[30:], alone_second[20:], atol=2e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_and_lora_merges_exactly(family, method, family_folders):
    """A few optimizer steps on one packed batch lower the loss; a trained LoRA merges into plain weights
    that compute the adapted model's logits."""
    torch.manual_seed(0)
    model = apply_method(load_model(str(family_folders[family])), TrainConfig(method=method))
    cycle = [101, 202, 303, 404, 505, 123] * 10  # a pattern a tiny random model can pick up in a few steps
    batch = pack_batch([TokenizedExample(tuple(cycle[:n]), (False,) * 3 + (True,) * (n - 3), "test") for n in LENGTHS])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(10):
        loss, count = sft_loss(model, batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach() / count))
    assert losses[-1] < 0.92 * losses[0], losses
    if method == "lora":
        model.eval()
        probe = torch.tensor([examples(100, seed=2)[0].input_ids])
        with torch.no_grad():
            adapted = model(input_ids=probe).logits
            merged = merge_adapter(model)
            assert not hasattr(merged, "peft_config")
            assert torch.allclose(merged(input_ids=probe).logits, adapted, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_shards_each_decoder_block(family, family_folders):
    model = load_model(str(family_folders[family]))
    assert shard_units(model) == list(model.model.layers)


def test_advisor_sizes_moe_by_total_and_active_parameters(family_folders):
    """Published sizes: Qwen3-30B-A3B (30.5B, 3.3B active) and Mixtral 8x7B (46.7B, 12.9B active); the tiny MoE's
    count equals its real parameters less the q/k norms; compute follows the active parameters."""
    from finesmith.advise.timing import flops_per_token

    qwen = ModelShape.from_config_dict({
        "model_type": "qwen3_moe", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "num_hidden_layers": 48, "vocab_size": 151936, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "tie_word_embeddings": False})
    assert round(qwen.params / 1e9, 1) == 30.5 and round(qwen.active_params / 1e9, 1) == 3.4
    mixtral = ModelShape.from_config_dict({
        "model_type": "mixtral", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_hidden_layers": 32, "vocab_size": 32000, "intermediate_size": 14336, "num_local_experts": 8,
        "num_experts_per_tok": 2})
    assert round(mixtral.params / 1e9, 1) == 46.7 and round(mixtral.active_params / 1e9, 1) == 12.9
    assert flops_per_token(qwen, "full", 0) == 6 * qwen.active_params
    folder = family_folders["qwen3_moe"]
    tiny = ModelShape.from_config_dict(json.loads((folder / "config.json").read_text()))
    model = load_model(str(folder))
    norms = sum(p.numel() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n)
    assert tiny.params == count_parameters(model)[1] - norms
    assert tiny.experts == 4 and tiny.experts_per_token == 2 and tiny.active_params < tiny.params
