"""The README's supported-models table, filled from the family test matrix.

Runs the tests that prove each family (tiny random models of each architecture with the
family's real chat template, `tests/families.py`), reads their outcomes from pytest's JUnit
XML, and writes one cell per family and capability:

| column | tests |
|---|---|
| mask | `tests/test_family_masks.py`: golden answer masks on multi-turn conversations with a system prompt (with tools where the template renders them) |
| LoRA, full | `tests/test_family_cli.py` (`finesmith train` in a fresh process) and `tests/test_family_arch.py` (loss goes down, LoRA merges exactly) |
| packing | `tests/test_family_arch.py`: packed rows equal separate examples |
| eval | `tests/test_family_cli.py`: `finesmith eval` of the LoRA run |
| hf export | `tests/test_family_cli.py`: `finesmith export --format hf --verify` |
| GGUF | `tests/test_family_cli.py`: `finesmith export --format gguf --verify` (llama.cpp's greedy tokens equal the merged model's) |
| serve | `tests/test_family_cli.py`: `finesmith serve` answers a chat request |

A cell is "yes" when every test behind it passed, "no" when one failed, "skipped" when they
were skipped (e.g. no llama.cpp bindings).

    python bench/supported_models.py [--readme]    # --readme rewrites the table in README.md

Writes bench/results/supported_models.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from families import FAMILIES, SPECS  # noqa: E402

FILES = ("tests/test_family_masks.py", "tests/test_family_arch.py", "tests/test_family_cli.py")
COLUMNS = ("mask", "LoRA", "full", "packing", "eval", "hf export", "GGUF in llama.cpp", "serve")
CLI_TESTS = {"test_lora_trains": "LoRA", "test_full_trains": "full", "test_eval": "eval",
             "test_export_hf_verify": "hf export", "test_export_gguf_verify": "GGUF in llama.cpp",
             "test_serve_answers": "serve", "test_data_check": "mask"}
ARCH_TESTS = {"test_packed_rows_equal_separate_examples": ("packing",),
              "test_training_lowers_the_loss_and_lora_merges_exactly": ("LoRA", "full")}
MASK_TESTS = ("test_multi_turn_mask_with_system", "test_tool_call_and_result_masks",
              "test_trained_answer_follows_the_inference_prompt")
START, END = "<!-- supported-models:start -->", "<!-- supported-models:end -->"
NAMES = {"llama": "Llama 3.x", "qwen2": "Qwen2 / Qwen2.5", "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE",
         "gemma3": "Gemma 3", "mistral": "Mistral", "phi3": "Phi-3 / 3.5", "olmo2": "OLMo 2"}


def outcomes(junit: Path) -> list[tuple[str, str, str]]:
    """(file stem, test name with parameters, outcome) for every test case in a JUnit XML file."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None else
                   "skipped" if case.find("skipped") is not None else "passed")
        rows.append((case.get("classname", ""), case.get("name", ""), outcome))
    return rows


def cells(rows: list[tuple[str, str, str]]) -> dict[str, dict[str, str]]:
    """family -> column -> yes | no | skipped."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    by_template = defaultdict(list)
    for family in FAMILIES:
        by_template[SPECS[family].template].append(family)
    for classname, name, outcome in rows:
        base, _, params = name.partition("[")
        params = params.rstrip("]").split("-") if params else []
        if classname.endswith("test_family_cli") or ".Test" in classname:
            cls = classname.rsplit(".", 1)[-1]
            family = next((f for f in FAMILIES if cls.lower() == "test" + f.replace("_", "")), None)
            if family and base in CLI_TESTS:
                found[(family, CLI_TESTS[base])].append(outcome)
        elif classname.endswith("test_family_arch") and base in ARCH_TESTS:
            family = next((p for p in params if p in FAMILIES), None)
            for column in ARCH_TESTS[base] if family else ():
                found[(family, column)].append(outcome)
        elif classname.endswith("test_family_masks") and base in MASK_TESTS:
            family = next((p for p in params if p in FAMILIES), None)
            for same in by_template[SPECS[family].template] if family else ():
                found[(same, "mask")].append(outcome)
    table = {}
    for family in FAMILIES:
        table[family] = {}
        for column in COLUMNS:
            results = found.get((family, column), [])
            table[family][column] = ("no" if "failed" in results else "yes" if "passed" in results else
                                     "skipped" if results else "untested")
    return table


def markdown(table: dict[str, dict[str, str]]) -> str:
    lines = ["| family (architecture · chat template) | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for family, row in table.items():
        spec = SPECS[family]
        label = f"{NAMES.get(family, family)} ({spec.config_class.removesuffix('Config')} · {spec.template})"
        lines.append(f"| {label} | " + " | ".join(row[c] for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="rewrite the table between the markers in README.md")
    parser.add_argument("--workers", default="2", help="pytest-xdist processes")
    args = parser.parse_args()
    junit = Path(tempfile.mkdtemp(prefix="supported-models-")) / "junit.xml"
    started = time.time()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", args.workers, "--dist", "loadscope",
                    f"--junitxml={junit}", *FILES], cwd=ROOT)
    table = cells(outcomes(junit))
    text = markdown(table)
    print(text)
    result = {"date": time.strftime("%Y-%m-%d"), "command": "python bench/supported_models.py",
              "seconds": round(time.time() - started), "table": table}
    out = HERE / "results" / "supported_models.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.readme:
        readme = ROOT / "README.md"
        body = readme.read_text(encoding="utf-8")
        if START not in body or END not in body:
            sys.exit(f"README.md has no {START} ... {END} block to fill")
        block = f"{START}\n{text}\n{END}"
        readme.write_text(re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, body, flags=re.S),
                          encoding="utf-8")
        print(f"README.md table updated; results in {out}")


if __name__ == "__main__":
    main()
