"""Golden answer masks for every family's real chat template (see tests/families.py).

Each conversation has a system prompt, several turns, and (where the template renders tools)
a tool call and its result. The trained tokens, decoded group by group, must be exactly what
the template renders for each assistant turn: its text (with reasoning where the template
keeps it), its tool calls, and its end-of-turn marker; nothing of the prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from families import SPECS, family_template
from transformers import AutoTokenizer

from finesmith.data.template import assistant_spans, fit_messages, install_thinking, installed_thinking, render
from finesmith.data.tokenize import prompt_ids, tokens_and_mask
from finesmith.errors import FinesmithError

ASSETS = Path(__file__).parent / "assets"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
PLAIN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris."}]
WITH_TOOLS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call00001", "content": "sunny"},
              {"role": "assistant", "content": "It is sunny."}]


def family_tokenizer(family: str):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / f"tokenizer-{SPECS[family].tokenizer}")
    tokenizer.chat_template = family_template(family)
    return tokenizer


def trained_groups(tokenizer, messages, tools=None) -> list[str]:
    """The trained tokens decoded as contiguous groups."""
    ids, mask = tokens_and_mask(tokenizer, messages, tools)
    groups, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return [tokenizer.decode(g, skip_special_tokens=False) for g in groups]


GOLDEN_PLAIN = {
    "llama": ["Hello!<|eot_id|>", "Paris.<|eot_id|>"],
    "qwen3": ["Hello!<|im_end|>", "<think>\n\n</think>\n\nParis.<|im_end|>"],
    "gemma3": ["Hello!<end_of_turn>", "Paris.<end_of_turn>"],
    "mistral": ["Hello!</s>", "Paris.</s>"],
    "phi3": ["Hello!<|end|>", "Paris.<|end|>"],
    "olmo2": ["Hello!<|endoftext|>", "Paris.<|endoftext|>"],
}
GOLDEN_TOOLS = {
    "llama": ["Hello!<|eot_id|>", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
              "It is sunny.<|eot_id|>"],
    "qwen3": ["Hello!<|im_end|>", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
              "<think>\n\n</think>\n\nIt is sunny.<|im_end|>"],
    "mistral": ["Hello!</s>", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
                "It is sunny.</s>"],
}


@pytest.mark.parametrize("family", list(GOLDEN_PLAIN))
def test_multi_turn_mask_with_system(family: str) -> None:
    tokenizer = family_tokenizer(family)
    assert trained_groups(tokenizer, PLAIN) == GOLDEN_PLAIN[family]
    ids, mask = tokens_and_mask(tokenizer, PLAIN)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert "Be brief." in text, "the system text reaches the model in every family"
    assert tokenizer.decode([t for t, m in zip(ids, mask) if not m]).count("Be brief.") == 1


@pytest.mark.parametrize("family", list(GOLDEN_TOOLS))
def test_tool_call_and_result_masks(family: str) -> None:
    tokenizer = family_tokenizer(family)
    assert trained_groups(tokenizer, WITH_TOOLS, TOOLS) == GOLDEN_TOOLS[family]
    prompt_text = tokenizer.decode([t for t, m in zip(*tokens_and_mask(tokenizer, WITH_TOOLS, TOOLS)) if not m])
    assert "sunny" in prompt_text and "get_weather" in prompt_text  # the result and schema are prompt, not trained


@pytest.mark.parametrize("family", list(GOLDEN_PLAIN))
def test_trained_answer_follows_the_inference_prompt(family: str) -> None:
    """For the last turn, the prompt tokens before the trained span equal what inference renders."""
    tokenizer = family_tokenizer(family)
    ids, mask = tokens_and_mask(tokenizer, PLAIN)
    last_start = max(i for i in range(len(mask)) if mask[i] and not mask[i - 1])
    asked = prompt_ids(tokenizer, PLAIN[:-1])
    if family == "qwen3":  # the template opens a finished last turn with an (empty) thinking block
        assert ids[:len(asked)] == asked
    else:
        assert ids[:last_start] == asked


def test_qwen3_reasoning_trains_when_rendered_and_is_dropped_from_history() -> None:
    tokenizer = family_tokenizer("qwen3")
    field = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"},
             {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "add again"}]
    inline = [dict(m, content=f"<think>{m['reasoning_content']}</think>{m['content']}") if "reasoning_content" in m
              else m for m in field]
    inline = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in inline]
    expected = ["4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"]  # history loses its reasoning
    assert trained_groups(tokenizer, field) == expected
    assert trained_groups(tokenizer, inline) == expected


def test_thinking_off_is_installed_in_the_template_and_strips_reasoning() -> None:
    tokenizer = family_tokenizer("qwen3")
    assert installed_thinking(tokenizer) == "auto"
    assert install_thinking(tokenizer, "off") and installed_thinking(tokenizer) == "off"
    install_thinking(tokenizer, "off")  # idempotent: one prelude
    assert tokenizer.chat_template.count("finesmith thinking") == 1
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"}]
    assert trained_groups(tokenizer, conversation) == ["4<|im_end|>"]
    asked = render(tokenizer, conversation[:1], add_generation_prompt=True)
    assert asked.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # asked in the shape it was taught
    assert install_thinking(tokenizer, "on") and installed_thinking(tokenizer) == "on"
    assert render(tokenizer, conversation[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_thinking_needs_a_template_with_the_switch() -> None:
    with pytest.raises(FinesmithError, match="thinking switch"):
        install_thinking(family_tokenizer("llama"), "off")


def test_reasoning_field_the_template_drops_is_refused() -> None:
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"}]
    with pytest.raises(FinesmithError, match="reasoning_content"):
        tokens_and_mask(family_tokenizer("llama"), conversation)


def test_system_folding() -> None:
    gemma, mistral = family_tokenizer("gemma3"), family_tokenizer("mistral")
    folded = fit_messages(gemma, PLAIN)
    assert [m["role"] for m in folded] == ["user", "assistant", "user", "assistant"]
    assert folded[0]["content"] == "Be brief.\n\nHi there"
    assert "Be brief.\n\nHi there" in render(gemma, PLAIN[:2], add_generation_prompt=True)
    # Mistral Nemo writes the system text into the last user turn of a prompt, and drops it from a finished
    # conversation: training puts it where inference will
    asked = render(mistral, PLAIN[:4], add_generation_prompt=True)
    assert "[INST]Be brief.\n\nCapital of France?[/INST]" in asked
    assert render(mistral, PLAIN).startswith(asked)


@pytest.mark.parametrize("command", ["data", "train"])
def test_template_refusal_names_the_line(tmp_path: Path, command: str) -> None:
    """What finesmith's own checks allow but the template refuses (Mistral's 9-character tool-call ids)
    is one line naming file:line, in `data check` and in `train` alike."""
    from families import make_family_model

    model = make_family_model(tmp_path / "mistral", "mistral")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    bad = json.loads(json.dumps(WITH_TOOLS[1:]))
    bad[3]["tool_calls"][0]["id"] = bad[4]["tool_call_id"] = "call1"
    rows.insert(3, {"messages": bad, "tools": TOOLS})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = (["data", "check", str(data), "--model", str(model)] if command == "data" else
            ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "run"), "--max-steps", "1"])
    done = subprocess.run([sys.executable, "-m", "finesmith", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    output = " ".join((done.stdout + done.stderr).split())
    assert "train.jsonl:4: the model's chat template refused this conversation: Tool call IDs" in output


def test_spans_equal_the_prefix_rendering_for_incremental_templates() -> None:
    """On templates that render incrementally, the located spans are those of prefix rendering."""
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-chatml")
    text, spans = assistant_spans(tokenizer, PLAIN)
    expected = []
    for index, message in enumerate(PLAIN):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(PLAIN[:index], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(PLAIN[:index + 1], tokenize=False)
            expected.append((len(prompt), len(full.rstrip())))
    assert spans == expected
