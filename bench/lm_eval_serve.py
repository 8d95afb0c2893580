"""lm-evaluation-harness against `finesmith serve`: a log-likelihood task and a generation task.

    python bench/lm_eval_serve.py [--venv .venv-lmeval] [--limit N]

lm-eval (PyPI `lm-eval[api]`) lives in its own virtual environment (created with
`--venv` when missing: torch 2.13 CPU, then `lm-eval[api]`), so it never touches the
project's. The script starts a real `finesmith serve smollm2-135m-instruct` with its
default settings (loopback, no key) and runs lm-eval's `local-completions` model with its
default settings, naming only the model and the URL: lm-eval finds the server's
`/tokenizer_info` and `/tokenize`, tokenizes with the served model's own tokenizer and
sends token ids (no tokenizer of its own, nothing from the hub), on two tasks written as
local files (no data set is downloaded):

- `finesmith_sentiment` (log-likelihood, `multiple_choice`): lm-eval's own `glue/sst2`
  prompt and choices (`{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:`,
  ` negative` / ` positive`), on 200 short movie-review sentences this script writes
  (seeded; 100 positive, 100 negative). lm-eval asks `/v1/completions` for the prompt's
  token log-probabilities (`echo: true`, `max_tokens: 0`, `logprobs: 1`).
- `finesmith_capitals` (generation, `generate_until`): three fixed examples (Iceland, Jordan,
  Ghana) then `Q: What is the capital of X?\\nA:` over 48 other countries, exact match
  after stripping, greedy until a newline.

Then the same log-likelihood choices are computed by a direct forward of the model in
this process, and the per-question choices compared with lm-eval's (`--log_samples`): they
must agree. Writes bench/results/lm_eval_serve.json with the scores, the agreement and the
commands.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "lm_eval_serve.json"
MODEL = "smollm2-135m-instruct"

POSITIVE = ["a warm, funny and moving film", "the acting is superb", "an absolute delight from start to finish",
            "beautifully shot and wonderfully acted", "I loved every minute of it", "a clever and charming story",
            "the best film I have seen this year", "a joyful, uplifting experience", "smart, touching and true",
            "the soundtrack is gorgeous", "a triumph of storytelling", "funny, tender and full of heart"]
NEGATIVE = ["a dull, lifeless mess", "the acting is wooden", "a tedious waste of two hours",
            "badly written and poorly acted", "I hated every minute of it", "a clumsy and boring story",
            "the worst film I have seen this year", "a grim, joyless slog", "shallow, silly and false",
            "the soundtrack is grating", "a disaster of storytelling", "cold, cynical and empty"]
OPENINGS = ["", "honestly, ", "all in all, ", "in the end, ", "frankly, ", "overall, ", "simply put, ",
            "to be fair, "]
ENDINGS = ["", " .", " , and the ending is just as good .", " , start to finish .", " ."]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
            "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
            "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
            "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest", "Belgium": "Brussels",
            "Netherlands": "Amsterdam", "Czechia": "Prague", "Turkey": "Ankara", "Iran": "Tehran",
            "Iraq": "Baghdad", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi",
            "South Korea": "Seoul", "Indonesia": "Jakarta", "Philippines": "Manila", "Australia": "Canberra",
            "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima",
            "Chile": "Santiago", "Colombia": "Bogota", "Kenya": "Nairobi", "Nigeria": "Abuja",
            "Morocco": "Rabat", "Cuba": "Havana", "Brazil": "Brasilia", "United Kingdom": "London",
            "Switzerland": "Bern", "Ukraine": "Kyiv", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad",
            "New Zealand": "Wellington"}

SENTIMENT_TASK = """task: finesmith_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{sentence}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

CAPITALS_TASK = """task: finesmith_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: generate_until
validation_split: validation
doc_to_text: "Q: What is the capital of Iceland?\\nA: Reykjavik\\n\\nQ: What is the capital of Jordan?\\nA: Amman\\n\\nQ: What is the capital of Ghana?\\nA: Accra\\n\\nQ: What is the capital of {{{{country}}}}?\\nA:"
doc_to_target: "{{{{capital}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 16
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""


def sentiment_rows(n: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = len(rows) % 2
        sentence = rng.choice(OPENINGS) + rng.choice(POSITIVE if label else NEGATIVE) + rng.choice(ENDINGS)
        if sentence in seen:
            continue
        seen.add(sentence)
        rows.append({"sentence": sentence, "label": label, "idx": len(rows)})
    return rows


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (venv / "bin" / "lm_eval").exists():
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "lm-eval[api]"], check=True)
    return venv / "bin" / "lm_eval"


def direct_scores(rows: list[dict], tokenizer_dir: str) -> list[list[float]]:
    """The log-likelihood of each sentiment choice of each row by a direct forward of the model (no server)."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from finesmith.model.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_model(MODEL).eval()
    out = []
    with torch.inference_mode():
        for row in rows:
            context = f"{row['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
            scores = []
            for choice in (" negative", " positive"):
                # as lm-eval's API models tokenize: the whole string, split where the context ends
                whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
                head = tokenizer(context, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([whole])
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(head), len(whole))))
            out.append(scores)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv-lmeval"))
    parser.add_argument("--limit", type=int, default=None, help="rows per task (default: all)")
    args = parser.parse_args()
    lm_eval = ensure_venv(Path(args.venv))
    sys.path.insert(0, str(ROOT / "src"))
    from finesmith.model.load import builtin_folder

    tokenizer_dir = str(builtin_folder(MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = sentiment_rows()
        (work / "sentiment.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (work / "capitals.jsonl").write_text("".join(json.dumps({"country": c, "capital": k}) + "\n"
                                                     for c, k in CAPITALS.items()))
        tasks = work / "tasks"
        tasks.mkdir()
        (tasks / "sentiment.yaml").write_text(SENTIMENT_TASK.format(data=work / "sentiment.jsonl"))
        (tasks / "capitals.yaml").write_text(CAPITALS_TASK.format(data=work / "capitals.jsonl"))
        home = work / "home"
        home.mkdir()
        proc, port = start_server(ROOT, home, MODEL)
        command = [str(lm_eval), "--model", "local-completions", "--model_args",
                   f"model={MODEL},base_url=http://127.0.0.1:{port}/v1/completions",
                   "--tasks", "finesmith_sentiment,finesmith_capitals", "--include_path", str(tasks),
                   "--output_path", str(work / "out"), "--log_samples"]
        if args.limit:
            command += ["--limit", str(args.limit)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        began = time.monotonic()
        try:
            run = subprocess.run(command, env=env, capture_output=True, text=True)
        finally:
            stop_server(proc)
        seconds = time.monotonic() - began
        print(run.stdout[-4000:])
        if run.returncode != 0:
            print(run.stderr[-6000:])
            raise SystemExit(f"lm_eval exited with {run.returncode}")
        results_file = max((work / "out").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        results = json.loads(results_file.read_text())["results"]
        samples, arguments = {}, {}
        for path in (work / "out").rglob("samples_finesmith_sentiment_*.jsonl"):
            for line in path.read_text().splitlines():
                sample = json.loads(line)
                samples[sample["doc"]["idx"]] = [float(r[0]) for r in sample["filtered_resps"]]
                arguments[sample["doc"]["idx"]] = sample.get("arguments")
    checked = [r for r in rows if r["idx"] in samples]
    direct = direct_scores(checked, tokenizer_dir)
    served = [samples[r["idx"]] for r in checked]
    agree = sum((s[1] > s[0]) == (d[1] > d[0]) for s, d in zip(served, direct))
    largest = max(abs(a - b) for s, d in zip(served, direct) for a, b in zip(s, d))
    result = {
        "command": "python bench/lm_eval_serve.py " + " ".join(sys.argv[1:]),
        "lm_eval_command": " ".join(command[:1] + ["--model", "local-completions", "--model_args",
                                                   f"model={MODEL},base_url=http://127.0.0.1:PORT/v1/completions"] + command[5:7]
                                    + ["--include_path", "<tasks>"]),
        "date": time.strftime("%Y-%m-%d"), "device": f"cpu, {os.cpu_count()} cores ({platform.machine()})",
        "model": MODEL, "seconds": round(seconds, 1),
        "lm_eval_version": subprocess.run([str(Path(args.venv) / "bin" / "python"), "-c",
                                           "import importlib.metadata as m; print(m.version('lm_eval'))"],
                                          capture_output=True, text=True).stdout.strip(),
        "finesmith_sentiment": {"rows": len(samples), **{k: v for k, v in results["finesmith_sentiment"].items()
                                                        if k != "alias"}},
        "finesmith_capitals": {k: v for k, v in results["finesmith_capitals"].items() if k != "alias"},
        "sentiment_choices_equal_to_direct_forward": f"{agree}/{len(checked)}",
        "sentiment_loglik_largest_difference_to_direct_forward": largest,
        "sentiment_closest_margin": min(abs(d[1] - d[0]) for d in direct),
        "sentiment_largest_differences": sorted(
            ({"idx": r["idx"], "served": s, "direct": d, "arguments": arguments.get(r["idx"])}
             for r, s, d in zip(checked, served, direct)),
            key=lambda x: -max(abs(a - b) for a, b in zip(x["served"], x["direct"])))[:3],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
