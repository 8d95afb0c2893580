"""Every method trains through the one loop and changes exactly the parameters it should;
adapters reload with plain peft; the virtual-token loss is the right loss."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QA
from finesmith.config import TrainConfig
from finesmith.data.formats import Example
from finesmith.data.pack import IGNORE, pack_batch, pad_batch
from finesmith.data.tokenize import tokenize_examples
from finesmith.errors import FinesmithError
from finesmith.model.methods import apply_method, count_parameters, load_base_model
from finesmith.pipeline import train
from finesmith.train.loop import LoopSettings, fit
from finesmith.train.objectives import sft_loss, uses_virtual_tokens, virtual_sft_loss


def tokenized(tiny_model, n=8):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = [Example(({"role": "user", "content": q}, {"role": "assistant", "content": a}), f"t:{i}")
                for i, (q, a) in enumerate(QA[:n])]
    return tokenize_examples(tokenizer, examples, max_length=128)[0]


def setup(tiny_model, method, **sections):
    config = TrainConfig(model=tiny_model, data="unused", output="unused", method=method)
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return apply_method(load_base_model(config, "cpu"), config)


def train_a_little(model, data, tmp_path, steps=3, lr=1e-2):
    virtual = uses_virtual_tokens(model)
    settings = LoopSettings(lr=lr, total_steps=steps, batch_size=4, log_every=1)
    return fit(model, data, settings, tmp_path, objective=virtual_sft_loss if virtual else sft_loss,
               collate=pad_batch if virtual else pack_batch)


def changed_parameters(model, data, tmp_path):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_a_little(model, data, tmp_path)
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


CASES = [
    ("full", {}, lambda n: True),
    ("full", {"full": {"freeze_embeddings": True, "freeze_layers": 1}},
     lambda n: "embed_tokens" not in n and ".layers.0." not in n),
    ("lora", {"lora": {"r": 4}}, lambda n: "lora_" in n),
    ("lora", {"lora": {"r": 4, "use_dora": True, "use_rslora": True}}, lambda n: "lora_" in n),
    ("lora", {"lora": {"r": 4, "modules_to_save": ["embed_tokens"]}},
     lambda n: "lora_" in n or "modules_to_save" in n),
    ("ia3", {}, lambda n: "ia3_" in n),
    ("prompt_tuning", {"prompt": {"virtual_tokens": 4}}, lambda n: "prompt_encoder" in n),
    ("prefix_tuning", {"prompt": {"virtual_tokens": 4}}, lambda n: "prompt_encoder" in n),
]


@pytest.mark.parametrize(("method", "sections", "should_train"), CASES,
                         ids=["full", "full-frozen", "lora", "dora-rslora", "lora-save-embed", "ia3", "prompt", "prefix"])
def test_method_changes_exactly_its_parameters(tiny_model, tmp_path, method, sections, should_train):
    model = setup(tiny_model, method, **sections)
    expected = {n for n, p in model.named_parameters() if should_train(n)}
    assert expected == {n for n, p in model.named_parameters() if p.requires_grad}
    changed = changed_parameters(model, tokenized(tiny_model), tmp_path)
    # DoRA magnitude vectors and LoRA A matrices all move after a few steps at a high rate;
    # everything else must stay bit-identical.
    assert changed == expected
    trainable, total = count_parameters(model)
    assert 0 < trainable <= total


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_adapter_reloads_with_plain_peft_and_gives_identical_logits(tiny_model, tmp_path, method):
    from peft import PeftModel

    model = setup(tiny_model, method, prompt={"virtual_tokens": 4})
    train_a_little(model, tokenized(tiny_model), tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa"),
        tmp_path / "adapter")
    model.eval()
    reloaded.eval()
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        theirs = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_loss_matches_peft_labels_loss(tiny_model, tmp_path, method):
    model = setup(tiny_model, method, prompt={"virtual_tokens": 3})
    train_a_little(model, tokenized(tiny_model), tmp_path)  # non-trivial virtual tokens
    model.eval()
    batch = pad_batch(tokenized(tiny_model, 5))
    with torch.no_grad():
        loss_sum, n = virtual_sft_loss(model, batch)
        # peft's own path: labels[t] = the token at t (HF shifts), -100 where untrained or padded.
        labels = torch.full_like(batch["input_ids"], IGNORE)
        labels[:, 1:] = batch["targets"][:, :-1]
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert int(n) == int((batch["targets"] != IGNORE).sum()) > 0
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-5, atol=1e-6)


def test_padded_loss_equals_packed_loss_without_virtual_tokens(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    data = tokenized(tiny_model, 5)
    with torch.no_grad():
        packed_sum, packed_n = sft_loss(model, pack_batch(data))
        batch = pad_batch(data)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        padded_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum")
    torch.testing.assert_close(packed_sum, padded_sum, rtol=1e-5, atol=1e-5)
    assert int(packed_n) == int((batch["targets"] != IGNORE).sum())


def test_qlora_without_cuda_fails_before_loading_the_model(tmp_path, monkeypatch, qa_files):
    import finesmith.model.methods as methods

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(methods, "load_model", must_not_load)
    config = TrainConfig(model="no/such-model", data=qa_files[0], output=str(tmp_path / "q"), method="qlora")
    with pytest.raises(FinesmithError, match="needs a CUDA GPU.*use --method lora"):
        train(config)
    assert not (tmp_path / "q").exists()
