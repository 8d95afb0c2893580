"""A LoRA run as the base of another run (`finesmith train --model RUN`, a job on an `ft:` model):
the second run starts from what the first learned, and loads back with both."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import QA, chat, write_jsonl

from finesmith.cli import main
from finesmith.model.load import load_model
from finesmith.model.methods import load_for_inference


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_a_lora_run_is_a_base_with_its_adapter_merged_and_a_run_on_it_keeps_it(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--model", tiny_model, "--data", data, "--method", "lora", "--output", str(first),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "5e-2"]) == 0
    assert main(["train", "--model", str(first), "--data", data, "--method", "lora", "--output", str(second),
                 "--max-steps", "1", "--batch-size", "4", "--lr", "1e-9"]) == 0
    ids = [1, 5, 9, 13, 17, 21]
    base = logits(load_model(tiny_model), ids)
    first_model, _ = load_for_inference(str(first))
    as_base = logits(load_model(str(first)), ids)
    assert torch.allclose(as_base, logits(first_model, ids), atol=1e-4)  # the adapter is in the weights
    assert (as_base - base).abs().max() > 1e-2  # and it changed the model
    second_model, _ = load_for_inference(str(second))
    # a near-zero step on top of the first run: the second run answers as the first, not as the base
    assert torch.allclose(logits(second_model, ids), as_base, atol=1e-3)
    assert Path(second / "run.json").is_file()
