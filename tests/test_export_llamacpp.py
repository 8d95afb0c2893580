"""GGUF exports run in llama.cpp itself and answer as the trained run does.

The run tests train a tiny run through the CLI, export it with `finesmith export --format
gguf`, load the file with the llama.cpp bindings and feed the same prompt token ids to
both: the greedy continuations must be the same token ids, and the logits of the first
generated position must agree within the f16 (or q8_0) tolerance of `--verify`. The
others write small random models directly, for what needs no training: RoPE scaling,
tokenizers, the head-size metadata.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ASSETS, QA, chat, write_jsonl

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="the llama.cpp bindings are not installed: pip install llama-cpp-python "
                        "(CI installs the prebuilt wheel from ../shared/wheels in .ci/run)")

from finesmith.cli import main  # noqa: E402
from finesmith.data.tokenize import prompt_ids  # noqa: E402
from finesmith.evaluate.generate import generate  # noqa: E402
from finesmith.export.verify import LOGIT_TOLERANCE, PROBE_CHATS  # noqa: E402
from finesmith.model.load import load_model  # noqa: E402
from finesmith.model.methods import load_for_inference  # noqa: E402

GREEDY = 6
PLAIN_TEXT = "The quick brown fox jumps over the lazy dog."


# --- models and runs ----------------------------------------------------------------------

def make_llama(folder: Path, family: str = "chatml", seed: int = 0, **config: object) -> Path:
    """A 2-layer random Llama with the tiny tokenizer of `family`; `config` overrides its settings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shutil.copytree(ASSETS / f"tokenizer-{family}", folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**(settings | config))).save_pretrained(folder)
    return folder


def train_run(root: Path, model: str | Path, method: str, *overrides: str) -> Path:
    data = write_jsonl(root / "train.jsonl", [chat(q, a) for q, a in QA])
    out = root / "run"
    # A high learning rate so two steps move the weights visibly away from the base.
    assert main(["train", *overrides, "--model", str(model), "--data", data, "--method", method, "--output",
                 str(out), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--seed", "0"]) == 0
    return out


def export_gguf(run: Path, out: Path, quant: str = "f16") -> Path:
    assert main(["export", str(run), "--format", "gguf", "--quant", quant, "--output", str(out)]) == 0
    return out / f"{run.name}-{quant}.gguf"


@pytest.fixture(scope="module")
def full_run(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("cpp-full"), tiny_model, "full")


@pytest.fixture(scope="module")
def lora_run(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("cpp-lora"), tiny_model, "lora")


@pytest.fixture(scope="module")
def head_dim_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full run of a model whose heads are 32 wide though hidden / heads is 16, head untied."""
    root = tmp_path_factory.mktemp("cpp-head-dim")
    base = make_llama(root / "base", head_dim=32, tie_word_embeddings=False)
    return train_run(root, base, "full")


TIED_SPLITS = {
    # full trained copies of both tied modules (what new tokens need)
    "modules_to_save": "lora.modules_to_save=[embed_tokens,lm_head]",
    # a low-rank update to the head only: merging must not add it to the embedding too
    "lora_on_lm_head": "lora.target_modules=[q_proj,v_proj,lm_head]",
}


@pytest.fixture(scope="module", params=sorted(TIED_SPLITS))
def tied_split_run(request: pytest.FixtureRequest, tiny_model: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run on the tied tiny model that trains its embedding and LM head apart."""
    return train_run(tmp_path_factory.mktemp(f"cpp-{request.param}"), tiny_model, "lora",
                     TIED_SPLITS[request.param])


# --- the comparison ---------------------------------------------------------------------------

def probe_prompts(tokenizer) -> list[list[int]]:
    """The `--verify` chats rendered by finesmith, plus one plain text, as token ids."""
    return [prompt_ids(tokenizer, c) for c in PROBE_CHATS] + [tokenizer(PLAIN_TEXT)["input_ids"]]


@torch.no_grad()
def run_answers(model, prompts: list[list[int]]) -> list[tuple[np.ndarray, list[int]]]:
    """(logits after the prompt, greedy continuation) of a transformers model, per prompt."""
    answers = []
    for ids in prompts:
        batch = torch.tensor([ids])
        logits = model(input_ids=batch).logits[0, -1].float().numpy()
        out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=GREEDY,
                             do_sample=False, top_p=None, top_k=None, temperature=None, pad_token_id=0,
                             eos_token_id=None)
        answers.append((logits, out[0, len(ids):].tolist()))
    return answers


def llama_cpp_answers(path: Path, prompts: list[list[int]]) -> list[tuple[np.ndarray, list[int]]]:
    """The same from llama.cpp: prompt ids evaluated as given, then its greedy sampler."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=False, n_ctx=256, verbose=False)
    answers = []
    try:
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            logits = logits.copy()
            tokens = []
            for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
                tokens.append(int(token))
                if len(tokens) == GREEDY:
                    break
            answers.append((logits, tokens))
    finally:
        llm.close()
    return answers


def largest_logit_gap(expected, got) -> float:
    return max(float(np.abs(a - b).max()) for (a, _), (b, _) in zip(expected, got))


def assert_same_answers(expected, got, quant: str = "f16", greedy: bool = True) -> None:
    scale = max(np.abs(logits).max() for logits, _ in expected)
    worst = largest_logit_gap(expected, got)
    assert worst / scale <= LOGIT_TOLERANCE[quant], (worst, scale)
    if greedy:
        assert [tokens for _, tokens in got] == [tokens for _, tokens in expected]


def llama_cpp_chat_answers(path: Path) -> list[str]:
    """llama.cpp's own chat path: the file's template, its BOS and stop settings, greedy."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=False, n_ctx=256, verbose=False)
    try:
        return [llm.create_chat_completion(messages=list(c), temperature=0.0, repeat_penalty=1.0,
                                           max_tokens=GREEDY)["choices"][0]["message"]["content"].strip()
                for c in PROBE_CHATS]
    finally:
        llm.close()


def gguf_fields(path: Path) -> tuple[dict, list[str]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}, [t.name for t in reader.tensors]


# --- tests ------------------------------------------------------------------------------------

def test_full_run_answers_the_same_in_llama_cpp(full_run: Path, tmp_path: Path) -> None:
    path = export_gguf(full_run, tmp_path / "gguf")
    model, tokenizer = load_for_inference(str(full_run))
    prompts = probe_prompts(tokenizer)
    assert_same_answers(run_answers(model, prompts), llama_cpp_answers(path, prompts))
    # The tiny model ties its head to the embedding: no `output`, llama.cpp reuses `token_embd`.
    fields, tensors = gguf_fields(path)
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 16
    assert fields["llama.vocab_size"] == len(tokenizer)
    assert llama_cpp_chat_answers(path) == generate(model, tokenizer, list(PROBE_CHATS), max_new_tokens=GREEDY)


def test_lora_run_answers_the_same_in_llama_cpp(lora_run: Path, tiny_model: str, tmp_path: Path) -> None:
    path = export_gguf(lora_run, tmp_path / "gguf")
    model, tokenizer = load_for_inference(str(lora_run))
    prompts = probe_prompts(tokenizer)
    expected = run_answers(model, prompts)
    got = llama_cpp_answers(path, prompts)
    assert_same_answers(expected, got)
    # ...and the adapter matters, so the agreement is not the base model's.
    base = run_answers(load_model(tiny_model).eval(), prompts)
    assert largest_logit_gap(base, got) > 10 * largest_logit_gap(expected, got)


def test_lora_run_q8_0_stays_within_tolerance_in_llama_cpp(lora_run: Path, tmp_path: Path) -> None:
    path = export_gguf(lora_run, tmp_path / "gguf", quant="q8_0")
    model, tokenizer = load_for_inference(str(lora_run))
    prompts = probe_prompts(tokenizer)
    # 8-bit weights may flip a near-tie, so only the logits are held to the q8_0 tolerance.
    assert_same_answers(run_answers(model, prompts), llama_cpp_answers(path, prompts), "q8_0", greedy=False)


def test_explicit_head_dim_and_untied_head_load_in_llama_cpp(head_dim_run: Path, tmp_path: Path) -> None:
    path = export_gguf(head_dim_run, tmp_path / "gguf")
    fields, tensors = gguf_fields(path)
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 32
    assert fields["llama.rope.dimension_count"] == 32 and fields["llama.embedding_length"] == 64
    assert "output.weight" in tensors
    model, tokenizer = load_for_inference(str(head_dim_run))
    assert model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size
    prompts = probe_prompts(tokenizer)
    assert_same_answers(run_answers(model, prompts), llama_cpp_answers(path, prompts))
    assert llama_cpp_chat_answers(path) == generate(model, tokenizer, list(PROBE_CHATS), max_new_tokens=GREEDY)


def test_embedding_and_head_trained_apart_export_untied(tied_split_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run, tokenizer = load_for_inference(str(tied_split_run))
    prompts = probe_prompts(tokenizer)
    expected = run_answers(run, prompts)

    path = export_gguf(tied_split_run, tmp_path / "gguf")
    assert "output.weight" in gguf_fields(path)[1]
    assert_same_answers(expected, llama_cpp_answers(path, prompts))

    out = tmp_path / "hf"
    assert main(["export", str(tied_split_run), "--format", "hf", "--output", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.config.tie_word_embeddings is False
    assert not torch.equal(exported.get_output_embeddings().weight, exported.get_input_embeddings().weight)
    got = run_answers(exported, prompts)
    assert largest_logit_gap(expected, got) <= LOGIT_TOLERANCE["merge"]
    assert [t for _, t in got] == [t for _, t in expected]


def test_verify_reports_llama_cpp_checks(lora_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(lora_run), "--format", "gguf", "--output", str(tmp_path / "g"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "ok   max |next-token logit diff| / max |logit|, llama.cpp f16 vs run" in printed
    assert "ok   llama.cpp greedy continuations that differ (3 prompts): 0" in printed
    assert "ok   llama.cpp tokenizer mismatches: 0" in printed


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
], ids=lambda rope: rope["rope_type"])
def test_scaled_rope_is_stored_as_llama_cpp_reads_it(rope: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finesmith.export.gguf import write_gguf
    from finesmith.export.verify import verify_gguf

    folder = make_llama(tmp_path / "model", rope_parameters=rope)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():  # larger weights, so a wrong rotation shows in the logits
        for param in model.parameters():
            if param.ndim == 2:
                param.mul_(10)
    path = write_gguf(model, tokenizer, tmp_path / "model.gguf")
    fields, tensors = gguf_fields(path)
    if rope["rope_type"] == "llama3":  # per-dimension divisors
        assert "rope_freqs.weight" in tensors
    else:  # one divisor for every dimension: the file's linear scaling factor
        assert "rope_freqs.weight" not in tensors and fields["llama.rope.scaling.factor"] == rope["factor"]
    prompts = probe_prompts(tokenizer)
    assert_same_answers(run_answers(model, prompts), llama_cpp_answers(path, prompts))
    # `--verify` passes too: transformers' GGUF loader is given the RoPE it does not read.
    failed = [check.line() for check in verify_gguf(model, tokenizer, path, "f16") if not check.ok]
    assert not failed


@pytest.mark.parametrize("family", ["chatml", "llama3", "mistral"])
def test_llama_cpp_tokenizes_like_the_run(family: str, tmp_path: Path) -> None:
    """The tiny byte-level BPE vocabularies, their special tokens and BOS rule survive in llama.cpp."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finesmith.export.gguf import write_gguf
    from finesmith.export.verify import PROBE_TEXTS

    folder = make_llama(tmp_path / "model", family=family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    path = write_gguf(AutoModelForCausalLM.from_pretrained(folder), tokenizer, tmp_path / "model.gguf")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        texts = list(PROBE_TEXTS) + [PLAIN_TEXT, "it's what you'll've  \n\n  got", "tabs\tand\r\nCRLF 🙂 中文"]
        texts += [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in PROBE_CHATS]
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tokenizer(text, add_special_tokens=False)["input_ids"], text
            # BOS exactly when the tokenizer adds it itself (llama3, mistral; not chatml)
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
        ids = tokenizer("ünïcödé ✓ line\nbreak", add_special_tokens=False)["input_ids"]
        assert llm.detokenize(ids).decode() == tokenizer.decode(ids)
        assert (llm.token_bos(), llm.token_eos()) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
        # llama.cpp's chat path renders the file's template and tokenizes it as finesmith does
        template = llm.metadata["tokenizer.chat_template"]
        assert template == tokenizer.chat_template
        formatter = Jinja2ChatFormatter(template, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token)
        for conversation in PROBE_CHATS:
            rendered = formatter(messages=list(conversation))
            ids = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
            assert ids == prompt_ids(tokenizer, conversation)
    finally:
        llm.close()


def test_llama_cpp_needs_the_head_size_and_verify_says_so(tmp_path: Path, monkeypatch) -> None:
    """Without `key_length` llama.cpp assumes hidden / heads and refuses the file; `--verify` reports it."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finesmith.export.gguf import write_gguf
    from finesmith.export.verify import verify_gguf_in_llama_cpp

    folder = make_llama(tmp_path / "model", head_dim=32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    good = write_gguf(model, tokenizer, tmp_path / "good.gguf")
    assert all(check.ok for check in verify_gguf_in_llama_cpp(model, tokenizer, good, "f16"))

    monkeypatch.setattr(gguf.GGUFWriter, "add_key_length", lambda self, length: None)
    monkeypatch.setattr(gguf.GGUFWriter, "add_value_length", lambda self, length: None)
    bad = write_gguf(model, tokenizer, tmp_path / "bad.gguf")
    (check,) = verify_gguf_in_llama_cpp(model, tokenizer, bad, "f16")
    assert not check.ok and check.line().startswith("FAIL llama.cpp load failures")
