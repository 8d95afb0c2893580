"""Domain adaptation: corpus ingestion, dedup, document split, packed CPT loss, new tokens, stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finesmith.domain.ingest import Document, deduplicate, ingest_corpus, read_documents, split_documents
from finesmith.domain.stages import general_split, lm_examples, parse_stages, replay_documents
from finesmith.domain.vocab import add_domain_tokens, candidate_terms, vocab_report
from finesmith.errors import FinesmithError

WORDS = ("valve pump sensor loop glycol plate flow gate drift seal bus relief trap core cable port "
         "journal reset code fault alarm display firmware update stage").split()


def prose(seed: int, n: int = 60) -> str:
    """Distinct pseudo-text: different seeds share few 5-word shingles."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer is `text` (built by hand, with a correct xref table)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_every_file_type_is_read_with_whitespace_normalised(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("plain   text\t here\n\n\n\nnext", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# Title\n\nmarkdown body", encoding="utf-8")
    (tmp_path / "c.html").write_text("<html><head><title>t</title><style>p{}</style></head><body><p>html "
                                     "&amp; text</p><script>var x = 1;</script><p>second</p></body></html>")
    (tmp_path / "d.pdf").write_bytes(minimal_pdf("pdf text layer"))
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "first row"}) + "\n\n" + json.dumps({"text": "second row"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    documents, files = read_documents(tmp_path)
    texts = {Path(d.source.split(":")[0]).name: d.text for d in documents}
    assert texts["a.txt"] == "plain text here\n\nnext"
    assert texts["b.md"] == "# Title\n\nmarkdown body"
    assert texts["c.html"] == "html & text\n\nsecond"
    assert "pdf text layer" in texts["d.pdf"]
    assert [d.text for d in documents if d.source.startswith(str(tmp_path / "e.jsonl"))] == ["first row", "second row"]
    assert dict(files) == {".txt": 1, ".md": 1, ".html": 1, ".pdf": 1, ".jsonl": 1}


def test_bad_inputs_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(FinesmithError, match="corpus not found"):
        read_documents(tmp_path / "missing")
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(FinesmithError, match=r"x.jsonl:1: .*`text`"):
        read_documents(tmp_path)
    (tmp_path / "x.jsonl").unlink()
    (tmp_path / "bad.pdf").write_bytes(b"not a pdf at all")
    with pytest.raises(FinesmithError, match="not a readable PDF"):
        read_documents(tmp_path)


def test_dedup_counts_exact_and_near_duplicates(tmp_path: Path) -> None:
    base = [prose(seed, 80) for seed in range(6)]
    near = base[1].split()
    near[40] = "zebra"  # one word changed: a near duplicate
    for i, text in enumerate(base + [base[0], base[0].upper(), " ".join(near), "too short"]):
        (tmp_path / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    corpus = ingest_corpus(tmp_path, min_words=5, eval_fraction=0.2, seed=3)
    stats = corpus.stats
    assert (stats.documents, stats.too_short, stats.exact_duplicates, stats.near_duplicates) == (10, 1, 2, 1)
    assert stats.kept == 6 and {d.text for d in corpus.train + corpus.eval} == set(base)


def test_distinct_documents_are_not_merged() -> None:
    docs = [Document(prose(seed, 80), str(seed)) for seed in range(20)]
    kept, exact, near = deduplicate(docs)
    assert (len(kept), exact, near) == (20, 0, 0)


def test_split_is_by_document_seeded_and_disjoint() -> None:
    docs = [Document(prose(seed), f"doc{seed}") for seed in range(30)]
    train, held = split_documents(docs, 0.2, seed=5)
    assert len(held) == 6 and len(train) == 24
    assert not {d.source for d in train} & {d.source for d in held}
    assert split_documents(docs, 0.2, seed=5) == (train, held)
    assert split_documents(docs, 0.2, seed=6)[1] != held
    with pytest.raises(FinesmithError, match="too few"):
        split_documents(docs[:1], 0.5, seed=0)


def test_packed_documents_do_not_attend_across_the_separator(tiny_model: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finesmith.data.pack import pack_batch
    from finesmith.train.objectives import sft_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    docs = [Document(prose(seed, 30 + 7 * seed), f"d{seed}") for seed in range(3)]
    examples = lm_examples(tokenizer, docs, max_length=512)
    assert all(e.input_ids[-1] == tokenizer.eos_token_id for e in examples)
    assert all(all(e.supervised[1:]) for e in examples)
    with torch.no_grad():
        packed, n_packed = sft_loss(model, pack_batch(examples))
        alone = [sft_loss(model, pack_batch([e])) for e in examples]
    assert int(n_packed) == sum(int(n) for _, n in alone) == sum(len(e) - 1 for e in examples)
    assert torch.allclose(packed, sum(loss for loss, _ in alone), rtol=1e-4)


def test_long_documents_are_windowed_with_every_token_trained(tiny_model: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = lm_examples(tokenizer, [Document(prose(1, 300), "long")], max_length=64)
    assert len(examples) > 1 and all(len(e) <= 64 for e in examples)
    assert examples[-1].input_ids[-1] == tokenizer.eos_token_id


def test_added_tokens_get_mean_initialised_embeddings(tiny_model: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 3)  # untied output layer
    old_in, old_out = model.get_input_embeddings().weight.detach().clone(), model.lm_head.weight.detach().clone()
    added = add_domain_tokens(model, tokenizer, ["thermoplate", "flowgate"])
    assert set(added) == {" thermoplate", " flowgate"}
    assert " thermoplate" in tokenizer.tokenize("the thermoplate leaks")
    for token, pieces in added.items():
        new_id = tokenizer.convert_tokens_to_ids(token)
        assert new_id >= old_in.shape[0] and len(pieces) > 1
        assert torch.allclose(model.get_input_embeddings().weight[new_id], old_in[pieces].mean(0))
        assert torch.allclose(model.lm_head.weight[new_id], old_out[pieces].mean(0))
    assert torch.equal(model.get_input_embeddings().weight[: old_in.shape[0]], old_in)


def test_vocab_report_measures_the_saving(tiny_model: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["The thermoplate feeds the flowgate. " * 5, "Check the thermoplate seal and the flowgate. " * 4]
    general = "The weather was mild and the market was busy with people buying bread and apples."
    assert {t.term for t in candidate_terms(tokenizer, texts, general)} >= {"thermoplate", "flowgate"}
    report = vocab_report(tokenizer, texts, top=5, general=general)
    assert report.domain_tokens_per_word > report.general_tokens_per_word
    assert report.fragmented[0].term in ("thermoplate", "flowgate")
    assert report.tokens_with_added < report.domain_tokens and 0 < report.saved_fraction < 1


def test_stage_config_parsing_and_errors() -> None:
    raw = {"model": "m", "output": "o", "method": "lora", "lr": 1e-4,
           "stages": [{"name": "pre", "objective": "cpt", "data": "c/", "add_tokens": {"auto": 5}, "epochs": 1},
                      {"name": "sft", "data": "qa.jsonl", "method": "full"}]}
    pre, sft = parse_stages(raw, "cfg.yaml")
    assert (pre.settings.add_tokens, pre.raw["epochs"], pre.raw["method"], pre.raw["lr"]) == (5, 1, "lora", 1e-4)
    assert "stages" not in pre.raw and "add_tokens" not in pre.raw and sft.raw["method"] == "full"
    bad = [{"stages": []}, {"stages": [{"objective": "ppo"}]}, {"stages": [{"name": "a"}, {"name": "a"}]},
           {"stages": [{"objective": "cpt", "add_tokens": {"top": 3}}]}, {"stages": [{"add_tokens": ["x"]}]}]
    for config in bad:
        with pytest.raises(FinesmithError):
            parse_stages(config, "cfg.yaml")


def test_general_sample_split_and_replay_share_nothing() -> None:
    held, pool = general_split()
    assert held and pool and not {d.text for d in held} & {d.text for d in pool}
    replay = replay_documents(1000, 0.2, pool, seed=1)
    assert 250 <= sum(d.words for d in replay) < 250 + max(d.words for d in pool)
    assert replay_documents(1000, 0.0, pool, seed=1) == []


def test_two_stage_run_writes_both_stages_and_stages_json(tiny_model: str, tmp_path: Path) -> None:
    import yaml

    from finesmith.cli import main
    from tests.conftest import QA, chat, write_jsonl

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in range(14):  # 10 train + 4 eval documents (training needs at least 10 examples)
        (corpus / f"{seed}.md").write_text("The thermoplate and flowgate. " + prose(seed, 40), encoding="utf-8")
    train = write_jsonl(tmp_path / "qa.jsonl", [chat(q, a) for q, a in QA])
    held = write_jsonl(tmp_path / "qa_eval.jsonl", [chat(q, a) for q, a in QA[:3]])
    config = {"model": tiny_model, "output": str(tmp_path / "run"), "method": "lora", "max_length": 64,
              "batch_size": 4, "log_every": 1, "lora": {"r": 4, "alpha": 8},
              "stages": [{"name": "pretrain", "objective": "cpt", "data": str(corpus), "max_steps": 2,
                          "corpus": {"eval_fraction": 0.25, "min_words": 10}, "replay_ratio": 0.2,
                          "add_tokens": ["thermoplate", "flowgate"]},
                         {"name": "sft", "data": train, "eval_data": held, "max_steps": 2, "method": "full",
                          "lr": 1e-4}]}
    path = tmp_path / "two_stage.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path), "stages.sft.seed=3"]) == 0
    report = json.loads((tmp_path / "run" / "stages.json").read_text())
    pre, sft = report["stages"]
    assert pre["corpus"]["train_documents"] == 10 and pre["corpus"]["eval_documents"] == 4
    assert pre["corpus"]["replay_documents"] > 0 and pre["added_tokens"] == ["flowgate", "thermoplate"]
    for when in ("before", "after"):
        for part in ("domain", "general"):
            assert pre[when][part]["word_perplexity"] > 1
    assert (tmp_path / "run" / "pretrain" / "adapter_model.safetensors").is_file()
    assert sft["base_model"] == pre["merged"] == str(tmp_path / "run" / "merged" / "pretrain")
    assert (tmp_path / "run" / "sft" / "model.safetensors").is_file()
    assert sft["task"]["n"] == 3 and 0 <= sft["task"]["accuracy"] <= 1
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "run" / "sft")) == len(
        AutoTokenizer.from_pretrained(tiny_model)) + 2
    assert main(["train", str(path)]) == 2  # an existing run is not overwritten silently
