"""GRPO: the loss against numbers worked out by hand, group statistics, clipping, the KL term,
zero gradient from a group with equal rewards, reward functions (built-in, user, failing)
through the CLI, per-step metrics, and an exact resume after a stop signal."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import QA, chat, write_jsonl
from finesmith.cli import EXIT_PREEMPTED, main
from finesmith.train.grpo import GRPO, GRPOSettings, PromptExample, group_advantages, sequence_logprobs, token_loss
from finesmith.train.loop import STOP_AFTER_ENV
from finesmith.train.rewards import Reward, load_rewards


def test_loss_equals_the_hand_computed_value():
    # one answer, two completion tokens (a third position is padding), advantage 0.5, ε 0.2, β 0.1
    logp = torch.tensor([[-1.0, -2.0, -9.0]])
    old = torch.tensor([[-1.2, -1.5, -9.0]])
    ref = torch.tensor([[-1.1, -1.9, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, count, stats = token_loss(logp, old, torch.tensor([0.5]), mask, epsilon=0.2, beta=0.1, ref=ref)
    # token 1: ratio e^0.2 = 1.2214 > 1.2, so min(1.2214·0.5, 1.2·0.5) = 0.6 (clipped)
    # token 2: ratio e^-0.5 = 0.6065 < 0.8, so min(0.6065·0.5, 0.8·0.5) = 0.30327 (not clipped: the smaller term)
    # KL (k3): e^(ref-logp) - (ref-logp) - 1 = (e^-0.1 + 0.1 - 1) + (e^0.1 - 0.1 - 1) = 0.0048374 + 0.0051709
    policy = -(0.6 + math.exp(-0.5) * 0.5)
    kl = (math.exp(-0.1) + 0.1 - 1) + (math.exp(0.1) - 0.1 - 1)
    assert float(loss) == pytest.approx(policy + 0.1 * kl, abs=1e-6)
    assert float(loss) == pytest.approx(-0.902264, abs=1e-6)  # -(0.6 + 0.303265) + 0.1 · 0.0100083
    assert int(count) == 2 and int(stats["clipped"]) == 1 and float(stats["kl"]) == pytest.approx(kl, abs=1e-7)


def test_group_statistics():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    a = group_advantages(rewards)
    # group 1: mean 0.5, population std 0.5; group 3: mean 0.75, std sqrt(3·0.75²+2.25²)/2 = 1.299
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # equal rewards: no advantage at all
    std = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 4)
    assert torch.allclose(a[2], torch.tensor([2.25, -0.75, -0.75, -0.75]) / (std + 1e-4))
    assert torch.allclose(group_advantages(rewards, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_clipping_stops_the_gradient_only_where_the_ratio_left_the_band():
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -0.5, -1.5, -0.5]])  # ratios e^0.5 = 1.65 and e^-0.5 = 0.61
    mask = torch.ones(1, 4)
    for advantage, frozen in ((1.0, [0]), (-1.0, [1])):
        logp.grad = None
        loss, _, stats = token_loss(logp[:, :2], old[:, :2], torch.tensor([advantage]), mask[:, :2], epsilon=0.2)
        loss.backward()
        grad = logp.grad[0, :2]
        # A > 0: a ratio above 1 + ε is clipped (no push further); A < 0: a ratio below 1 - ε is
        assert grad[frozen[0]] == 0 and grad[1 - frozen[0]] != 0 and int(stats["clipped"]) == 1


def test_kl_term_is_zero_at_the_reference_and_pulls_towards_it():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _, stats = token_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), 0.2, beta=0.5,
                                ref=logp.detach())
    loss.backward()
    assert float(loss) == 0 and float(stats["kl"]) == 0 and torch.equal(logp.grad, torch.zeros(1, 2))
    logp.grad = None
    ref = torch.tensor([[-1.5, -2.0]])
    loss, _, stats = token_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), 0.2, beta=0.5, ref=ref)
    loss.backward()
    assert float(stats["kl"]) > 0 and logp.grad[0, 0] > 0  # descending lowers logp towards the lower reference


def tiny_grpo(tiny_model, rewards, **settings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finesmith.model.methods import apply_method
    from finesmith.config import TrainConfig

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model), TrainConfig(method="lora"))
    return GRPO(model, tokenizer, GRPOSettings(**settings), rewards), model, tokenizer


def prompt(tokenizer, text: str, **fields) -> PromptExample:
    from finesmith.data.tokenize import prompt_ids

    return PromptExample(tuple(prompt_ids(tokenizer, [{"role": "user", "content": text}])), text, fields, "t:1")


def test_a_group_with_equal_rewards_gives_zero_policy_gradient(tiny_model):
    grpo, model, tokenizer = tiny_grpo(tiny_model, [Reward("one", lambda completion, **_: 1.0)],
                                       group_size=4, max_new_tokens=6)
    model.train()
    batch = grpo.collate([prompt(tokenizer, "What colour is the sky?")])
    assert batch["log"]["zero_variance_groups"] == 1.0 and batch["log"]["reward_std"] == 0
    for unit in batch["units"]:
        loss, count = grpo(model, unit)
        loss.backward()
        assert int(count) == int(unit["completion_mask"].sum()) > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_the_objective_is_the_formula_over_the_models_own_log_probabilities(tiny_model):
    scores = iter([1.0, 0.0, 0.5, 0.25])
    grpo, model, tokenizer = tiny_grpo(tiny_model, [Reward("r", lambda completion, **_: next(scores))],
                                       group_size=4, max_new_tokens=5)
    model.train()
    unit = grpo.collate([prompt(tokenizer, "Say hello.")])["units"][0]
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.25]])
    assert torch.allclose(unit["advantages"], group_advantages(rewards)[0])
    loss, count = grpo(model, unit)
    with torch.no_grad():
        logp = sequence_logprobs(model, unit)
    mask = unit["completion_mask"][:, 1:].float()
    # iterations 1: the ratio is exactly 1, so the loss is -Σ A_i over each answer's tokens
    expected = -(unit["advantages"].unsqueeze(1) * mask).sum()
    assert float(loss) == pytest.approx(float(expected), abs=1e-5) and int(count) == int(mask.sum())
    assert logp.shape == mask.shape


def test_built_in_rewards_and_bad_ones(tmp_path):
    exact, fmt, length = load_rewards(["exact_match", r"regex:Answer: \d+", "length:3-5"])
    assert exact("p", " Paris ", {"reference": "paris"}, "t:1") == 1.0
    assert fmt("p", "Answer: 42", {}, "t:1") == 1.0 and fmt("p", "Answer: 42.", {}, "t:1") == 0.0
    assert length("p", "abcd", {}, "t:1") == 1.0 and length("p", "ab", {}, "t:1") == 0.0
    module = tmp_path / "r.py"
    module.write_text("def ratio(completion, reference):\n    return len(completion) / len(reference)\n"
                      "def text(completion, **kw):\n    return 'good'\n")
    ratio, text = load_rewards([f"{module}:ratio", f"{module}:text"], [2.0, 1.0])
    assert ratio.weight == 2.0 and ratio("p", "abcd", {"reference": "ab", "other": 1}, "t:1") == 2.0
    with pytest.raises(Exception, match=r"reward .*:ratio failed on data.jsonl:3: ZeroDivisionError"):
        ratio("p", "x", {"reference": ""}, "data.jsonl:3")
    with pytest.raises(Exception, match=r"reward .*:text returned 'good' on data.jsonl:4; it must return a finite"):
        text("p", "x", {}, "data.jsonl:4")
    for spec, message in (("nofile.py:f", "no file nofile.py"), (f"{module}:missing", "has no function missing"),
                          ("regex:(", "not a valid regular expression"), ("length:9-2", "length:MIN-MAX")):
        with pytest.raises(Exception, match=message):
            load_rewards([spec])


def grpo_args(tiny_model, data, out, reward, *extra):
    return ["train", "--model", tiny_model, "--data", data, "--eval-data", data, "--output", str(out), "--max-steps",
            "4", "--batch-size", "2", "--lr", "5e-3", "objective=grpo", f"reward={reward}", "grpo.max_new_tokens=6",
            "grpo.group_size=3", "log_every=1", *extra]


def test_a_reward_that_fails_stops_the_run_in_one_line(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    module = tmp_path / "bad.py"
    module.write_text("def reward(completion, **kw):\n    return None\n")
    assert main(grpo_args(tiny_model, data, tmp_path / "run", f"{module}:reward")) == 2
    err = capsys.readouterr().err
    assert f"reward {module}:reward returned None on {data}:" in err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["state"] == "failed"


def test_grpo_logs_its_metrics_and_resumes_exactly(tiny_model, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    module = tmp_path / "r.py"
    module.write_text("def short(completion, reference=None, **kw):\n    return -abs(len(completion) - 8) / 8\n")
    reward = f"{module}:short"
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(grpo_args(tiny_model, data, straight, reward, "reward_weights=[2.0]")) == 0
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "zero_variance_groups", "completion_length", "reward_short", "clip_fraction",
                "kl"):
        assert all(key in m for m in steps), key
    assert all(m["reward"] == pytest.approx(2 * m["reward_short"], abs=2e-5) for m in steps)  # weighted total
    evals = [m for m in lines if "eval_reward" in m]
    assert [m["step"] for m in evals] == [0, 4]  # the held-out reward before and after
    from finesmith.evaluate.report import reward_rows

    header, rows = reward_rows([("grpo run", straight)])  # and in the compare report
    assert header[:5] == ["run", "step", "reward before", "reward after", "change"] and "short after" in header
    assert rows == [["grpo run", "0 → 4", f"{evals[0]['eval_reward']:.3f}", f"{evals[1]['eval_reward']:.3f}",
                     f"{evals[1]['eval_reward'] - evals[0]['eval_reward']:+.3f}", f"{evals[1]['eval_reward_short']:.3f}"]]

    with monkeypatch.context() as m:
        m.setenv(STOP_AFTER_ENV, "2")
        assert main(grpo_args(tiny_model, data, cut, reward, "reward_weights=[2.0]")) == EXIT_PREEMPTED
    assert main(grpo_args(tiny_model, data, cut, reward, "reward_weights=[2.0]", "--resume")) == 0
    resumed = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    # the same samples (the sampling seeds come from the checkpointed generator), so the same rewards and losses
    assert [(m["step"], m["reward"], m["loss"]) for m in resumed] == [(m["step"], m["reward"], m["loss"]) for m in steps]
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_iterations_train_again_on_the_same_samples_with_the_kl_term(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    out = tmp_path / "run"
    assert main(grpo_args(tiny_model, data, out, "length:3-12", "grpo.iterations=2", "grpo.beta=0.1",
                          "grpo.temperature=1.5")) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 4
    # steps 1-2 and 3-4 train on one batch of samples each: the same rewards and lengths
    assert (steps[0]["reward"], steps[0]["completion_length"]) == (steps[1]["reward"], steps[1]["completion_length"])
    assert (steps[2]["reward"], steps[2]["completion_length"]) == (steps[3]["reward"], steps[3]["completion_length"])
    # at step 1 the adapter is still zero, so the policy is the reference; after an update it is not
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0
    assert all(0 <= s["clip_fraction"] <= 1 for s in steps)
