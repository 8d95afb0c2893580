"""The hosted fine-tuning service's own example code, run against finesmith.

Each block below is the hosted documentation's example as its users have it — supervised,
DPO, and reinforcement fine-tuning with a `multi` grader — with one change: the client's
`base_url` (and `api_key`) point at `finesmith serve`. The model names and file ids the
examples used are variables here, because a local server serves local models.

    finesmith serve smollm2-135m-instruct --api-key secret &
    python examples/hosted_migration/hosted_examples.py --base-url http://127.0.0.1:8000/v1 \
        --api-key secret --model smollm2-135m-instruct

Tested on the tiny test model (`tests/test_jobs_rft.py::test_the_hosted_examples_run_unchanged`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from openai import OpenAI

QA = [("What colour is the sky?", "blue"), ("How many legs does a cat have?", "four"), ("What is 2 plus 2?", "4"),
      ("Capital of France?", "Paris"), ("Opposite of hot?", "cold"), ("First letter of the alphabet?", "a"),
      ("Say hello.", "hello"), ("Colour of grass?", "green"), ("What do bees make?", "honey"),
      ("Freezing point of water in C?", "0"), ("How many days in a week?", "seven"), ("Largest planet?", "Jupiter")]


def write_files(folder: Path) -> dict[str, Path]:
    """The three data shapes of the hosted docs: chat examples, preference pairs, RFT prompts."""
    rows = {
        "mydata.jsonl": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                         for q, a in QA],
        "preferences.jsonl": [{"input": {"messages": [{"role": "user", "content": q}]},
                               "preferred_output": [{"role": "assistant", "content": a}],
                               "non_preferred_output": [{"role": "assistant", "content": "I do not know."}]}
                              for q, a in QA],
        "rft.jsonl": [{"messages": [{"role": "user", "content": q}], "reference_answer": a} for q, a in QA],
    }
    for name, data in rows.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return {name: folder / name for name in rows}


def wait(client: OpenAI, job_id: str, timeout: float = 600) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)
    raise TimeoutError(f"{job_id} did not finish in {timeout:.0f} s")


def main(base_url: str, api_key: str, model: str, folder: Path) -> list[object]:
    files = write_files(folder)
    client = OpenAI(base_url=base_url, api_key=api_key)  # the one change: base_url (and the key)

    # --- supervised fine-tuning (the hosted docs' example) ---
    training = client.files.create(file=open(files["mydata.jsonl"], "rb"), purpose="fine-tune")
    supervised = client.fine_tuning.jobs.create(
        training_file=training.id,
        model=model,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 1}},
        },
    )

    # --- direct preference optimization (the hosted docs' example) ---
    preferences = client.files.create(file=open(files["preferences.jsonl"], "rb"), purpose="fine-tune")
    dpo = client.fine_tuning.jobs.create(
        training_file=preferences.id,
        model=model,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.1}},
        },
    )

    # --- reinforcement fine-tuning with a multi grader (the hosted docs' example) ---
    grader = {
        "type": "multi",
        "name": "answer quality",
        "graders": {
            "exact": {"type": "string_check", "name": "exact match", "input": "{{ sample.output_text }}",
                      "reference": "{{ item.reference_answer }}", "operation": "ilike"},
            "similar": {"type": "text_similarity", "name": "similarity", "input": "{{ sample.output_text }}",
                        "reference": "{{ item.reference_answer }}", "evaluation_metric": "fuzzy_match"},
            "concise": {"type": "python", "name": "concise", "source": (
                "def grade(sample, item):\n"
                "    return 1.0 if len(sample['output_text'].split()) <= 5 else 0.0\n")},
        },
        "calculate_output": "0.5 * exact + 0.3 * similar + 0.2 * concise",
    }
    client.fine_tuning.alpha.graders.validate(grader=grader)
    print(client.fine_tuning.alpha.graders.run(grader=grader, model_sample="Paris",
                                               item={"reference_answer": "Paris"}).reward)
    prompts = client.files.create(file=open(files["rft.jsonl"], "rb"), purpose="fine-tune")
    rft = client.fine_tuning.jobs.create(
        training_file=prompts.id,
        validation_file=prompts.id,
        model=model,
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader,
                "hyperparameters": {"n_epochs": 1, "batch_size": 4, "eval_interval": 1},
            },
        },
    )

    finished = [wait(client, job.id) for job in (supervised, dpo, rft)]
    for job in finished:
        print(job.id, job.method.type, job.status, job.fine_tuned_model, job.error.message if job.error else "")
    for event in client.fine_tuning.jobs.list_events(rft.id, limit=5).data:
        print(event.message)
    return finished


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="secret")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        jobs = main(args.base_url, args.api_key, args.model, Path(folder))
    raise SystemExit(0 if all(j.status == "succeeded" for j in jobs) else 1)
