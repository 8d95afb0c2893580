"""Preference objectives: hand-computed losses, reference passes, packing, exact accumulation, data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from finesmith.cli import main
from finesmith.config import PreferenceSettings
from finesmith.data.formats import FeedbackExample, PreferenceExample
from finesmith.data.pairs import pack_groups, tokenize_groups
from finesmith.train.preference import PreferenceObjective, reference_logps

PAIRS = [PreferenceExample(({"role": "user", "content": f"What is {i} plus {i}?"},), f"Answer: {2 * i}",
                           f"Maybe {2 * i + 1}, I am not sure at all.", f"p:{i}") for i in range(8)]
SETTINGS = PreferenceSettings(beta=0.3, label_smoothing=0.1, gamma=0.4, orpo_lambda=0.2, simpo_beta=1.5)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def one_by_one_logp(model, sequence) -> tuple[float, int]:
    """A sequence alone, full forward: summed log-probability of its scored tokens, and their count."""
    ids = torch.tensor([sequence.input_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    scored = [j for j in range(1, len(sequence)) if sequence.supervised[j]]
    return sum(float(logprobs[j - 1, sequence.input_ids[j]]) for j in scored), len(scored)


def expected_loss(kind, s, pc, nc, pr, nr, rc, rr) -> float:
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    if kind == "dpo":
        z = s.beta * ((pc - rc) - (pr - rr))
        return -(1 - s.label_smoothing) * math.log(sig(z)) - s.label_smoothing * math.log(sig(-z))
    if kind == "ipo":
        return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * s.beta)) ** 2
    ac, ar = pc / nc, pr / nr
    if kind == "orpo":
        odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
        return -ac - s.orpo_lambda * math.log(sig(odds))
    return -math.log(sig(s.simpo_beta * (ac - ar) - s.gamma))


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("kind", ["dpo", "ipo", "orpo", "simpo"])
def test_pairwise_losses_equal_hand_computed_values(tiny, kind, share):
    model, tokenizer = tiny
    groups, _ = tokenize_groups(tokenizer, PAIRS[:3], 256)
    fake_reference = [(-40.0 - i, -55.0 + i) for i in range(3)]
    groups = [g.__class__(g.sequences, g.source, g.desirable, r) for g, r in zip(groups, fake_reference)]
    batch = pack_groups(groups, row_tokens=None, share_prompt=share)
    objective = PreferenceObjective(kind, SETTINGS)
    with torch.no_grad():
        total, count = objective(model, batch["units"][0])
    expected = 0.0
    for group, (rc, rr) in zip(groups, fake_reference):
        (pc, nc), (pr, nr) = (one_by_one_logp(model, s) for s in group.sequences)
        expected += expected_loss(kind, SETTINGS, pc, nc, pr, nr, rc, rr)
    assert int(count) == 3
    assert float(total) == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_kto_loss_equals_hand_computed_value(tiny):
    model, tokenizer = tiny
    rows = [FeedbackExample(p.prompt, p.chosen if i % 2 else p.rejected, bool(i % 2), p.source) for i, p in enumerate(PAIRS[:4])]
    groups, _ = tokenize_groups(tokenizer, rows, 256, unpaired=True)
    groups = [g.__class__(g.sequences, g.source, g.desirable, (-30.0 - i,)) for i, g in enumerate(groups)]
    s = PreferenceSettings(beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)
    with torch.no_grad():
        total, count = PreferenceObjective("kto", s)(model, pack_groups(groups, None)["units"][0])
    expected = 0.0
    for group in groups:
        p, _ = one_by_one_logp(model, group.sequences[0])
        value = 1 / (1 + math.exp(-s.beta * (p - group.reference[0])))
        expected += s.desirable_weight * (1 - value) if group.desirable else s.undesirable_weight * value
    assert int(count) == 4 and float(total) == pytest.approx(expected, rel=1e-4)


def test_shared_prompt_equals_separate_sequences_in_loss_and_gradients(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    groups, _ = tokenize_groups(tokenizer, PAIRS[:4], 256)
    groups = [g.__class__(g.sequences, g.source, None, (-50.0, -60.0)) for g in groups]
    results = []
    for share, row_tokens in ((True, None), (False, None), (False, 80)):  # one row, or several rows
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        batch = pack_groups(groups, row_tokens=row_tokens, share_prompt=share)
        total = sum(PreferenceObjective("dpo", SETTINGS)(model, unit)[0] for unit in batch["units"])
        total.backward()
        results.append((float(total), [p.grad.clone() for p in model.parameters()], len(batch["units"])))
    shared_tokens = pack_groups(groups, None, True)["real_tokens"]
    assert shared_tokens < pack_groups(groups, None, False)["real_tokens"]  # the prompt is computed once
    assert results[2][2] > 1
    for loss, grads, _ in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reference_from_a_disabled_adapter_equals_the_base_model(tiny_model):
    import peft

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    groups, _ = tokenize_groups(tokenizer, PAIRS[:4], 256)
    collate = lambda chunk: pack_groups(chunk, 64)  # noqa: E731
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    plain = reference_logps(base, groups, collate, batch_size=3)
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                               peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    disabled = reference_logps(lora, groups, collate, batch_size=3)
    for a, b in zip(plain, disabled):
        assert a == pytest.approx(b, abs=1e-5)
    for group, (pc, pr) in zip(groups, plain):
        assert pc == pytest.approx(one_by_one_logp(base, group.sequences[0])[0], abs=1e-3)
    with torch.no_grad():  # the adapter itself (non-zero init) would give other numbers
        enabled = pack_groups(groups[:1], None)["units"][0]
        from finesmith.train.preference import sequence_logps

        assert float(sequence_logps(lora, enabled)[0]) != pytest.approx(plain[0][0], abs=1e-3)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_batch8_accum1_equals_batch1_accum8(tiny_model, kind):
    """The loop's own normalisation (`batch_count`, `forward_units`): one step's gradient is the
    same however the step's 8 groups are split into micro-batches."""
    from finesmith.train.loop import batch_count, forward_units

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    groups, _ = tokenize_groups(tokenizer, PAIRS, 256, unpaired=kind == "kto")
    groups = [g.__class__(g.sequences, g.source, g.desirable, tuple(-40.0 - k for k in range(len(g.sequences))))
              for g in groups][:8]
    objective = PreferenceObjective(kind, SETTINGS)
    grads = []
    for batch_size in (8, 1):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        batches = [pack_groups(groups[i:i + batch_size], 512) for i in range(0, 8, batch_size)]
        step_count = sum(batch_count(b) for b in batches)
        assert step_count == 8  # groups are counted, not tokens
        for unit, _ in forward_units(batches, torch.device("cpu")):
            (objective(model, unit)[0] / step_count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"Answer: {2 * i}",
             "rejected": f"Maybe {2 * i + 1}, I am not sure."} for i in range(n)]


def test_dpo_through_the_cli_logs_metrics_and_reuses_the_reference_on_resume(tiny_model, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("FINESMITH_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    held = write_jsonl(tmp_path / "held.jsonl", pair_rows(20)[16:])
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model, "--data", train, "--eval-data", held, "--output", str(out),
            "--batch-size", "4", "objective=dpo", "save_every=2", "eval_every=2"]
    assert main(args + ["--max-steps", "2"]) == 0
    first = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "one pass over 16 examples" in first and "16 pairs" in first
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert {"eval_accuracy", "eval_margin", "eval_chosen_logp", "eval_rejected_logp"} <= set(evals[-1])
    assert main(args + ["--max-steps", "4", "--resume", "--extend"]) == 0
    assert "reference log-probabilities from cache" in " ".join(capsys.readouterr().out.split())


def test_wrong_data_for_the_objective_is_refused_in_one_line(tiny_model, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(12)])
    feedback = write_jsonl(tmp_path / "fb.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0}
                                                     for i in range(12)])
    cases = [(pairs, "sft", "objective: dpo"), (sft, "dpo", "use objective: sft"),
             (feedback, "dpo", "objective: kto")]
    for data, objective, phrase in cases:
        code = main(["train", "--model", tiny_model, "--data", data, "--output", str(tmp_path / "r"),
                     "--max-steps", "1", f"objective={objective}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and phrase in err[0] and ".jsonl:1" in err[0], err
    assert main(["train", "--model", tiny_model, "--data", feedback, "--output", str(tmp_path / "kto"),
                 "--max-steps", "1", "objective=kto"]) == 0
    code = main(["train", "--model", tiny_model, "--data", pairs, "--output", str(tmp_path / "p"), "--max-steps", "1",
                 "objective=dpo", "--method", "prompt_tuning"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "prompt_tuning" in err[0]


def test_bad_preference_rows_get_one_line_each(tiny_model, tmp_path, capsys):
    rows = pair_rows(12) + [{"prompt": "x", "chosen": "same", "rejected": "same"},
                            {"prompt": "", "chosen": "a", "rejected": "b"},
                            {"input": {"messages": [{"role": "user", "content": "hi"}]},
                             "preferred_output": [{"role": "assistant", "content": "hello"}],
                             "non_preferred_output": []},
                            {"prompt": "q", "completion": "a", "label": "yes"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["data", "check", path, "--model", tiny_model]) == 2
    out = capsys.readouterr().out
    for line, phrase in ((13, "identical"), (14, "`prompt` must be"), (15, "`rejected` must be"), (16, "`label` must be")):
        assert f"bad.jsonl:{line}:" in out and phrase in out


def test_stages_run_sft_then_dpo_in_one_config(tiny_model, tmp_path):
    import yaml

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"What is {i} plus {i}?", "completion": f"Answer: {2 * i}"}
                                               for i in range(12)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))
    config = {"model": tiny_model, "output": str(tmp_path / "run"), "method": "lora", "batch_size": 4,
              "stages": [{"name": "sft", "data": sft, "max_steps": 2},
                         {"name": "dpo", "objective": "dpo", "data": pairs, "eval_data": pairs, "max_steps": 2}]}
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    from finesmith.run import load_run

    dpo = load_run(tmp_path / "run" / "dpo").record
    assert dpo.config["objective"] == "dpo" and dpo.state == "finished"
    assert dpo.base_model["spec"] == str((tmp_path / "run" / "merged" / "sft").resolve())
    evals = [json.loads(line) for line in (tmp_path / "run" / "dpo" / "metrics.jsonl").read_text().splitlines()
             if "eval_accuracy" in line]
    assert evals


def test_eval_and_compare_report_preference_accuracy_before_and_after(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    held = write_jsonl(tmp_path / "held.jsonl", pair_rows(20)[16:])
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model, "--data", train, "--output", str(out), "--max-steps", "3",
                 "--batch-size", "4", "--lr", "1e-2", "objective=dpo"]) == 0
    assert main(["eval", "--model", str(out), "--data", held, "--output", str(tmp_path / "after.json")]) == 0
    after = json.loads((tmp_path / "after.json").read_text())
    assert after["task"] == "preference" and after["n"] == 4
    assert {"accuracy", "mean_logp_margin", "reward_accuracy", "mean_reward_margin"} <= set(after["metrics"]["preference"])
    assert main(["compare", "--base", tiny_model, "--data", held, "--output", str(tmp_path / "cmp"), str(out)]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "preference accuracy" in report and "reward accuracy" in report
