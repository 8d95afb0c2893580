"""Data formats, file types, the `data` config section, and fuzzing of the row readers."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import chat, write_jsonl
from finesmith.config import DataSettings, load_config
from finesmith.data.formats import Example, PreferenceExample, TextExample, load_examples, parse_records
from finesmith.errors import FinesmithError

ROWS = [chat("What is 2+2?", "4"), chat("Capital of Peru?", "Lima", system="Be brief.")]


def test_each_file_type_loads_the_same_examples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    alpaca = [{"instruction": "What is 2+2?", "output": "4"}, {"instruction": "Capital of Peru?", "output": "Lima"}]
    (tmp_path / "d.csv").write_text("instruction,output\n\"What is 2+2?\",4\n\"Capital of Peru?\",Lima\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(alpaca), tmp_path / "d.parquet")
    by_type = {suffix: load_examples(str(tmp_path / f"d.{suffix}")) for suffix in ("json", "csv", "parquet")}
    assert [e.messages for e in by_type["json"]] == [e.messages for e in load_examples(jsonl)]
    assert [e.source for e in by_type["json"]] == [f"{tmp_path}/d.json:2", f"{tmp_path}/d.json:14"]
    assert [e.source for e in by_type["csv"]] == [f"{tmp_path}/d.csv:2", f"{tmp_path}/d.csv:3"]
    for suffix in ("csv", "parquet"):
        assert [e.answer for e in by_type[suffix]] == ["4", "Lima"]


def test_sharegpt_rows_become_chat_messages(tmp_path):
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello", "weight": 0}, {"from": "human", "value": "Bye"},
                             {"from": "gpt", "value": "Goodbye"}]}
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}
    path = write_jsonl(tmp_path / "s.jsonl", [row, bad])
    results = list(parse_records(path))
    example = results[0][1]
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert example.messages[2]["weight"] == 0
    assert results[1][2].startswith(f"{path}:2: turn 2 has unknown role 'bot'")


def test_raw_text_files_folders_and_rows(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\nbody", encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_text("second", encoding="utf-8")
    examples = load_examples(str(tmp_path / "docs"))
    assert examples == [TextExample("# Title\nbody", f"{tmp_path}/docs/a.md:1"),
                        TextExample("second", f"{tmp_path}/docs/b.txt:1")]
    rows = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}, {"text": ""}])
    results = list(parse_records(rows))
    assert isinstance(results[0][1], TextExample)
    assert results[1][2] == f"{rows}:2: `text` is empty"


def test_preference_pairs_are_a_distinct_validated_type(tmp_path):
    good = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}
    as_messages = {"prompt": [{"role": "user", "content": "Say hi"}],
                   "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": "No."}
    same = {"prompt": "Say hi", "chosen": "Hi", "rejected": "Hi"}
    missing = {"prompt": "Say hi", "chosen": "", "rejected": "x"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, as_messages, same, missing])
    results = list(parse_records(path))
    assert results[0][1] == PreferenceExample(({"role": "user", "content": "Say hi"},), "Hi!", "No.", f"{path}:1")
    assert results[1][1].chosen == "Hi!"
    assert "identical" in results[2][2] and results[2][2].startswith(f"{path}:3")
    assert "`chosen` must be a non-empty string" in results[3][2]


def test_field_mapping_and_explicit_format(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhy?,Because.\n", encoding="utf-8")
    [example] = load_examples(str(path), "alpaca", {"instruction": "question", "output": "answer"})
    assert example.messages == ({"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."})
    with pytest.raises(FinesmithError, match=r"qa.csv:2: missing `instruction` .*data.fields.instruction"):
        load_examples(str(path), "alpaca")


def test_data_config_accepts_a_path_or_a_mapping(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: m\noutput: o\ndata: {path: x.csv, format: alpaca, fields: {instruction: question}}\n")
    config = load_config(str(yaml_file))
    assert config.data == DataSettings("x.csv", "alpaca", {"instruction": "question"})
    plain = load_config(None, ["model=m", "output=o", "data=x.jsonl", "data.format=sharegpt"])
    assert plain.data == DataSettings("x.jsonl", "sharegpt", {})
    flagged = load_config(None, ["model=m", "output=o", "data=x.jsonl"], {"data.path": "y.jsonl"})
    assert flagged.data.path == "y.jsonl"
    for override, key in (("data.format=yaml", "data.format"), ("data.fields.answer=x", "data.fields.answer"),
                          ("data.colour=1", "data.colour")):
        with pytest.raises(FinesmithError, match=key.replace(".", r"\.")) as info:
            load_config(None, ["model=m", "output=o", "data=x.jsonl", override])
        assert "\n" not in str(info.value)


def test_hub_dataset_offline_or_missing_is_one_line():
    with pytest.raises(FinesmithError) as info:
        load_examples("someone/some-dataset")
    assert "\n" not in str(info.value) and "someone/some-dataset" in str(info.value)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["messages", "role", "content", "conversations", "from", "value",
                                                "text", "prompt", "completion", "chosen", "rejected",
                                                "instruction", "output", "input", "weight"]), inner, max_size=4),
                           max_leaves=12)
line = st.one_of(json_values.map(json.dumps), st.binary(max_size=20).map(lambda b: b.decode("latin-1")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, min_size=1, max_size=6))
def test_fuzzed_jsonl_is_accepted_or_rejected_with_a_line_number(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes("\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "surrogatepass") + b"\n")
    for record, example, problem in parse_records(str(path)):
        assert (example is None) or (problem is None)
        if problem is not None:
            assert problem.startswith(f"{path}:") and problem.split(":")[1].split(" ")[0].isdigit()
    try:
        examples = load_examples(str(path))
    except FinesmithError as exc:
        assert str(exc).startswith(f"{path}")
    else:
        assert all(isinstance(e, (Example, TextExample, PreferenceExample)) for e in examples)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.dictionaries(st.sampled_from(["instruction", "output", "input", "prompt", "completion",
                                                      "text", "messages"]), st.text(max_size=6), max_size=4),
                     min_size=1, max_size=4))
def test_fuzzed_csv_rows_are_accepted_or_rejected_with_a_line_number(tmp_path, rows):
    import csv

    path = tmp_path / "fuzz.csv"
    columns = sorted({key for row in rows for key in row}) or ["text"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    for _, example, problem in parse_records(str(path)):
        if problem is not None:
            assert problem.startswith(f"{path}:")
