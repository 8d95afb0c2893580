"""The GPU lane, tested where it can run: the chunked loss equals the full one (loss and
gradients), the training precision policy, and the device script in its reduced CPU mode.
CUDA-only pieces skip with the reason."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QA
from finesmith.config import TrainConfig
from finesmith.data.pack import pack_batch
from finesmith.model.methods import apply_method, load_base_model
from finesmith.train import objectives
from finesmith.train.objectives import chunked_cross_entropy, sft_loss

ROOT = Path(__file__).resolve().parents[1]


def model_for(tiny_model, method):
    config = TrainConfig(model=tiny_model, data="-", output="-", method=method)
    config.lora.r, config.lora.dropout = 4, 0.0
    torch.manual_seed(0)
    return apply_method(load_base_model(config, "cpu"), config)


def batch_of(tiny_model):
    from transformers import AutoTokenizer

    from finesmith.data.formats import Example
    from finesmith.data.tokenize import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = [Example(({"role": "user", "content": q}, {"role": "assistant", "content": a * 3}), f"t:{i}")
                for i, (q, a) in enumerate(QA[:6])]
    return pack_batch(tokenize_examples(tokenizer, examples, max_length=128)[0])


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, count = sft_loss(model, batch)
    loss.backward()
    return float(loss), int(count), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_equals_the_full_loss_in_value_and_gradients(tiny_model, method, monkeypatch):
    model = model_for(tiny_model, method)
    batch = batch_of(tiny_model)
    full_loss, count, full_grads = loss_and_grads(model, batch)
    monkeypatch.setattr(objectives, "CHUNK_ABOVE_ELEMENTS", 0)  # chunk everything
    monkeypatch.setattr(objectives, "CHUNK_ELEMENTS", 5 * model.get_output_embeddings().weight.shape[0])  # 5 positions
    calls = []
    real = objectives._chunk_loss
    monkeypatch.setattr(objectives, "_chunk_loss", lambda *a: calls.append(1) or real(*a))
    chunked_loss, chunked_count, chunked_grads = loss_and_grads(model, batch)
    assert chunked_count == count and count > 10 and len(calls) >= count // 5 * 2  # recomputed in the backward
    assert chunked_loss == pytest.approx(full_loss, rel=1e-6)
    assert chunked_grads.keys() == full_grads.keys() and full_grads
    for name, grad in full_grads.items():
        # the same sums in another order: equal to float32 rounding of the largest entries
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()) + 1e-9,
                                   msg=name)


def test_chunked_cross_entropy_by_hand():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(7, 8, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    whole = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (grad_whole,) = torch.autograd.grad(whole, hidden)
    parts = chunked_cross_entropy(hidden, targets, head, chunk=3)
    (grad_parts,) = torch.autograd.grad(parts, hidden)
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)
    torch.testing.assert_close(grad_parts, grad_whole)
