"""Staged domain training: continued pre-training on a corpus, then instruction tuning.

A config with a `stages:` list runs each stage as an ordinary training run whose base model
is the previous stage's result (a LoRA stage is merged into the weights first, a full stage
is used as is). Top-level keys are shared by every stage; a stage overrides any of them and
adds the stage-only keys below. Measurements go to `OUTPUT/stages.json`:

- before and after every `cpt` stage: perplexity on the held-out corpus documents and on the
  shipped general-English sample (forgetting), per token and per word (per-word numbers stay
  comparable when `add_tokens` changes the tokenizer);
- after every `sft` stage with `eval_data`: task accuracy on it (preference stages log their
  held-out preference accuracy in their `metrics.jsonl`).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finesmith.config import OBJECTIVES as TRAIN_OBJECTIVES
from finesmith.config import TrainConfig, from_dict, parse_override, read_yaml, set_dotted
from finesmith.data.tokenize import TokenizedExample, lm_windows
from finesmith.domain.ingest import Corpus, Document, ingest_corpus
from finesmith.domain.vocab import add_domain_tokens, candidate_terms, general_english_text
from finesmith.errors import FinesmithError
from finesmith.export.merge import save_merged
from finesmith.folders import fresh_folder
from finesmith.run import (RunRecord, has_record, load_run, versions, write_export_record, write_json_atomic,
                           write_record)
from finesmith.train.loop import Preempted

OBJECTIVES = ("cpt",) + TRAIN_OBJECTIVES  # cpt here; the rest are the training objectives
STAGE_ONLY_KEYS = ("name", "objective", "corpus", "replay_ratio", "add_tokens")


@dataclass
class CorpusSettings:
    """How a `cpt` stage cleans and splits its corpus folder."""

    min_words: int = 20  # documents with fewer words are dropped
    near_duplicate_threshold: float = 0.8  # MinHash Jaccard estimate that marks a near duplicate
    eval_fraction: float = 0.1  # share of documents held out for perplexity


@dataclass
class StageSettings:
    """The stage-only keys; everything else in a stage is a TrainConfig key."""

    name: str
    objective: str = "sft"  # cpt: language modelling on a corpus; sft: instruction tuning; dpo, orpo, ...: preferences
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    replay_ratio: float = 0.0  # cpt: share of training words drawn from general English
    add_tokens: list[str] | int | None = None  # cpt: terms to add as tokens, or N to pick the top N


@dataclass
class Stage:
    settings: StageSettings
    raw: dict[str, Any]  # TrainConfig keys for this stage (shared keys merged with its own)


def parse_stages(raw: dict[str, Any], where: str) -> list[Stage]:
    """Split a staged config into per-stage settings and TrainConfig dicts.

    Raises:
        FinesmithError: `stages` is not a non-empty list of mappings, names repeat, or a key is unknown.
    """
    raw = copy.deepcopy(raw)
    items = raw.pop("stages", None)
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise FinesmithError(f"{where}: `stages` must be a list of mappings, e.g. [{{name: pretrain, objective: cpt, "
                             "data: corpus/}, {name: sft, data: qa.jsonl}]")
    stages = []
    for index, item in enumerate(items, start=1):
        own = {k: item[k] for k in STAGE_ONLY_KEYS if k in item}
        own.setdefault("name", f"stage{index}")
        add_tokens = own.pop("add_tokens", None)
        settings = from_dict(StageSettings, own, where=f"stages[{index}]")
        settings.add_tokens = _parse_add_tokens(add_tokens, index)
        if settings.objective not in OBJECTIVES:
            raise FinesmithError(f"config: `stages[{index}].objective` must be one of {', '.join(OBJECTIVES)}; "
                                 f"got '{settings.objective}'")
        if not 0 <= settings.replay_ratio < 1:
            raise FinesmithError(f"config: `stages[{index}].replay_ratio` must be in [0, 1), got {settings.replay_ratio}")
        if settings.objective != "cpt" and (settings.add_tokens or settings.replay_ratio):
            raise FinesmithError(f"config: `stages[{index}]`: add_tokens and replay_ratio apply to cpt stages only")
        merged = _merge(raw, {k: v for k, v in item.items() if k not in STAGE_ONLY_KEYS})
        stages.append(Stage(settings, merged))
    names = [s.settings.name for s in stages]
    if len(set(names)) != len(names):
        raise FinesmithError(f"config: stage names must differ (got {', '.join(names)}); give each a `name`")
    return stages


def _parse_add_tokens(value: Any, index: int) -> list[str] | int | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return [v.strip() for v in value]
    if isinstance(value, dict) and set(value) == {"auto"} and isinstance(value["auto"], int) and value["auto"] > 0:
        return value["auto"]
    raise FinesmithError(f"config: `stages[{index}].add_tokens` must be a list of terms or `{{auto: N}}` "
                         f"with N >= 1, got {value!r}")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """`key=value` for shared keys, `stages.NAME.key=value` for one stage (values parsed as YAML).

    The parsing and the dotted assignment are the config's own (`finesmith.config`); this
    adds only the lookup of the stage a `stages.NAME.` prefix names.
    """
    for item in overrides:
        key, value = parse_override(item, example="stages.sft.epochs=2")
        parts = key.split(".")
        node = raw
        if parts[0] == "stages" and len(parts) > 2:
            node = next((s for s in raw.get("stages") or [] if isinstance(s, dict) and s.get("name") == parts[1]), None)
            if node is None:
                raise FinesmithError(f"override '{item}': no stage named '{parts[1]}'")
            parts = parts[2:]
        _set(node, parts, value)


def _set(node: dict[str, Any], parts: list[str], value: Any) -> None:
    set_dotted(node, ".".join(parts), value)


def has_stages(path: str | None) -> bool:
    """True when `path` is a YAML config with a `stages:` key."""
    return bool(path) and Path(path).suffix.lower() in (".yaml", ".yml") and "stages" in read_yaml(path)


# --- data for cpt stages ----------------------------------------------------------------

def general_split() -> tuple[list[Document], list[Document]]:
    """The general-English sample as (held-out paragraphs for forgetting, paragraphs for replay).

    Alternate paragraphs go to each side, so both cover every topic of the sample and the
    forgetting measurement never sees text that replay trained on.
    """
    paragraphs = [p.strip() for p in general_english_text().split("\n\n") if len(p.split()) >= 20]
    docs = [Document(" ".join(p.split()), f"general_english.txt#{i}") for i, p in enumerate(paragraphs)]
    return docs[0::2], docs[1::2]


def replay_documents(domain_words: int, ratio: float, pool: list[Document], seed: int) -> list[Document]:
    """General paragraphs making up `ratio` of the mixed training words (cycled when the pool is short)."""
    if ratio <= 0:
        return []
    wanted = ratio / (1 - ratio) * domain_words
    rng, out, words = random.Random(seed), [], 0
    while words < wanted:
        for doc in rng.sample(pool, len(pool)):
            if words >= wanted:
                break
            out.append(doc)
            words += doc.words
    return out


def write_text_jsonl(path: Path, documents: list[Document]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in documents), encoding="utf-8")
    return str(path)


def lm_examples(tokenizer: Any, documents: list[Document], max_length: int) -> list[TokenizedExample]:
    """Documents as language-modelling windows, exactly as training sees them (`lm_windows`).

    Packing keeps documents apart with a block mask, so the loss of a packed batch is the
    sum of the per-document losses.
    """
    return lm_windows(tokenizer, ((doc.source, doc.text) for doc in documents), max_length)


# --- measurements ----------------------------------------------------------------------

def perplexity(model: Any, tokenizer: Any, documents: list[Document], max_length: int,
               batch_size: int = 8) -> dict[str, float]:
    """Perplexity per token and per word (whitespace words) of whole documents."""
    from finesmith.train.loop import evaluate_loss

    examples = lm_examples(tokenizer, documents, max_length)
    tokens = sum(sum(e.supervised[1:]) for e in examples)
    nll = evaluate_loss(model, examples, batch_size) * tokens
    words = sum(d.words for d in documents)
    return {"token_perplexity": round(math.exp(nll / tokens), 4), "word_perplexity": round(math.exp(nll / words), 4),
            "tokens": tokens, "words": words}


def measure_forgetting(model_spec: str, domain_eval: list[Document], general_eval: list[Document],
                       max_length: int) -> dict[str, Any]:
    """Held-out domain and general-English perplexity of a model or run folder."""
    from finesmith.core.device import pick_device
    from finesmith.model.methods import load_for_inference

    model, tokenizer = load_for_inference(model_spec, device=str(pick_device()))
    return {"domain": perplexity(model, tokenizer, domain_eval, max_length),
            "general": perplexity(model, tokenizer, general_eval, max_length)}


# --- the runner ---------------------------------------------------------------------------

def run_stages(path: str, overrides: list[str] | None = None, overwrite: bool = False,
               flags: dict[str, Any] | None = None, resume: bool = False, dry_run: bool = False,
               extend: bool = False) -> dict[str, Any]:
    """Run every stage of a staged config and write `OUTPUT/stages.json`.

    Args:
        path: YAML file with shared keys and a `stages:` list.
        overrides: `key=value` (shared) or `stages.NAME.key=value` (one stage).
        overwrite: replace an existing OUTPUT folder (one finesmith wrote).
        flags: typed top-level values from CLI flags (None values are ignored), applied last.
        resume: continue an interrupted staged run: finished stages are skipped, the
            interrupted one resumes from its checkpoint.
        dry_run: check every stage and print its predicted memory and time; train nothing.
        extend: with `resume`, the interrupted stage may continue to another horizon (`--extend`).
    Returns:
        The stages.json content.
    """
    from finesmith.core.console import console

    raw = read_yaml(path)
    apply_overrides(raw, overrides or [])
    for key, value in (flags or {}).items():
        if value is not None:
            _set(raw, key.split("."), value)
    stages = parse_stages(raw, path)
    output = Path(raw.get("output") or "")
    if not raw.get("output") or not raw.get("model"):
        raise FinesmithError(f"{path}: a staged config needs top-level `model` and `output`")
    if dry_run:
        return dry_run_stages(stages, str(raw["model"]))
    previous = _resume_report(output) if resume else None
    if previous is None:
        fresh_folder(output, overwrite, option="output")
    report: dict[str, Any] = {"config": str(path), "base_model": raw["model"], "stages": []}
    record = RunRecord(kind="stages", config={"config": str(path), "stages": [s.settings.name for s in stages]},
                       base_model={"spec": str(raw["model"])}, versions=versions())
    if previous is not None:
        record.created = load_run(output).record.created
    write_record(output, record)
    done = {entry["name"]: entry for entry in (previous or {}).get("stages", []) if entry.get("done")}
    model_spec, started = str(raw["model"]), time.perf_counter()
    try:
        for index, stage in enumerate(stages):
            name = stage.settings.name
            if name in done:
                entry = done[name]
                console.print(f"[bold]stage {index + 1}/{len(stages)}: {name} already finished; skipped")
            else:
                console.print(f"[bold]stage {index + 1}/{len(stages)}: {name} ({stage.settings.objective})")
                entry = run_stage(stage, model_spec, output, is_last=index == len(stages) - 1, extend=extend)
            model_spec = entry["next_model"]
            report["stages"].append(entry)
            report["seconds"] = round(time.perf_counter() - started, 1)
            write_json_atomic(output / "stages.json", report)
    except Preempted:
        record.state = "preempted"
        write_record(output, record)
        raise
    except BaseException as exc:
        record.state, record.error = "failed", (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        write_record(output, record)
        raise
    record.state, record.result = "finished", {"final_model": model_spec}
    write_record(output, record)
    console.print(f"stages done in {report['seconds']:.0f}s · results in {output / 'stages.json'}")
    return report


def _resume_report(output: Path) -> dict[str, Any]:
    """The stages.json of the staged run to continue (refused when there is none to continue)."""
    run = load_run(output)
    if run.record.kind != "stages":
        raise FinesmithError(f"--resume: {output} holds a single run, not a staged run; resume it without the "
                             "staged config")
    if run.record.state == "finished":
        raise FinesmithError(f"--resume: the staged run in {output} already finished; start a new one "
                             "with another output or --overwrite")
    report = output / "stages.json"
    return json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {"stages": []}


def dry_run_stages(stages: list[Stage], model_spec: str) -> dict[str, Any]:
    """Check each stage's config and data and print its predicted memory and time; train nothing.

    Later stages start from earlier stages' results, which a dry run does not produce; they
    are sized on the base model (same shape; tokens a cpt stage would add are not counted).
    Corpus files of cpt stages are prepared in a temporary folder that is removed afterwards.
    """
    import tempfile

    from finesmith.core.console import console
    from finesmith.pipeline import dry_run

    with tempfile.TemporaryDirectory(prefix="finesmith-dry-run-") as tmp:
        for index, stage in enumerate(stages):
            raw = copy.deepcopy(stage.raw)
            raw.update(model=model_spec, output=str(Path(tmp) / stage.settings.name))
            console.print(f"[bold]stage {index + 1}/{len(stages)}: {stage.settings.name} ({stage.settings.objective}) "
                          "· dry run")
            if stage.settings.objective == "cpt":
                probe = from_dict(TrainConfig, raw, where="config")
                prepare_cpt(stage, raw, Path(tmp) / "prepared" / stage.settings.name, {}, probe.seed)
            dry_run(from_dict(TrainConfig, raw, where="config").validate())
    return {"dry_run": True, "stages": [s.settings.name for s in stages]}


def run_stage(stage: Stage, model_spec: str, output: Path, is_last: bool, extend: bool = False) -> dict[str, Any]:
    """Train one stage from `model_spec` (resuming it when it was interrupted); return its stages.json entry.

    The entry's `next_model` is what the next stage starts from: the merged weights of an
    adapter stage, the run folder of a full stage.
    """
    from finesmith.core.console import console
    from finesmith.pipeline import evaluate, train

    settings, raw = stage.settings, copy.deepcopy(stage.raw)
    folder = output / settings.name
    prepared = output / "prepared" / settings.name
    raw.update(model=model_spec, output=str(folder))
    if settings.objective != "cpt":
        raw["objective"] = settings.objective
    entry: dict[str, Any] = {"name": settings.name, "objective": settings.objective, "base_model": model_spec,
                             "output": str(folder)}
    probe = from_dict(TrainConfig, raw, where="config")  # unknown keys fail before any work
    if settings.objective == "cpt":
        corpus, domain_eval, general_eval = prepare_cpt(stage, raw, prepared, entry, probe.seed)
        if settings.add_tokens:
            raw["model"] = extend_vocabulary(settings, corpus, model_spec, prepared / "base_with_tokens", raw, entry)
        entry["before"] = measure_forgetting(model_spec, domain_eval, general_eval, probe.max_length)
        console.print(_ppl_line("before", entry["before"]))
    config = from_dict(TrainConfig, raw, where="config").validate()
    state = load_run(folder).record.state if has_record(folder) else None
    if state == "finished":
        console.print(f"stage {settings.name}: training already finished in {folder}")
        outcome_record = load_run(folder).record
        entry.update(method=config.method, steps=outcome_record.result.get("steps"),
                     final_loss=outcome_record.result.get("final_loss"), eval_loss=outcome_record.result.get("eval_loss"))
    else:
        can_resume = state in ("preempted", "running") and _has_resumable_checkpoint(folder)
        if can_resume:
            console.print(f"stage {settings.name}: resuming the interrupted training in {folder}")
        outcome = train(config, resume=can_resume, overwrite=state is not None and not can_resume,
                        extend=extend and can_resume)
        entry.update(method=config.method, steps=outcome.result.steps, train_seconds=round(outcome.result.seconds, 1),
                     final_loss=outcome.result.final_loss, eval_loss=outcome.result.eval_loss,
                     trainable_parameters=outcome.trainable)
    if settings.objective == "cpt":
        entry["after"] = measure_forgetting(str(folder), domain_eval, general_eval, config.max_length)
        console.print(_ppl_line("after", entry["after"]))
    elif config.eval_data and config.objective in ("sft",):
        result = evaluate(str(folder), config.eval_data)
        entry["task"] = {"accuracy": result.accuracy, "n": result.n, "task": result.task, "metrics": result.metrics}
        console.print(f"task accuracy {result.accuracy:.3f} on {result.n} held-out examples")
    entry["next_model"] = str(folder)
    if not is_last and config.method != "full":
        entry["merged"] = entry["next_model"] = save_merged(folder, output / "merged" / settings.name)
        write_export_record(Path(entry["merged"]), {"run": str(folder.resolve()), "format": "hf",
                                                     "method": config.method})
    entry["done"] = True
    return entry


def _has_resumable_checkpoint(folder: Path) -> bool:
    from finesmith.train.checkpoint import latest_checkpoint, resumable

    found = latest_checkpoint(folder)
    return found is not None and resumable(found)


def prepare_cpt(stage: Stage, raw: dict[str, Any], folder: Path, entry: dict[str, Any],
                seed: int) -> tuple[Corpus, list[Document], list[Document]]:
    """Ingest the stage's corpus, write the training/eval text files into `folder`, point `raw` at them."""
    from finesmith.core.console import console

    settings = stage.settings
    source = raw.get("data")
    source = source.get("path") if isinstance(source, dict) else source
    if not source:
        raise FinesmithError(f"config: stage '{settings.name}' needs `data:` (a corpus folder or file)")
    corpus = ingest_corpus(source, settings.corpus.min_words, settings.corpus.near_duplicate_threshold,
                           settings.corpus.eval_fraction, seed)
    general_eval, replay_pool = general_split()
    replay = replay_documents(sum(d.words for d in corpus.train), settings.replay_ratio, replay_pool, seed)
    raw["data"] = write_text_jsonl(folder / "data" / "train.jsonl", corpus.train + replay)
    if corpus.eval:
        raw["eval_data"] = write_text_jsonl(folder / "data" / "eval.jsonl", corpus.eval)
    entry["corpus"] = {**corpus.stats.to_dict(), "replay_documents": len(replay),
                       "replay_words": sum(d.words for d in replay)}
    stats = corpus.stats
    console.print(f"corpus {source}: {stats.documents} documents read, {stats.too_short} near-empty, "
                  f"{stats.exact_duplicates} exact and {stats.near_duplicates} near duplicates removed; "
                  f"{stats.train_documents} train / {stats.eval_documents} eval documents"
                  + (f"; {len(replay)} general paragraphs replayed" if replay else ""))
    if not corpus.eval:
        raise FinesmithError(f"config: stage '{settings.name}' holds out no documents (corpus.eval_fraction is 0); "
                             "perplexity needs held-out documents, set it above 0")
    return corpus, corpus.eval, general_eval


def extend_vocabulary(settings: StageSettings, corpus: Corpus, model_spec: str, target: Path,
                      raw: dict[str, Any], entry: dict[str, Any]) -> str:
    """Save the base model with the stage's new tokens added (mean-initialised) and return its folder.

    For LoRA the embedding matrices must train too, so they are added to
    `lora.modules_to_save` unless the config already lists modules there. A folder left by an
    interrupted run is reused (the tokens and their initialisation are deterministic).
    """
    from finesmith.core.console import console
    from finesmith.model.load import embedding_module_names, load_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_spec), load_model(model_spec, "cpu")
    terms = settings.add_tokens
    if isinstance(terms, int):
        terms = [t.term for t in candidate_terms(tokenizer, [d.text for d in corpus.train],
                                                 general_english_text())[:terms]]
    added = add_domain_tokens(model, tokenizer, terms)
    if not (target / "config.json").is_file():
        tmp = target.with_name(f".{target.name}-partial")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.replace(target)
    entry["added_tokens"] = sorted(t.strip() for t in added)
    console.print(f"added {len(added)} tokens: {', '.join(entry['added_tokens'])}")
    if raw.get("method", "lora") != "full":
        lora = raw.setdefault("lora", {})
        if not lora.get("modules_to_save"):
            lora["modules_to_save"] = embedding_module_names(model)
    return str(target)


def _ppl_line(when: str, measured: dict[str, Any]) -> str:
    d, g = measured["domain"], measured["general"]
    return (f"{when}: domain perplexity {d['token_perplexity']:.2f}/token ({d['word_perplexity']:.2f}/word) · "
            f"general English {g['token_perplexity']:.2f}/token ({g['word_perplexity']:.2f}/word)")


__all__ = ["CorpusSettings", "StageSettings", "apply_overrides", "has_stages", "lm_examples",
           "parse_stages", "perplexity", "run_stages"]
