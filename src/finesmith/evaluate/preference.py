"""Held-out preference pairs: does the model prefer the chosen answer?

For every pair the model's summed log-probabilities of the chosen and the rejected answer
(scored tokens as training scores them) give the headline `accuracy`: the share of pairs
whose chosen answer is the more probable, comparable between a base model and any
fine-tune. For an adapter run the base model is the same model with the adapter disabled,
so the implicit reward of preference tuning is reported too: `reward_accuracy`, the share
of pairs with `β·((pc - rc) - (pr - rr)) > 0`, and its mean margin.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from finesmith.data.formats import PreferenceExample
from finesmith.errors import FinesmithError
from finesmith.evaluate.stats import wilson_interval


def evaluate_preferences(model: Any, tokenizer: Any, examples: Sequence[Any], beta: float = 0.1,
                         max_length: int = 2048) -> Any:
    """An `EvalResult` of task `preference` with accuracy, margins and per-pair records."""
    from finesmith.data.pairs import pack_groups, tokenize_groups
    from finesmith.evaluate.tasks import EvalResult
    from finesmith.train.preference import reference_logps

    started = time.perf_counter()
    if not all(isinstance(ex, PreferenceExample) for ex in examples):
        raise FinesmithError("a preference evaluation needs every held-out row to be a pair (prompt, chosen, "
                             "rejected); evaluate the other rows separately")
    groups, _ = tokenize_groups(tokenizer, examples, max_length)
    collate = functools.partial(pack_groups, row_tokens=1024)
    policy = reference_logps(model, groups, collate, adapter=True)
    base = reference_logps(model, groups, collate) if hasattr(model, "disable_adapter") else None
    records, wins, reward_wins, margin, reward_margin = [], 0, 0, 0.0, 0.0
    for i, (group, (pc, pr)) in enumerate(zip(groups, policy)):
        record = {"source": group.source, "chosen_logp": round(pc, 4), "rejected_logp": round(pr, 4),
                  "correct": pc > pr}
        wins += pc > pr
        margin += pc - pr
        if base is not None:
            rc, rr = base[i]
            reward = beta * ((pc - rc) - (pr - rr))
            record["reward_margin"] = round(reward, 4)
            reward_wins += reward > 0
            reward_margin += reward
        records.append(record)
    n = len(groups)
    metrics: dict[str, Any] = {"preference": {"n": n, "accuracy": wins / n, "accuracy_ci": list(wilson_interval(wins, n)),
                                              "mean_logp_margin": margin / n,
                                              "chosen_logp": sum(p[0] for p in policy) / n,
                                              "rejected_logp": sum(p[1] for p in policy) / n}}
    if base is not None:
        metrics["preference"].update(reward_accuracy=reward_wins / n, mean_reward_margin=reward_margin / n, beta=beta)
    result = EvalResult("preference", n, 0, wins / n, metrics, [], records)
    result.seconds = time.perf_counter() - started
    return result
