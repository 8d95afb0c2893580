"""Many fine-tunes on one base: LoRA runs and checkpoints served unmerged from one loaded model,
routed per row in mixed batches, loaded on first use and dropped least-recently-used."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import QA, chat, write_jsonl
from finesmith.cli import main
from finesmith.serve.adapters import AdapterView, SharedBase
from finesmith.serve.engine import Sampling, load_engine
from finesmith.serve.registry import ModelRegistry

PROMPTS = [[{"role": "user", "content": q}] for q, _ in QA[:5]]
TOKENS = 8


@pytest.fixture(scope="module")
def runs(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four LoRA runs of the tiny model, each with its step-1 checkpoint; high learning rates and
    different seeds, so each answers differently."""
    root = tmp_path_factory.mktemp("adapters")
    data = write_jsonl(root / "train.jsonl", [chat(q, a) for q, a in QA])
    out = []
    for i in range(4):
        run = root / f"run{i}"
        assert main(["train", "--model", tiny_model, "--data", data, "--method", "lora", "--output", str(run),
                     "--max-steps", "2", "--batch-size", "4", "--lr", f"{5e-2 * (i + 1)}", f"seed={i}",
                     "save_every=1", "keep_checkpoints=2"]) == 0
        out.append(run)
    return out


def answer(engine, messages) -> list[int]:
    generation = engine.generate(engine.chat_ids(messages), Sampling(TOKENS))
    generation.text()
    return generation.tokens


def together(engines, prompts) -> list[list[int]]:
    """Greedy tokens of every (engine, prompt) pair, generated as one batch on their shared worker."""
    core = engines[0].core
    generations = [e.generate(e.chat_ids(p), Sampling(TOKENS)) for e, p in zip(engines, prompts)]
    with core._state:  # all queued before the worker takes a batch
        for g in generations:
            g.submit()
    for g in generations:
        assert g.done.wait(60)
        assert g.finish_reason in ("stop", "length")
    assert {g.batch_size for g in generations} == {len(generations)}
    return [g.tokens for g in generations]


def test_a_mixed_batch_answers_each_row_as_its_adapter_alone(tiny_model: str, runs: list[Path]) -> None:
    registry = ModelRegistry()
    names = [registry.add(tiny_model, "base")] + [registry.add(str(r), f"ft:{i}") for i, r in enumerate(runs)]
    try:
        engines = [registry.engine(n) for n in names]
        assert all(isinstance(e, AdapterView) for e in engines) and len(registry.loaded()) == 1
        # each prompt asked of every model, in one batch of 5 rows (4 adapters + the base) per prompt
        mixed = {}
        for shift in range(2):
            prompts = [PROMPTS[(i + shift) % len(PROMPTS)] for i in range(len(engines))]
            for i, tokens in enumerate(together(engines, prompts)):
                mixed[i, (i + shift) % len(PROMPTS)] = tokens
        for (i, p), tokens in mixed.items():
            assert tokens == answer(engines[i], PROMPTS[p])  # alone
        answers = {i: mixed[i, i] for i in range(len(engines))}
        assert len({tuple(t) for t in answers.values()}) > 2  # the fine-tunes do differ
        for i, spec in enumerate([tiny_model] + [str(r) for r in runs]):  # the old merged load
            merged = load_engine(spec, "cpu")
            try:
                assert answer(merged, PROMPTS[i]) == answers[i], names[i]
            finally:
                merged.close()
    finally:
        registry.close()


def test_adapters_beyond_the_limit_are_dropped_and_reload_the_same(runs: list[Path]) -> None:
    registry = ModelRegistry(max_adapters=2)
    names = [registry.add(str(r), f"ft:{i}") for i, r in enumerate(runs[:3])]
    try:
        first = [answer(registry.engine(n), PROMPTS[0]) for n in names]
        core = registry.loaded()[0]
        assert isinstance(core, SharedBase) and core.loads == 3
        assert list(core.resident) == ["a1", "a2"] and set(core.model.peft_config) == {"a1", "a2"}
        assert answer(registry.engine(names[0]), PROMPTS[0]) == first[0]  # reloaded, a1 dropped
        assert core.loads == 4 and list(core.resident) == ["a2", "a0"]
        # a batch never holds more adapters than the limit: the third request waits a batch
        engines = [registry.engine(n) for n in names]
        generations = [e.generate(e.chat_ids(PROMPTS[0]), Sampling(TOKENS)) for e in engines]
        with core._state:
            for g in generations:
                g.submit()
        for g, expected in zip(generations, first):
            assert g.done.wait(60) and g.tokens == expected
        assert sorted(g.batch_size for g in generations) == [1, 2, 2]
    finally:
        registry.close()


def test_eight_adapters_share_one_base(tiny_model: str, runs: list[Path]) -> None:
    registry = ModelRegistry()
    registry.add(tiny_model, "base")
    names = []
    for i, run in enumerate(runs):
        names.append(registry.add(str(run), f"ft:tiny:{i}"))
        names += registry.add_checkpoints(run, f"ft:tiny:{i}")[:1]  # its step-1 checkpoint
    assert len(names) == 8
    try:
        engines = [registry.engine(n) for n in ["base"] + names]
        assert len(registry.loaded()) == 1 and len(registry.bases) == 1
        core = registry.loaded()[0]
        out = together(engines, [PROMPTS[0]] * len(engines))
        assert len(core.model.peft_config) == 8 and core.loads == 8
        embedding = core.base.get_input_embeddings().weight
        for engine in engines:
            assert engine.model.get_base_model() is core.base
            assert engine.model.get_input_embeddings().weight.data_ptr() == embedding.data_ptr()
        assert out == [answer(e, PROMPTS[0]) for e in engines]  # each row as its model alone
        assert len({tuple(t) for t in out}) > 2
    finally:
        registry.close()


@pytest.mark.parametrize("override", ["lora.use_dora=true", "lora.modules_to_save=[embed_tokens]"])
def test_adapters_peft_cannot_mix_get_their_own_merged_engine(override: str, tiny_model: str, runs: list[Path],
                                                                 tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    assert main(["train", "--model", tiny_model, "--data", data, "--method", "lora", "--output", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "5e-2", override]) == 0
    registry = ModelRegistry()
    registry.add(str(tmp_path / "run"), "own")
    registry.add(str(runs[0]), "shared")
    try:
        own, shared = registry.engine("own"), registry.engine("shared")
        assert not isinstance(own, AdapterView) and not hasattr(own.model, "peft_config")
        assert isinstance(shared, AdapterView) and len(registry.loaded()) == 2
        assert answer(own, PROMPTS[0]) == answer(load_engine(str(tmp_path / "run"), "cpu"), PROMPTS[0])
    finally:
        registry.close()


def test_no_sharing_with_max_adapters_0(runs: list[Path]) -> None:
    registry = ModelRegistry(max_adapters=0)  # every fine-tune merged into its own model, as before
    registry.add(str(runs[0]), "ft:0")
    try:
        engine = registry.engine("ft:0")
        assert not isinstance(engine, AdapterView) and not hasattr(engine.model, "peft_config")
    finally:
        registry.close()


def test_the_api_lists_and_answers_every_fine_tune_of_one_base(tiny_model: str, runs: list[Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from finesmith.serve.http import allowed_host_list
    from finesmith.serve.server import build_app

    registry = ModelRegistry()
    registry.add(tiny_model, "base")
    names = [registry.add(str(r), f"ft:tiny:finesmith:{i}") for i, r in enumerate(runs[:3])]
    names += registry.add_checkpoints(runs[0], names[0])
    app = build_app(registry, allowed_hosts=allowed_host_list("127.0.0.1", 8000))
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    try:
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert listed == ["base"] + names

        def ask(name: str) -> str:
            body = {"model": name, "messages": PROMPTS[1], "max_tokens": TOKENS, "temperature": 0}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(len(listed)) as pool:  # at once: they batch together on the one worker
            together = list(pool.map(ask, listed))
        assert together == [ask(name) for name in listed]
        assert len(registry.loaded()) == 1
    finally:
        registry.close()


def test_echoed_prompt_logprobs_are_the_adapters(tiny_model: str, runs: list[Path]) -> None:
    registry = ModelRegistry()
    registry.add(tiny_model, "base")
    registry.add(str(runs[1]), "ft:1")
    merged = load_engine(str(runs[1]), "cpu")
    try:
        registry.engine("base")
        view = registry.engine("ft:1")

        def prompt_logprobs(engine) -> list[float]:
            generation = engine.generate(engine.text_ids("The sky is blue and the grass is green."),
                                         Sampling(0, echo=True, logprobs=1))
            generation.text()
            return [r.logprob for r in generation.prompt_records[1:]]

        shared, alone = prompt_logprobs(view), prompt_logprobs(merged)
        assert shared == pytest.approx(alone, abs=1e-4)
        assert prompt_logprobs(registry.engine("base")) != pytest.approx(alone, abs=1e-4)
    finally:
        registry.close()
        merged.close()
