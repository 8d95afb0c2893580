"""The training loop's math: packing keeps examples apart; accumulation is exact."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QA
from finesmith.data.formats import Example
from finesmith.data.pack import IGNORE, pack_batch
from finesmith.data.tokenize import tokenize_examples
from finesmith.train.objectives import sft_loss


def tokenized(tiny_model, n=8):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = [Example(({"role": "user", "content": q}, {"role": "assistant", "content": a}), f"t:{i}")
                for i, (q, a) in enumerate(QA[:n])]
    return tokenize_examples(tokenizer, examples, max_length=128)[0]


def load(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()  # no dropout; the math is what is tested
    return model


def test_pack_batch_layout(tiny_model):
    data = tokenized(tiny_model, 3)
    batch = pack_batch(data)
    lens = [len(d) for d in data]
    assert batch["input_ids"].shape == (1, sum(lens))
    assert batch["position_ids"][0, : lens[0]].tolist() == list(range(lens[0]))
    assert batch["position_ids"][0, lens[0]] == 0
    mask = batch["attention_mask"][0, 0]
    assert not mask[lens[0], lens[0] - 1]  # first token of example 2 cannot see example 1
    assert mask[lens[0] + 1, lens[0]]
    # The last token of an example never predicts the first token of the next.
    assert batch["targets"][0, lens[0] - 1] == IGNORE


def test_packed_loss_equals_one_by_one(tiny_model):
    model = load(tiny_model)
    data = tokenized(tiny_model)
    with torch.no_grad():
        packed_sum, packed_n = sft_loss(model, pack_batch(data))
        parts = [sft_loss(model, pack_batch([d])) for d in data]
    separate_sum = sum(p[0] for p in parts)
    assert int(packed_n) == sum(int(p[1]) for p in parts)
    torch.testing.assert_close(packed_sum, separate_sum, rtol=1e-5, atol=1e-5)


def grads_after_step(model, data, batch_size, accum):
    """Gradient of one optimizer step as the loop computes it (sum / step tokens)."""
    model.zero_grad()
    micro = [pack_batch(data[i:i + batch_size]) for i in range(0, batch_size * accum, batch_size)]
    step_tokens = sum(int((b["targets"] != IGNORE).sum()) for b in micro)
    for batch in micro:
        loss_sum, _ = sft_loss(model, batch)
        (loss_sum / step_tokens).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_batch8_accum1_equals_batch1_accum8(tiny_model):
    model = load(tiny_model)
    data = tokenized(tiny_model)
    big = grads_after_step(model, data, 8, 1)
    small = grads_after_step(copy.deepcopy(model), data, 1, 8)
    for name in big:
        torch.testing.assert_close(big[name], small[name], rtol=1e-4, atol=1e-6, msg=name)


def test_rows_of_a_token_budget_give_the_same_loss_and_gradients(tiny_model):
    model = load(tiny_model)
    data = tokenized(tiny_model)
    budget = max(len(d) for d in data) + 5  # forces several rows, some with padding slots
    rows = pack_batch(data, row_tokens=budget)
    assert rows["input_ids"].shape[0] > 1 and rows["input_ids"].shape[1] <= budget
    assert int(rows["seq_lens"].sum()) == sum(len(d) for d in data)
    grads = []
    for batch in (pack_batch(data, row_tokens=None), rows):
        model.zero_grad()
        loss_sum, n = sft_loss(model, batch)
        loss_sum.backward()
        grads.append((loss_sum.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (one_loss, one_n, one_grads), (rows_loss, rows_n, rows_grads) = grads
    assert one_n == rows_n
    torch.testing.assert_close(one_loss, rows_loss, rtol=1e-5, atol=1e-5)
    for name in one_grads:
        torch.testing.assert_close(one_grads[name], rows_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_rows_run_one_at_a_time_give_the_same_gradients(tiny_model):
    from finesmith.data.pack import split_rows

    model = load(tiny_model)
    data = tokenized(tiny_model)
    batch = pack_batch(data, row_tokens=max(len(d) for d in data) + 5)
    model.zero_grad()
    sft_loss(model, batch)[0].backward()
    together = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    rows = split_rows(batch)
    assert len(rows) == batch["input_ids"].shape[0] > 1
    assert sum(r["input_ids"].shape[1] for r in rows) == int(batch["seq_lens"].sum())  # padding trimmed
    for row in rows:
        sft_loss(model, row)[0].backward()
    for name, grad in together.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_log_reports_model_flops_utilisation_when_the_peak_is_known(tiny_model, tmp_path):
    import json

    from finesmith.train.loop import LoopSettings, fit

    settings = LoopSettings(lr=1e-3, total_steps=2, batch_size=4, log_every=1, flops_per_token=2e6, peak_flops=1e12)
    fit(load(tiny_model), tokenized(tiny_model), settings, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert logged and all(r["mfu"] == round(r["tokens_per_s"] * 2e6 / 1e12, 4) for r in logged)


def test_embeddings_can_learn_at_a_lower_rate(tiny_model):
    from finesmith.train.optim import build_optimizer

    model = load(tiny_model)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, embedding_lr_ratio=0.1)
    embedding = model.get_input_embeddings().weight
    rates = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert rates[id(embedding)] == (1e-4, 0.1)
    assert rates[id(model.model.layers[0].mlp.up_proj.weight)] == (1e-3, 0.1)
    assert rates[id(model.model.norm.weight)] == (1e-3, 0.0)
    assert len(rates) == sum(1 for p in model.parameters() if p.requires_grad)
