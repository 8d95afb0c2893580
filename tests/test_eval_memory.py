"""Evaluation memory stays flat as the held-out set grows, and the memory budget sizes the work.

The engine holds a group's shared prefix once (lent by reference), keeps of a row waiting to be
decoded only its own prompt tokens and trie path, decodes the pool once it holds `plan.pool`
rows, and lets nothing of a row outlive its answer but the answer and the scores. Measured here
as the tensor memory alive (every live tensor but the model's own) where it is largest: as a
pool of waiting rows starts decoding.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QA, chat, write_jsonl
from finesmith.advise.memory import EvalShape, estimate_eval_memory, eval_working_bytes, kv_bytes_per_token
from finesmith.cli import main
from finesmith.core.templates import stop_token_ids
from finesmith.data.tokenize import prompt_ids, tokens_and_mask
from finesmith.errors import FinesmithError
from finesmith.evaluate import engine as engine_module
from finesmith.evaluate.budget import model_shape, parse_memory
from finesmith.evaluate.engine import Job, PromptEngine, continuation_trie
from finesmith.evaluate.loglik import answer_only

SYSTEM = ("You are a careful assistant for a small quiz. Read the question, think about the one word that "
          "answers it, and reply with that word only. Questions come from many subjects: colours, animals, "
          "numbers, capitals, opposites, letters, greetings, plants, insects, water, weeks and planets.")
CANDIDATES = ["blue", "four legs", "Paris", "a", "billing / low", "billing / high"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def quiz(n: int, shots=QA[-4:], lead: str = "") -> list[list[dict]]:
    """n distinct quiz prompts, each with the same system prompt and shots in front (one group)."""
    turns = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return [[{"role": "system", "content": SYSTEM}, *turns,
             {"role": "user", "content": f"{lead}{QA[i % len(QA)][0]} ({i})"}] for i in range(n)]


def jobs_for(tokenizer, prompts, group=None) -> list[Job]:
    jobs = []
    for messages in prompts:
        ids = prompt_ids(tokenizer, messages)
        rendered = [tokens_and_mask(tokenizer, answer_only(messages, c)) for c in CANDIDATES]
        jobs.append(Job(ids, continuation_trie(ids, rendered), group))
    return jobs


def reference_answer(model, tokenizer, ids, max_new_tokens):
    stops = stop_token_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None)
    return [t for t in out[0, len(ids):].tolist() if t not in stops]


def reference_scores(model, tokenizer, messages):
    scores = []
    for candidate in CANDIDATES:
        ids, mask = tokens_and_mask(tokenizer, answer_only(messages, candidate))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        scores.append(sum(float(logprobs[j - 1, ids[j]]) for j in range(1, len(ids)) if mask[j]))
    return scores


def live_tensor_bytes(model) -> int:
    """Bytes of every tensor storage alive in the process except the model's parameters and buffers."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in own:
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards are all overhead: one thread keeps them fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pooled_peaks(model, monkeypatch) -> list[int]:
    """Record the live tensor bytes each time a pool starts decoding (when the most rows wait)."""
    samples: list[int] = []
    flush = engine_module.PromptEngine._flush

    def before_flush(self, *args):
        samples.append(live_tensor_bytes(model))
        return flush(self, *args)

    monkeypatch.setattr(engine_module.PromptEngine, "_flush", before_flush)
    return samples


def test_retained_memory_does_not_grow_with_the_rows(tiny, monkeypatch):
    """64 vs 256 rows with a long shared prefix: the peak of what is held between steps is the
    same, and it is the prefix once plus each pooled row's own tokens, never a prefix per row."""
    model, tokenizer = tiny
    peaks, plans = {}, {}
    for rows in (64, 256):
        jobs = jobs_for(tokenizer, quiz(rows))
        engine = PromptEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), 16)
        gc.collect()
        before = live_tensor_bytes(model)
        samples = pooled_peaks(model, monkeypatch)
        outcomes = engine.run(jobs, max_new_tokens=6, n_candidates=len(CANDIDATES))
        assert all(o.answer_ids is not None and len(o.scores) == len(CANDIDATES) for o in outcomes)
        peaks[rows], plans[rows] = max(samples) - before, engine.plan
        monkeypatch.undo()
        gc.collect()
        assert live_tensor_bytes(model) <= before  # nothing of the run outlives it
    assert (plans[64].batch, plans[64].pool) == (plans[256].batch, plans[256].pool) == (16, 64)
    assert peaks[256] <= 1.1 * peaks[64]
    # the prefix is long and each row's own part short: a copy of the prefix per pooled row
    # (what grew before) would be many times this bound
    plan, kv = plans[256], kv_bytes_per_token(model_shape(model), "cpu")
    assert plan.prefix > 4 * plan.prompt
    held = plan.prefix * kv + plan.pool * (plan.prompt + 2 * plan.answer) * kv  # prompt, path, answer
    assert peaks[256] <= 2 * held
    assert peaks[256] < plan.pool * plan.prefix * kv / 2
    # the advisor's estimate of the same work covers what was held
    assert peaks[256] <= eval_working_bytes(estimate_eval_memory(model_shape(model), plan))


def test_a_small_budget_gives_small_batches_and_pools_and_the_same_results(tiny):
    model, tokenizer = tiny
    prompts = quiz(10)
    jobs = jobs_for(tokenizer, prompts)
    stops = stop_token_ids(tokenizer)
    wide_engine = PromptEngine(model, tokenizer.pad_token_id, stops, 16)
    wide = wide_engine.run(jobs, 5, len(CANDIDATES))
    plan = wide_engine.plan
    assert (plan.batch, plan.pool) == (16, 64)
    budget = eval_working_bytes(estimate_eval_memory(model_shape(model), EvalShape(
        plan.prefix, plan.prompt, plan.candidates, plan.answer, batch=2, pool=2)))
    narrow = PromptEngine(model, tokenizer.pad_token_id, stops, 16, memory=budget)
    outcomes = narrow.run(jobs, 5, len(CANDIDATES))
    assert (narrow.plan.batch, narrow.plan.pool) == (2, 2)
    for messages, job, a, b in zip(prompts, jobs, wide, outcomes):
        assert a.answer_ids == b.answer_ids == reference_answer(model, tokenizer, job.ids, 5)
        assert b.scores == pytest.approx(a.scores, abs=1e-5)
        assert b.scores == pytest.approx(reference_scores(model, tokenizer, messages), abs=1e-4)


def test_rows_whose_batch_shares_more_than_the_group_wait_in_one_pool(tiny, monkeypatch):
    """Batches whose own common prefix extends the group's (here a long lead on each half of the
    questions) are pooled over the group's prefix, their extra part copied into each row."""
    model, tokenizer = tiny
    extra, rebase = [], engine_module._rebase

    def recording(rows, base):
        extra.append(len(rows.prefix) - len(base))
        return rebase(rows, base)

    monkeypatch.setattr(engine_module, "_rebase", recording)
    short = quiz(4, lead="Quick one for you, answer in one word please, thanks a lot: ")
    long = quiz(4, lead="Here is a somewhat longer question from the second half of the quiz, answer in one "
                        "word only and do not explain anything at all: ")
    prompts = short + long
    jobs = jobs_for(tokenizer, prompts)
    engine = PromptEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), 4, decode_rows=8)
    outcomes = engine.run(jobs, 5, len(CANDIDATES))
    assert len(extra) == 2 and min(extra) >= engine_module.MIN_SHARED_PREFIX  # both batches, one pool
    for job, outcome in zip(jobs, outcomes):
        assert outcome.answer_ids == reference_answer(model, tokenizer, job.ids, 5)


def test_memory_sizes_parse_and_refuse_in_one_line(tiny, tmp_path, capsys):
    assert parse_memory("auto") is None and parse_memory("4GB") == 4 * 10**9
    assert parse_memory("2.5GiB") == int(2.5 * 2**30) and parse_memory("800 MB") == 800 * 10**6
    for bad in ("lots", "-1GB", "4XB", "0"):
        with pytest.raises(FinesmithError, match="give a size such as 4GB"):
            parse_memory(bad)
    model, tokenizer = tiny
    jobs = jobs_for(tokenizer, quiz(2))
    with pytest.raises(FinesmithError, match="cannot hold one prompt"):
        PromptEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), memory=1000).run(jobs, 4, 6)
    data = write_jsonl(tmp_path / "d.jsonl", [chat(q, a) for q, a in QA])
    code = main(["eval", "--model", "unused", "--data", data, "--eval-memory", "lots"])
    err = capsys.readouterr().err
    assert code == 2 and "--eval-memory 'lots'" in err and "Traceback" not in err


def test_few_shot_advice_is_an_evaluation_estimate():
    from finesmith.advise.memory import RunShape, estimate_memory, fit_eval_batches
    from finesmith.advise.model_shape import ModelShape

    shape = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152,
                       tied_embeddings=True)
    advice = estimate_memory(shape, RunShape("few_shot", tokens=1200, supervised=0))
    assert {"shared prefix", "prompt batch", "decoding pool"} <= set(advice.components)
    work = EvalShape(prefix=700, prompt=60, candidates=60, answer=32)
    more_rows = estimate_eval_memory(shape, EvalShape(prefix=700, prompt=60, candidates=60, answer=32, pool=128))
    assert estimate_eval_memory(shape, work).peak < more_rows.peak
    # a budget shrinks the pool first, then the batch
    fitted = fit_eval_batches(shape, work, eval_working_bytes(estimate_eval_memory(shape, work)) - 1)
    assert fitted.batch == 16 and fitted.pool == 32
    assert fit_eval_batches(shape, work, 1000) is None


def test_a_log_of_compare_shows_progress_lines(tiny_model, tmp_path):
    """stdout to a file (not a terminal): a line per approach and plain progress lines."""
    train = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA * 2])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [chat(q + "?", a) for q, a in QA * 2])
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    with log.open("w") as out, contextlib.redirect_stdout(out):
        assert main(["train", "--model", tiny_model, "--data", train, "--output", str(run_dir), "--max-steps", "1",
                     "--batch-size", "4", "lora.r=2"]) == 0
        assert main(["compare", str(run_dir), "--base", tiny_model, "--data", held_out, "--shots", "2",
                     "--shots-from", train, "--max-new-tokens", "3", "--batch-size", "2",
                     "--output", str(tmp_path / "report")]) == 0
    lines = log.read_text().splitlines()
    for index, name in enumerate(("base · zero-shot", "base · 2-shot", f"fine-tuned · {run_dir}"), start=1):
        assert f"[{index}/3] {name}" in lines
        assert any(line.startswith(f"[{index}/3] {name}: accuracy ") for line in lines)
    assert lines.count("  answering + scoring labels: 24 rows") == 3  # each pass says it starts
    progress = [line for line in lines if "rows/s" in line]
    assert len(progress) >= 3 * 3  # as each ~10% of the 24 rows is answered, for each approach
    assert "answering + scoring labels: 24/24 rows (100%)" in progress[-1] and "s elapsed" in progress[-1]
    assert not any("\x1b[" in line for line in lines)  # plain text, no terminal codes


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "phi3", "olmo2", "gemma3"])
def test_every_family_answers_and_scores_like_each_prompt_alone(family, tmp_path):
    """The engine runs the decoder and the LM head separately (the head only where logits are
    read): every family's answers and label scores still equal plain generation and a full
    forward; models with a sliding window are left to the batched-generate path."""
    from families import make_family_model
    from finesmith.evaluate.engine import supports

    folder = make_family_model(tmp_path / family, family)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    if family == "gemma3":
        assert not supports(model)
        return
    assert supports(model)
    prompts = quiz(5, shots=QA[-2:])
    jobs = jobs_for(tokenizer, prompts)
    outcomes = PromptEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), 2, decode_rows=2).run(
        jobs, 4, len(CANDIDATES))
    for messages, job, outcome in zip(prompts, jobs, outcomes):
        assert outcome.answer_ids == reference_answer(model, tokenizer, job.ids, 4)
        assert outcome.scores == pytest.approx(reference_scores(model, tokenizer, messages), abs=1e-4)
