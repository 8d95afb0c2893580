"""Tool-call evaluation: parsing calls out of generated text, scoring them, the tool_call task,
the report columns, and the tool-calling example's data and config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from finesmith.cli import main
from finesmith.data.formats import Example, load_examples
from finesmith.errors import FinesmithError
from finesmith.evaluate import tasks
from finesmith.evaluate.fewshot import few_shot_messages
from finesmith.evaluate.report import write_report
from finesmith.evaluate.tasks import EvalOptions, evaluate_examples
from finesmith.evaluate.toolcalls import format_calls, parse_tool_calls, score_calls, tool_call_metrics

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tool_calling"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"type": "string"}}}}}
THERMOSTAT = {"name": "set_thermostat", "arguments": {"room": "kitchen", "temperature": 21}}


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


# --- parsing -------------------------------------------------------------------------------


def test_parses_a_hermes_tool_call_block():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert parse_tool_calls(text) == [call("get_weather", city="Paris")]


def test_parses_bare_json_and_ignores_text_around_it():
    text = 'Sure! {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}} Let me know if you need more.'
    assert parse_tool_calls(text) == [call("get_weather", city="Oslo", unit="C")]


def test_parses_llama_31_parameters_after_the_python_tag():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}<|eom_id|>'
    assert parse_tool_calls(text) == [call("get_weather", city="Rome")]


def test_parses_a_mistral_list_of_calls_with_string_arguments():
    text = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}}, '
            '{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}]')
    assert parse_tool_calls(text) == [call("get_weather", city="Lima"), call("get_time", zone="UTC")]


def test_parses_the_hosted_api_shape():
    text = json.dumps({"tool_calls": [{"id": "c1", "type": "function",
                                       "function": {"name": "get_weather", "arguments": '{"city": "Kyiv"}'}}]})
    assert parse_tool_calls(text) == [call("get_weather", city="Kyiv")]


def test_two_calls_in_two_blocks_keep_their_order():
    text = ('<tool_call>\n{"name": "lock_door", "arguments": {"door": "front", "locked": true}}\n</tool_call>\n'
            '<tool_call>\n{"name": "set_lights", "arguments": {"room": "hallway", "state": "off"}}\n</tool_call>')
    assert parse_tool_calls(text) == [call("lock_door", door="front", locked=True),
                                      call("set_lights", room="hallway", state="off")]


def test_broken_json_in_a_block_keeps_the_name_without_arguments():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call> and more text'
    assert parse_tool_calls(text) == [{"name": "get_weather", "arguments": None}]
    assert parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par') == [
        {"name": "get_weather", "arguments": None}]  # cut off by the token budget


def test_text_that_is_not_a_call_gives_none():
    assert parse_tool_calls("The weather in Paris is sunny.") == []
    assert parse_tool_calls('{"city": "Paris"} and [1, 2]') == []  # JSON, but no name + arguments
    assert parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Paris",}}') == []  # bare and broken


def test_arguments_that_are_not_an_object_are_kept_as_found():
    assert parse_tool_calls('{"name": "f", "arguments": "not json"}') == [{"name": "f", "arguments": "not json"}]
    assert parse_tool_calls('{"name": "f", "arguments": [1]}') == [{"name": "f", "arguments": [1]}]


# --- scoring -------------------------------------------------------------------------------


def test_score_of_an_exact_call():
    assert score_calls([THERMOSTAT], [THERMOSTAT]) == {"name_correct": True, "arguments_parse": True,
                                                       "arguments_exact": True, "arguments_matched": 2,
                                                       "arguments_total": 2}


def pick(score: dict, *keys: str) -> tuple:
    return tuple(score[key] for key in keys)


def test_score_of_a_wrong_value_a_wrong_name_an_extra_argument_and_no_call():
    wrong_value = score_calls([THERMOSTAT], [call("set_thermostat", room="kitchen", temperature=22)])
    assert pick(wrong_value, "name_correct", "arguments_exact", "arguments_matched") == (True, False, 1)
    wrong_name = score_calls([THERMOSTAT], [call("set_lights", room="kitchen", temperature=21)])
    assert pick(wrong_name, "name_correct", "arguments_parse", "arguments_matched") == (False, True, 0)
    extra = score_calls([THERMOSTAT], [call("set_thermostat", room="kitchen", temperature=21, mode="eco")])
    assert pick(extra, "arguments_exact", "arguments_matched") == (False, 2)
    nothing = score_calls([THERMOSTAT], [])
    assert nothing == {"name_correct": False, "arguments_parse": False, "arguments_exact": False,
                       "arguments_matched": 0, "arguments_total": 2}
    broken = score_calls([THERMOSTAT], [{"name": "set_thermostat", "arguments": None}])
    assert pick(broken, "name_correct", "arguments_parse", "arguments_matched") == (True, False, 0)


def test_two_calls_are_paired_by_position():
    lock, lights = call("lock_door", door="front", locked=True), call("set_lights", room="hall", state="off")
    assert score_calls([lock, lights], [lock, lights])["arguments_exact"]
    swapped = score_calls([lock, lights], [lights, lock])
    assert not swapped["name_correct"] and swapped["arguments_matched"] == 0 and swapped["arguments_total"] == 4
    one_of_two = score_calls([lock, lights], [lock])
    assert not one_of_two["name_correct"] and one_of_two["arguments_matched"] == 2


def test_metrics_aggregate_by_example_and_arguments_by_argument():
    scores = [score_calls([THERMOSTAT], [THERMOSTAT]),  # exact: 2 of 2 arguments
              score_calls([THERMOSTAT], [call("set_thermostat", room="kitchen", temperature=22)]),  # 1 of 2
              score_calls([THERMOSTAT], []),  # no call: 0 of 2
              score_calls([call("get_time")], [call("get_time")])]  # exact, no arguments
    metrics = tool_call_metrics(scores, called=[True, True, False, True])
    interval = metrics.pop("exact_match_ci")
    assert metrics == {"n": 4, "name_accuracy": 0.75, "arguments_parse_rate": 0.75, "exact_match": 0.5,
                       "argument_accuracy": 3 / 6, "call_rate": 0.75}
    assert interval == pytest.approx([0.1500, 0.8500], abs=1e-4)  # Wilson, 2 of 4
    assert tool_call_metrics([], [])["n"] == 0


def test_format_calls_for_reports():
    assert format_calls([THERMOSTAT]) == 'set_thermostat({"room": "kitchen", "temperature": 21})'


# --- the tool_call task --------------------------------------------------------------------


def tool_row(user: str, name: str, arguments: dict, result: str | None = None, answer: str | None = None) -> dict:
    """A hosted-API chat row: tools, an assistant call with JSON-string arguments, maybe a result and answer."""
    messages = [{"role": "user", "content": user},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}]
    if result is not None:
        messages += [{"role": "tool", "tool_call_id": "c1", "content": result},
                     {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": [WEATHER]}


HELD_OUT = [tool_row("Weather in Paris?", "get_weather", {"city": "Paris"}),
            tool_row("Oslo weather in C please", "get_weather", {"city": "Oslo", "unit": "C"}),
            tool_row("Is it raining in Rome?", "get_weather", {"city": "Rome"}),
            tool_row("Weather in Lima?", "get_weather", {"city": "Lima"}, '{"sky": "clear"}', "It is clear in Lima.")]


@pytest.fixture()
def held_out(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "tools.jsonl", HELD_OUT)


def test_eval_on_tool_calls_renders_the_tools_and_reports_the_metrics(tiny_model, held_out, tmp_path, capsys,
                                                                      monkeypatch):
    from finesmith.data import tokenize as generation

    rendered = []
    real_prompt_ids = generation.prompt_ids

    def capture(tokenizer, messages, tools=None):
        ids = real_prompt_ids(tokenizer, messages, tools)
        rendered.append(tokenizer.decode(ids))
        return ids

    monkeypatch.setattr(generation, "prompt_ids", capture)
    out = tmp_path / "result.json"
    code = main(["eval", "--model", tiny_model, "--data", held_out, "--max-new-tokens", "4", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["task"] == "tool_call" and result["n"] == 4
    assert set(result["metrics"]["tool_calls"]) >= {"n", "name_accuracy", "arguments_parse_rate", "exact_match",
                                                    "argument_accuracy"}
    assert result["metrics"]["tool_calls"]["n"] == 3 and result["metrics"]["generate"]["n"] == 1
    assert result["metrics"]["tool_calls"]["max_new_tokens"] > 4  # raised to fit the longest reference call
    assert all("predicted_tool_calls" in p for p in result["predictions"])
    assert result["predictions"][0]["reference_tool_calls"] == [call("get_weather", city="Paris")]
    # The tiny model's ChatML template cannot render tools: the Hermes rendering is installed,
    # so every prompt lists the function schema.
    assert len(rendered) == 4 and all("<tools>" in text and '"get_weather"' in text for text in rendered)
    assert "<tool_response>" in rendered[3] and "tool_call · 0-shot" in capsys.readouterr().out


def canned(answers: dict[str, str]):
    """A stand-in for greedy generation: the answer for each prompt's last message."""
    seen = []

    def fake(model, tokenizer, prompts, max_new_tokens=32, batch_size=16, tools=None, memory=None):
        seen.append(tools)
        return [answers[p[-1]["content"]] for p in prompts]

    return fake, seen


def test_tool_call_scores_and_records(tiny_model, held_out, monkeypatch):
    from transformers import AutoTokenizer

    fake, seen = canned({
        "Weather in Paris?": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "Oslo weather in C please": '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}',
        "Is it raining in Rome?": "I cannot check the weather.",
        '{"sky": "clear"}': "It is clear in Lima."})
    monkeypatch.setattr(tasks, "generate", fake)
    result = evaluate_examples(None, AutoTokenizer.from_pretrained(tiny_model), load_examples(held_out))
    calls = result.metrics["tool_calls"]
    assert pick(calls, "n", "name_accuracy", "arguments_parse_rate", "exact_match") == (3, 2 / 3, 2 / 3, 1 / 3)
    assert calls["argument_accuracy"] == 2 / 4 and calls["call_rate"] == 2 / 3  # Paris 1/1, Oslo 1/2, Rome 0/1
    assert result.metrics["generate"]["exact_match"] == 1.0 and result.metrics["generate"]["tool_call_rate"] == 0.0
    assert result.accuracy == 0.5  # Paris and the Lima text answer are exact
    assert [p["correct"] for p in result.predictions] == [True, False, False, True]
    assert result.predictions[1]["predicted_tool_calls"] == [call("get_weather", city="Oslo", unit="F")]
    assert seen == [[(WEATHER,)] * 4]  # every prompt is generated with its example's tools


def test_tool_call_task_refusals(held_out, tmp_path):
    examples = load_examples(held_out)
    with pytest.raises(FinesmithError, match="--shots is not supported for tool calls"):
        evaluate_examples(None, None, examples, examples, EvalOptions(shots=2))
    with pytest.raises(FinesmithError, match="are tool calls, which generation cannot score"):
        evaluate_examples(None, None, examples, options=EvalOptions(task="generation"))
    text_only = load_examples(write_jsonl(tmp_path / "text.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]))
    with pytest.raises(FinesmithError, match="none of the 1 references calls a tool"):
        evaluate_examples(None, None, text_only, options=EvalOptions(task="tool_call"))
    with pytest.raises(FinesmithError, match="unknown tool format"):
        EvalOptions(tool_format="xml").validate()


def test_earlier_calls_and_results_stay_in_the_prompt():
    messages = ({"role": "user", "content": "Weather in Lima?"},
                {"role": "assistant", "content": "", "weight": 0, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}]},
                {"role": "tool", "content": "clear", "tool_call_id": "c1"},
                {"role": "assistant", "content": "It is clear."})
    prompt = few_shot_messages(Example(messages, "f:1", (WEATHER,)), [])
    assert prompt[1]["tool_calls"][0]["function"]["name"] == "get_weather" and "weight" not in prompt[1]
    assert prompt[2]["tool_call_id"] == "c1"


def test_report_shows_tool_call_columns_and_rows(tiny_model, held_out, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    right = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    entries = []
    for name, first in (("base · zero-shot", "no idea"), ("fine-tuned · run", right)):
        answers = {"Weather in Paris?": first, "Oslo weather in C please": first, "Is it raining in Rome?": first,
                   '{"sky": "clear"}': "ok"}
        monkeypatch.setattr(tasks, "generate", canned(answers)[0])
        entries.append((name, evaluate_examples(None, tokenizer, load_examples(held_out))))
    markdown, page = write_report(entries, [], tmp_path / "report", "Tools")
    text, html = markdown.read_text(), page.read_text()
    assert "| tool name acc. | tool args parse | tool exact match | tool argument acc. |" in text
    assert "## Tool calls" in text and "<h2>Tool calls</h2>" in html
    assert "| fine-tuned · run | 3 | 100.0% | 100.0% | 100.0% | 33.3% | 25.0% |" in text
    assert 'get_weather({"city": "Paris"}) ✓' in text  # sample outputs show the parsed call


# --- the worked example --------------------------------------------------------------------


def test_example_data_and_config(tmp_path):
    from finesmith.config import load_config

    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    train, held_out = load_examples(str(tmp_path / "train.jsonl")), load_examples(str(tmp_path / "eval.jsonl"))
    assert len(train) == 64 and len(held_out) == 60
    assert all(ex.tools and ex.answer_tool_calls for ex in held_out)
    assert any(ex.messages[-1]["role"] == "assistant" and not ex.answer_tool_calls for ex in train)
    assert any(m["role"] == "tool" for ex in train for m in ex.messages)
    assert (tmp_path / "train.jsonl").read_bytes() == (EXAMPLE / "train.jsonl").read_bytes()  # seeded, shipped
    train_requests = {m["content"] for ex in train for m in ex.messages if m["role"] == "user"}
    assert not train_requests & {ex.messages[1]["content"] for ex in held_out}
    config = load_config(str(EXAMPLE / "config.yaml"))
    assert config.tool_format == "hermes" and config.method == "lora"
