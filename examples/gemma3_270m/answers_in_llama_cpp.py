"""Answer every held-out prompt with the exported GGUF in llama.cpp and compare with the run.

The prompts are the run's own (its tokenizer and chat template, as `finesmith eval` builds
them); llama.cpp decodes greedily until the file's end-of-generation tokens. Its answers are
scored against the references and compared, prompt by prompt, with the answers the run gave
in `finesmith compare` (`results/<run>.json`).

    python examples/gemma3_270m/answers_in_llama_cpp.py RUN FILE.gguf HELDOUT.jsonl COMPARE_RESULT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

MAX_NEW_TOKENS = 32


def main(run: str, gguf_path: str, heldout: str, run_result: str) -> dict:
    import llama_cpp

    from finesmith.data.tokenize import prompt_ids
    from finesmith.evaluate.metrics import normalise_answer
    from finesmith.model.load import load_chat_tokenizer

    tokenizer, _ = load_chat_tokenizer(run)
    rows = [json.loads(line) for line in Path(heldout).read_text(encoding="utf-8").splitlines() if line.strip()]
    theirs = [p["prediction"] for p in json.loads(Path(run_result).read_text(encoding="utf-8"))["predictions"]]
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=512, logits_all=False, verbose=False)
    started, answers = time.perf_counter(), []
    try:
        for row in rows:
            ids = prompt_ids(tokenizer, row["messages"][:-1])
            out = []
            for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
                if llm.token_eos() == token or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                    break
                out.append(int(token))
                if len(out) == MAX_NEW_TOKENS:
                    break
            answers.append(llm.detokenize(out).decode("utf-8", errors="replace").strip())
    finally:
        llm.close()
    references = [row["messages"][-1]["content"] for row in rows]
    right = sum(normalise_answer(a) == normalise_answer(r) for a, r in zip(answers, references))
    same = sum(a.strip() == b.strip() for a, b in zip(answers, theirs))
    summary = {"n": len(rows), "llama_cpp_exact_match": right / len(rows), "same_answer_as_run": same / len(rows),
               "same_answers": same, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:5])
