"""Chat data as people have it: content parts, tools and tool calls, robust parsing.

Golden masks for two template families that render tools themselves (a Qwen2.5-style
ChatML template and a Llama-3.1-style one, built here on the project's tiny tokenizers)
and for the Hermes text rendering on a template without tool support.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ASSETS, make_tiny_model, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tokenize import trained_runs
from transformers import AutoTokenizer

from finesmith.cli import main
from finesmith.data.formats import Example, load_examples, parse_records, row_to_example
from finesmith.data.tokenize import tokenize_examples, tokens_and_mask
from finesmith.data.tokenize import template_renders_tools
from finesmith.data.tool_templates import install_tool_format
from finesmith.errors import FinesmithError

QWEN_TOOLS = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}{{- "\\n\\n# Tools\\n\\n<tools>" }}{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}{{- "\\n</tools><|im_end|>\\n" }}{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- for message in messages %}{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- elif message.role == "tool" %}{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
LLAMA31_TOOLS = """{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}{{- system_message }}{{- '<|eot_id|>' }}{%- if tools is not none %}{%- set first_user_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, respond with a JSON for a function call.\\n\\n' }}{%- for t in tools %}{{- t | tojson }}{{- '\\n\\n' }}{%- endfor %}{{- first_user_message + '<|eot_id|>' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- elif 'tool_calls' in message %}{%- set tool_call = message.tool_calls[0].function %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- '}<|eot_id|>' }}{%- else %}{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ROW = {"tools": TOOLS, "messages": [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C and sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny."}]}
GOLDEN = {
    "qwen": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
             "It is 18 C and sunny.<|im_end|>"],
    "llama31": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 18 C and sunny.<|eot_id|>"],
    "hermes": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
               "It is 18 C and sunny.<|im_end|>"],
}


def tokenizer_for(family: str):
    if family == "llama31":
        tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-llama3")
        tokenizer.chat_template = LLAMA31_TOOLS
    else:
        tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-chatml")
        if family == "qwen":
            tokenizer.chat_template = QWEN_TOOLS
        else:
            assert install_tool_format(tokenizer, "hermes")
    return tokenizer


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_golden_masks_train_the_calls_and_answers_never_the_tool_results(family):
    tokenizer = tokenizer_for(family)
    assert template_renders_tools(tokenizer)
    example = row_to_example(ROW, "f:1")
    ids, mask = tokens_and_mask(tokenizer, list(example.messages), example.tools)
    assert trained_runs(tokenizer, ids, mask) == GOLDEN[family]
    untrained = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "18 C and sunny" in untrained and "get_weather" in untrained  # result and schema are prompt text
    # weight 0 still skips a turn
    skipped = [dict(m) for m in example.messages]
    skipped[1]["weight"] = 0
    ids, mask = tokens_and_mask(tokenizer, skipped, example.tools)
    assert trained_runs(tokenizer, ids, mask) == GOLDEN[family][1:]


def test_shapes_people_have_normalise_to_one():
    current = row_to_example(ROW, "f:1")
    legacy = row_to_example({"functions": [TOOLS[0]["function"]], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"role": "function", "name": "get_weather", "content": "18 C and sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny."}]}, "f:2")
    sharegpt = row_to_example({"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18 C and sunny"},
        {"from": "gpt", "value": "It is 18 C and sunny."}]}, "f:3")
    for example in (current, legacy, sharegpt):
        assert example.tools[0]["function"]["name"] == "get_weather"
        assert [m["role"] for m in example.messages] == ["user", "assistant", "tool", "assistant"]
        assert example.messages[0]["content"] == "Weather in Paris?"
        assert example.messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    ends_in_call = row_to_example({"tools": TOOLS, "messages": ROW["messages"][:2]}, "f:4")
    assert ends_in_call.answer == "" and ends_in_call.answer_tool_calls == [
        {"name": "get_weather", "arguments": {"city": "Paris"}}]


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a cat"}]}, "content part of type 'image_url'"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
      "tool_calls": [{"id": "1", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "`arguments` is not a JSON object"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
      "tool_calls": [{"id": "1", "function": {"name": "get_time", "arguments": "{}"}}]}]},
     "calls `get_time`, which is not in `tools`"),
    ({"messages": ROW["messages"][:1] + [ROW["messages"][1], {"role": "tool", "tool_call_id": "zz", "content": "r"},
                                          ROW["messages"][3]]}, "call id 'zz'"),
    ({"messages": ROW["messages"][:3]}, "the last message must be from the assistant, got 'tool'"),
    ({"messages": ROW["messages"][:3] + [{"role": "user", "content": "and?"}, ROW["messages"][3]]},
     "tool results must be followed by an assistant turn"),
])
def test_tool_mistakes_are_named(row, message):
    with pytest.raises(FinesmithError, match="^f:7: .*" + __import__("re").escape(message)):
        row_to_example(row, "f:7")


def test_a_template_without_tool_support_is_refused_in_one_line_naming_the_file(tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-chatml")
    assert not template_renders_tools(tokenizer)
    with pytest.raises(FinesmithError, match=r"t\.jsonl:1: this example uses tools.*tool_format: hermes"):
        tokenize_examples(tokenizer, [row_to_example(ROW, "t.jsonl:1")], 256)
    model = make_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "tools.jsonl", [ROW] * 12)
    capsys.readouterr()
    assert main(["data", "check", data, "--model", str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert main(["data", "check", data, "--model", str(model), "--tool-format", "hermes"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", data, "--output", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tools.jsonl:1" in err[0] and "tool_format: hermes" in err[0]
    assert main(["train", "--model", str(model), "--data", data, "--output", str(out), "--max-steps", "1",
                 "--overwrite", "tool_format=hermes"]) == 0
    from finesmith.run import load_run

    assert load_run(out).record.tokenizer["template_source"] == "model+hermes-tools"
    saved = AutoTokenizer.from_pretrained(out)
    assert template_renders_tools(saved)  # the run's tokenizer carries the rendering to eval, chat and serve


def test_content_parts_train(tiny_model, tmp_path):
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": f"Question {i}?"},
                                                        {"type": "text", "text": "Answer briefly."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]}]}
            for i in range(12)]
    data = write_jsonl(tmp_path / "parts.jsonl", rows)
    assert load_examples(data)[0].messages[0]["content"] == "Question 0?\nAnswer briefly."
    assert main(["train", "--model", tiny_model, "--data", data, "--output", str(tmp_path / "run"),
                 "--max-steps", "1"]) == 0


def test_deeply_nested_json_gets_one_line_per_bad_row(tiny_model, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    nested = "[" * 5000 + "]" * 5000
    lines = [json.dumps(good)] * 11 + ['{"messages": ' + nested + "}", '{"n": ' + "9" * 5000 + "}",
                                       '{"messages": [{"role": "user", "content": ' + "[" * 200 + "]" * 200 + "}]}"]
    path = tmp_path / "nested.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["data", "check", str(path), "--model", tiny_model]) == 2
    out = capsys.readouterr()
    for line in (12, 13, 14):
        assert f"nested.jsonl:{line}:" in out.out + out.err
    assert "Traceback" not in out.err and "RecursionError" not in out.out + out.err
    assert main(["train", "--model", tiny_model, "--data", str(path), "--output", str(tmp_path / "run"),
                 "--max-steps", "1"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["train", "--model", tiny_model, "--data", str(path), "--output", str(tmp_path / "run"),
                 "--max-steps", "1", "--skip-invalid", "max_invalid_fraction=0.3"]) == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values, depth=st.integers(0, 3000), big=st.integers(0, 6000),
       key=st.sampled_from(["messages", "conversations", "tools", "prompt", "text", "chosen", "content"]))
def test_no_input_line_ends_parsing_with_a_foreign_exception(tmp_path, value, depth, big, key):
    row = {key: value}
    nested = "[" * depth + json.dumps(value) + "]" * depth
    lines = [json.dumps(row), '{"%s": %s}' % (key, nested), '{"messages": ' + "1" * big + "}",
             json.dumps({"messages": [{"role": "user", "content": value}, {"role": "assistant", "content": value,
                                                                          "tool_calls": value}], "tools": value})]
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for record, example, problem in parse_records(str(path)):
        assert (example is None) != (problem is None) or record.row is None
        if problem:
            assert problem.startswith(f"{path}:")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-chatml")
    install_tool_format(tokenizer, "hermes")
    examples = [e for _, e, _ in parse_records(str(path)) if isinstance(e, Example)]
    try:
        tokenize_examples(tokenizer, examples, 128)
    except FinesmithError:
        pass
