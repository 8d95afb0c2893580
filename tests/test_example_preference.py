"""examples/preference: the data generator's output shape and the property checker (no training)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from finesmith.data.formats import PreferenceExample, load_examples

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "preference"


def _module(name: str):
    """The example script as a module (registered, as dataclasses need their module in sys.modules)."""
    key = f"example_preference_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLE / f"{name}.py")
        sys.modules[key] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preference")
    _module("make_data").main(["--out", str(out)])
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sizes_and_shapes(written: Path) -> None:
    sft, pairs, heldout = (_rows(written / f"{n}.jsonl") for n in ("sft", "pairs", "heldout"))
    assert (len(sft), len(pairs), len(heldout)) == (60, 240, 80)
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in sft)
    assert all([m["role"] for m in r["prompt"]] == ["system", "user"] for r in pairs)
    assert all([m["role"] for m in r["messages"]] == ["system", "user"] and r["answer"].isdigit()
               and r["answer"] in r["messages"][1]["content"] for r in heldout)
    # the project's own reader takes the pairs as preference examples
    assert all(isinstance(e, PreferenceExample) for e in load_examples(str(written / "pairs.jsonl")))


def test_prompts_are_disjoint(written: Path) -> None:
    sft = {r["messages"][1]["content"] for r in _rows(written / "sft.jsonl")}
    pairs = {r["prompt"][1]["content"] for r in _rows(written / "pairs.jsonl")}
    heldout = {r["messages"][1]["content"] for r in _rows(written / "heldout.jsonl")}
    assert len(sft) == 60 and len(pairs) == 240 and len(heldout) == 80
    assert not (heldout & sft) and not (heldout & pairs) and not (sft & pairs)


def test_chosen_has_the_property_and_rejected_breaks_it(written: Path) -> None:
    measure = _module("measure")
    pairs = _rows(written / "pairs.jsonl")
    assert all(measure.has_property(r["chosen"]) for r in pairs)
    assert not any(measure.has_property(r["rejected"]) for r in pairs)
    assert all(measure.has_property(r["messages"][2]["content"]) for r in _rows(written / "sft.jsonl"))
    make_data = _module("make_data")
    assert {r["style"] for r in pairs} == set(make_data.STYLES)


def test_seeded(tmp_path: Path, written: Path) -> None:
    _module("make_data").main(["--out", str(tmp_path)])
    for name in ("sft", "pairs", "heldout"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (written / f"{name}.jsonl").read_bytes()


@pytest.mark.parametrize("answer, ok", [("Order: 482113", True), ("  Order: 482113\n", True), ("Order: #482113", False),
                                        ("**Order:** 482113", False), ("482113", False), ("Order: 4821\nThe", False),
                                        ("The order number is 482113.", False), ("order: 482113", False),
                                        ('Order: "482113"', False), ("Order number: 482113", False)])
def test_property_checker(answer: str, ok: bool) -> None:
    assert _module("measure").has_property(answer) is ok
