"""Preference objectives: DPO, IPO, ORPO, SimPO and KTO, as losses of the one training loop.

Each objective is a loss over a unit of packed groups (`finesmith.data.pairs.pack_groups`)
returning `(sum of per-group losses, groups)`: the loop divides once per optimizer step by
the number of pairs (or feedback examples) in the whole step, so gradient accumulation is
exact, as the token count makes it for SFT.

Notation for a pair: `pc`, `pr` are the policy's summed log-probabilities of the chosen
and rejected answers (answer tokens and the end-of-turn token, as SFT trains them), `nc`,
`nr` their token counts, `rc`, `rr` the reference's (the model before training: the base
with the adapter disabled, or the initial weights of a full fine-tune), `ac = pc / nc`,
`ar = pr / nr` the per-token averages, `σ` the logistic function.

| objective | loss per pair (or example) | reference |
|---|---|---|
| dpo | `-(1-ε)·log σ(z) - ε·log σ(-z)`, `z = β·((pc-rc) - (pr-rr))` (ε: label smoothing) | yes |
| ipo | `(h - 1/(2β))²`, `h = (pc-rc)/nc - (pr-rr)/nr` (length-averaged, as IPO's authors and TRL do) | yes |
| orpo | `-ac - λ·log σ(log odds(ac) - log odds(ar))`, `log odds(a) = a - log(1 - e^a)` | no |
| simpo | `-log σ(β_s·(ac - ar) - γ)` | no |
| kto | desirable: `w_d·(1 - σ(β·(p - r)))`; undesirable: `w_u·(1 - σ(-β·(p - r)))` | yes |

KTO's reference point (its KL estimate) is fixed at 0 here: an estimate from each
micro-batch would make the loss depend on how a step is split into micro-batches, and
exact accumulation is worth more than the estimate (the variant also used by TRL's
`apo_zero_unpaired`-style losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from finesmith.config import PreferenceSettings
from finesmith.errors import FinesmithError

NEEDS_REFERENCE = ("dpo", "ipo", "kto")
PAIRWISE = ("dpo", "ipo", "orpo", "simpo")


def sequence_logps(model: Any, unit: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[n_sequences]` summed log-probabilities of each sequence's scored tokens in one unit."""
    out = model(input_ids=unit["input_ids"], position_ids=unit["position_ids"],
                attention_mask=unit["attention_mask"], logits_to_keep=unit["keep"], use_cache=False)
    logits = out.logits[0].float()[unit["which"]]
    token_logps = -F.cross_entropy(logits, unit["target_ids"], reduction="none")
    totals = torch.zeros(len(unit["seq_tokens"]), device=token_logps.device, dtype=token_logps.dtype)
    return totals.index_add(0, unit["owner"], token_logps)


@dataclass(frozen=True)
class PreferenceObjective:
    """`objective(model, unit) -> (loss sum over groups, groups)` for one preference objective."""

    kind: str
    settings: PreferenceSettings

    @property
    def needs_reference(self) -> bool:
        return self.kind in NEEDS_REFERENCE

    def __call__(self, model: Any, unit: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        losses, _ = self.losses(sequence_logps(model, unit), unit)
        return losses.sum(), torch.tensor(len(losses), device=losses.device)

    def losses(self, logps: torch.Tensor, unit: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-group losses and the per-group quantities the metrics report."""
        s = self.settings
        counts = unit["seq_tokens"].to(logps.device).to(logps.dtype)
        reference = unit["reference"].to(logps.device).to(logps.dtype)
        if self.needs_reference and torch.isnan(reference).any():
            raise FinesmithError(f"objective {self.kind} needs reference log-probabilities; they were not computed")
        if self.kind == "kto":
            if (unit["desirable"] < 0).any():
                raise FinesmithError("objective kto trains on feedback rows (prompt, completion, label)")
            ratio = logps - reference
            desirable = unit["desirable"].to(logps.device).bool()
            value = torch.sigmoid(s.beta * ratio)
            losses = torch.where(desirable, s.desirable_weight * (1 - value), s.undesirable_weight * value)
            return losses, {"reward": s.beta * ratio, "desirable": desirable.to(logps.dtype)}
        if (unit["group_size"] != 2).any():
            raise FinesmithError(f"objective {self.kind} trains on preference pairs (prompt, chosen, rejected)")
        pc, pr = logps[0::2], logps[1::2]
        nc, nr = counts[0::2], counts[1::2]
        rc, rr = reference[0::2], reference[1::2]
        if self.kind == "dpo":
            chosen_reward, rejected_reward = s.beta * (pc - rc), s.beta * (pr - rr)
            z = chosen_reward - rejected_reward
            losses = -(1 - s.label_smoothing) * F.logsigmoid(z) - s.label_smoothing * F.logsigmoid(-z)
        elif self.kind == "ipo":
            chosen_reward, rejected_reward = (pc - rc) / nc, (pr - rr) / nr
            losses = (chosen_reward - rejected_reward - 1 / (2 * s.beta)) ** 2
        elif self.kind == "orpo":
            ac, ar = pc / nc, pr / nr
            log_odds = (ac - ar) - (_log1m_exp(ac) - _log1m_exp(ar))
            losses = -ac - s.orpo_lambda * F.logsigmoid(log_odds)
            chosen_reward, rejected_reward = s.orpo_lambda * ac, s.orpo_lambda * ar
        elif self.kind == "simpo":
            ac, ar = pc / nc, pr / nr
            chosen_reward, rejected_reward = s.simpo_beta * ac, s.simpo_beta * ar
            losses = -F.logsigmoid(chosen_reward - rejected_reward - s.gamma)
        else:
            raise FinesmithError(f"unknown preference objective '{self.kind}'")
        return losses, {"chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
                        "chosen_logp": pc, "rejected_logp": pr}

    @torch.no_grad()
    def measure(self, model: Any, units: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Eval metrics over units: loss per group, and for pairs preference accuracy (the
        implicit reward of the chosen answer above the rejected one), mean reward margin and
        mean chosen/rejected log-probabilities; for KTO the mean reward of each label."""
        sums: dict[str, float] = {}
        groups = 0
        for unit in units:
            losses, parts = self.losses(sequence_logps(model, unit), unit)
            groups += len(losses)
            add = {"loss": losses.sum()}
            if "chosen_reward" in parts:
                margin = parts["chosen_reward"] - parts["rejected_reward"]
                add.update(accuracy=(margin > 0).double().sum(), margin=margin.sum(),
                           chosen_logp=parts["chosen_logp"].sum(), rejected_logp=parts["rejected_logp"].sum())
            else:
                add.update(desirable=parts["desirable"].sum(),
                           desirable_reward=(parts["reward"] * parts["desirable"]).sum(),
                           undesirable_reward=(parts["reward"] * (1 - parts["desirable"])).sum())
            for key, value in add.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        if "desirable" in sums:
            n_good = sums.pop("desirable")
            sums["desirable_reward"] /= max(1.0, n_good)
            sums["undesirable_reward"] /= max(1.0, groups - n_good)
            return {"loss": sums["loss"] / max(1, groups), "desirable_reward": sums["desirable_reward"],
                    "undesirable_reward": sums["undesirable_reward"]}
        return {key: value / max(1, groups) for key, value in sums.items()}


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable near 0 (an average log-probability is never above 0)."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@torch.no_grad()
def reference_logps(model: Any, groups: Sequence[Any], collate: Any, batch_size: int = 8,
                    adapter: bool = False) -> list[tuple[float, ...]]:
    """Each group's reference log-probabilities, from `model` as it is before training.

    For an adapter the adapter is disabled (the base model's own outputs, with no second
    copy of the model in memory); a full fine-tune calls this before the first step, so the
    weights are the initial ones. `adapter=True` keeps the adapter on (the policy's own
    log-probabilities, for evaluation).
    """
    import contextlib

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    disable = (model.disable_adapter() if hasattr(model, "disable_adapter") and not adapter
               else contextlib.nullcontext())
    out: list[tuple[float, ...]] = [()] * len(groups)
    with disable:
        for start in range(0, len(groups), batch_size):
            chunk = groups[start:start + batch_size]
            for unit in collate(chunk)["units"]:
                unit = {k: v.to(device) for k, v in unit.items()}
                logps = sequence_logps(model, unit).double().cpu().tolist()
                k = 0
                for index, size in zip(unit["group_index"].tolist(), unit["group_size"].tolist()):
                    out[start + index] = tuple(logps[k:k + size])
                    k += size
    if was_training:
        model.train()
    return out
