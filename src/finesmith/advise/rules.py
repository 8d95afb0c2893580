"""The decision rules: which approach fits the resources, the data, the task and the goal.

Rules are tried in order; the first that applies decides (README: "How the advisor decides").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from finesmith.advise.datastats import DataStats
from finesmith.advise.hardware import GIB, Hardware
from finesmith.advise.memory import MemoryEstimate, RunShape, estimate_memory
from finesmith.advise.model_shape import ModelShape
from finesmith.advise.timing import TimeEstimate, estimate_time, scale_calibration

APPROACHES = ("few_shot", "prompt_tuning", "lora", "qlora", "full", "cpt_sft")
LABELS = {"few_shot": "few-shot prompting", "prompt_tuning": "prompt tuning", "lora": "LoRA", "qlora": "QLoRA",
          "full": "full fine-tuning", "cpt_sft": "continued pre-training + SFT"}
TASKS = ("classification", "generation", "domain")
GOALS = ("max-quality", "balanced", "min-cost")
FEW_EXAMPLES = 100  # below this, a trained model mostly memorises; prompting is the honest baseline
FEW_EXAMPLES_MIN_COST = 300
MANY_EXAMPLES = 10_000  # enough signal for all weights to move usefully
DOMAIN_CORPUS_TOKENS = 1_000_000  # raw text worth a pre-training pass
FEW_SHOT_EXAMPLES = 4  # shots placed in the prompt
CHECKPOINTING_SLOWDOWN = 1.33  # one extra forward pass per step
# Share of linear speed-up over N GPUs of one machine (gradient all-reduce / FSDP gathers not
# fully hidden behind compute): an assumption, not a measurement; stated in the report.
SCALING_EFFICIENCY = 0.9
SCALE_OUT_GPUS = (2, 4, 8)  # GPU counts tried when saying "more GPUs rather than 4-bit"
HEADROOM = 0.9  # plan to use at most 90% of the memory: fragmentation, other processes


@dataclass(frozen=True)
class Plan:
    """Everything the rules look at.

    Attributes:
        hardware: the machine (or the one being planned for).
        shape: the model's dimensions.
        data: the dataset's token statistics.
        task: classification | generation | domain.
        goal: max-quality | balanced | min-cost.
        time_budget_hours: longest acceptable training time, or None.
        batch_size: examples per micro-batch.
        checkpointing: plan with activation checkpointing.
        calibrated_lora_tokens_per_second: measured LoRA throughput on this machine, if any.
    """

    hardware: Hardware
    shape: ModelShape
    data: DataStats
    task: str = "generation"
    goal: str = "balanced"
    time_budget_hours: float | None = None
    batch_size: int = 8
    checkpointing: bool = False
    calibrated_lora_tokens_per_second: float | None = None

    @property
    def epochs(self) -> float:
        """Passes over the data: more for small sets, one for large ones."""
        if self.data.examples < 1_000:
            return 3.0
        return 2.0 if self.data.examples < MANY_EXAMPLES else 1.0


@dataclass(frozen=True)
class ApproachEstimate:
    """One approach sized for this plan."""

    approach: str
    method: str  # the training method it uses (few_shot trains nothing)
    memory: MemoryEstimate
    time: TimeEstimate | None  # None when nothing is trained
    fits: bool
    why_not: str = ""
    checkpointing: bool = False  # sized with activation checkpointing
    parallelism: str = ""  # over several GPUs: ddp | fsdp

    def training_hours(self, epochs: float) -> float:
        return 0.0 if self.time is None else self.time.seconds_per_epoch * epochs / 3600


@dataclass
class Recommendation:
    approach: str
    method: str
    rule: str
    reasons: list[str] = field(default_factory=list)
    estimates: dict[str, ApproachEstimate] = field(default_factory=dict)
    scale_out: str = ""  # when more GPUs of this kind would avoid 4-bit quantisation or allow full weights


def run_shape(plan: Plan, method: str) -> RunShape:
    """The micro-batch the memory peak happens on, for `method`."""
    if method == "few_shot":
        longest = plan.data.lengths[-1] if plan.data.lengths else 0
        return RunShape("few_shot", tokens=(FEW_SHOT_EXAMPLES + 1) * longest, supervised=0, device=plan.hardware.device,
                        shared=FEW_SHOT_EXAMPLES * longest)  # fixed shots: one prefix for every prompt
    # the global micro-batch is split over the GPUs; each holds its share's activations
    gpus = plan.hardware.gpus if plan.hardware.device == "cuda" else 1
    tokens, supervised = plan.data.largest_batch(max(1, plan.batch_size // gpus))
    return RunShape(method, tokens, supervised, plan.hardware.device, plan.checkpointing, gpus=gpus,
                    sharded=method == "full" and gpus > 1)


def size_approach(plan: Plan, approach: str, method: str) -> ApproachEstimate:
    """Memory and time of one approach, and whether it fits the machine and the time budget.

    An approach that does not fit in memory is sized again with activation checkpointing,
    which trades ~30% more compute for keeping only each block's input. Over several GPUs,
    full fine-tuning is sharded (FSDP2) and adapters replicated (DDP); LoRA that does not fit
    replicated is sized sharded too.
    """
    run = run_shape(plan, method)
    memory = estimate_memory(plan.shape, run)
    available = plan.hardware.training_memory * HEADROOM
    if memory.peak > available and method == "lora" and run.gpus > 1:
        run = dataclasses.replace(run, sharded=True)
        memory = estimate_memory(plan.shape, run)
    checkpointing = run.checkpointing
    if memory.peak > available and not checkpointing and method != "few_shot":
        recomputed = estimate_memory(plan.shape, dataclasses.replace(run, checkpointing=True))
        if recomputed.peak <= available:
            memory, checkpointing = recomputed, True
    time = None
    if method != "few_shot":
        rate = plan.calibrated_lora_tokens_per_second
        if rate:
            rate = scale_calibration(rate, "lora", method, plan.shape, int(plan.data.mean_length))
        time = estimate_time(plan.shape, method, plan.data.tokens, int(plan.data.mean_length), plan.hardware, rate)
        if run.gpus > 1:
            time = dataclasses.replace(time, seconds_per_epoch=time.seconds_per_epoch / (run.gpus * SCALING_EFFICIENCY),
                                       tokens_per_second=time.tokens_per_second * run.gpus * SCALING_EFFICIENCY,
                                       source=f"{time.source}, over {run.gpus} GPUs at an assumed "
                                              f"{SCALING_EFFICIENCY:.0%} scaling efficiency")
        if checkpointing and not run.checkpointing:
            time = dataclasses.replace(time, seconds_per_epoch=time.seconds_per_epoch * CHECKPOINTING_SLOWDOWN)
    why_not = ""
    if method == "qlora" and plan.hardware.device != "cuda":
        why_not = "needs a CUDA GPU (bitsandbytes 4-bit kernels)"
    elif memory.peak > available:
        why_not = f"needs {memory.peak / GIB:.1f} GiB, {available / GIB:.1f} GiB usable"
    elif time is not None and plan.time_budget_hours is not None:
        hours = time.seconds_per_epoch * plan.epochs / 3600
        if hours > plan.time_budget_hours:
            why_not = f"~{hours:.1f} h for {plan.epochs:g} epochs, over the {plan.time_budget_hours:g} h budget"
    parallelism = ("fsdp" if run.sharded else "ddp") if run.gpus > 1 else ""
    return ApproachEstimate(approach, method, memory, time, not why_not, why_not, checkpointing, parallelism)


def size_all(plan: Plan) -> dict[str, ApproachEstimate]:
    """Every approach sized; continued pre-training uses full weights when they fit, else LoRA."""
    sized = {a: size_approach(plan, a, a) for a in APPROACHES if a != "cpt_sft"}
    cpt_method = "full" if sized["full"].fits else "lora"
    sized["cpt_sft"] = size_approach(plan, "cpt_sft", cpt_method)
    return sized


def recommend(plan: Plan) -> Recommendation:
    """Apply the rules in order and explain the choice by the four criteria.

    Args:
        plan: hardware, model shape, data statistics, task, goal and options.
    Returns:
        The Recommendation with every approach's estimate.
    """
    sized = size_all(plan)
    approach, rule = choose(plan, sized)
    return Recommendation(approach, sized[approach].method, rule, reasons(plan, sized, approach), sized,
                          scale_out(plan, sized, approach))


def scale_out(plan: Plan, sized: dict[str, ApproachEstimate], approach: str) -> str:
    """When 4-bit QLoRA is the choice, or full fine-tuning is wanted and does not fit: the
    fewest GPUs of this kind on which LoRA (bf16 weights) or full fine-tuning would fit."""
    wanted = []
    if approach == "qlora":
        wanted.append("lora")
    if plan.goal == "max-quality" and not sized["full"].fits and plan.data.examples >= MANY_EXAMPLES:
        wanted.append("full")
    if plan.hardware.device != "cuda" or not wanted:
        return ""
    found = []
    for method in wanted:
        for gpus in (n for n in SCALE_OUT_GPUS if n > plan.hardware.gpus):
            more = dataclasses.replace(plan, hardware=dataclasses.replace(plan.hardware, gpus=gpus))
            estimate = size_approach(more, method, method)
            if estimate.memory.fits(int(more.hardware.training_memory * HEADROOM)):
                found.append(f"{LABELS[method]} fits on {gpus} of these GPUs with {estimate.parallelism.upper()} "
                             f"(~{estimate.memory.peak / GIB:.1f} GiB each"
                             + (", with checkpointing" if estimate.checkpointing else "") + ")")
                break
    if not found:
        return ""
    reason = "instead of 4-bit weights" if approach == "qlora" else "for full fine-tuning"
    return (f"more GPUs {reason}: " + "; ".join(found) +
            f" — plan it with `finesmith advise ... --gpus N`, train with `finesmith train ... --nproc-per-node N`")


def choose(plan: Plan, sized: dict[str, ApproachEstimate]) -> tuple[str, str]:
    """(approach, rule text): the first rule whose condition holds."""
    data, fits = plan.data, {a: e.fits for a, e in sized.items()}
    if plan.task == "domain" and data.raw_text_tokens >= DOMAIN_CORPUS_TOKENS and fits["cpt_sft"]:
        return "cpt_sft", f"R1: domain task with ≥ {DOMAIN_CORPUS_TOKENS:,} tokens of raw text"
    few = FEW_EXAMPLES_MIN_COST if plan.goal == "min-cost" else FEW_EXAMPLES
    if data.examples < few:
        if plan.goal == "max-quality" and fits["prompt_tuning"]:
            return "prompt_tuning", f"R2: under {few} examples, max-quality"
        if fits["few_shot"]:
            return "few_shot", f"R2: under {few} examples"
    if data.examples >= MANY_EXAMPLES and plan.goal == "max-quality" and fits["full"]:
        return "full", f"R3: ≥ {MANY_EXAMPLES:,} examples, max-quality, full fine-tuning fits"
    for approach, rule in (("lora", "R4: LoRA fits"), ("qlora", "R5: only 4-bit QLoRA fits"),
                           ("prompt_tuning", "R6: only prompt tuning fits")):
        if fits[approach]:
            return approach, rule
    return "few_shot", "R7: no training approach fits"


def reasons(plan: Plan, sized: dict[str, ApproachEstimate], approach: str) -> list[str]:
    """One sentence per criterion: resources, dataset size, task specificity, performance goal."""
    chosen, data = sized[approach], plan.data
    usable = plan.hardware.training_memory * HEADROOM
    blocked = [f"{LABELS[a]} ({e.why_not})" for a, e in sized.items() if not e.fits]
    resources = (f"available resources: {plan.hardware.describe()}; {LABELS[approach]} needs about "
                 f"{chosen.memory.peak / GIB:.1f} GiB of {usable / GIB:.1f} GiB usable"
                 + (f"; ruled out: {', '.join(blocked)}" if blocked else ""))
    if data.examples < FEW_EXAMPLES:
        size = f"{data.examples} examples is too few to train many weights without memorising them"
    elif data.examples < MANY_EXAMPLES:
        size = f"{data.examples:,} examples ({data.tokens:,} tokens) suit a small number of trained parameters"
    else:
        size = f"{data.examples:,} examples ({data.tokens:,} tokens) carry enough signal to move all weights"
    task = {
        "classification": "a narrow task with short, fixed answers: a low-rank update captures it, and prompting alone rarely follows the label format",
        "generation": "open-ended generation: style and format transfer well through adapters; knowledge needs more data or weights",
        "domain": (f"domain adaptation: {data.raw_text_tokens:,} tokens of raw text"
                   + (" teach the vocabulary first (continued pre-training), then instructions (SFT)"
                      if data.raw_text_tokens >= DOMAIN_CORPUS_TOKENS else
                      f" is under {DOMAIN_CORPUS_TOKENS:,}, too little for a pre-training pass")),
    }[plan.task]
    goal = {
        "max-quality": "max-quality: the most capable approach that fits is preferred",
        "balanced": "balanced: the best quality per unit of compute is preferred",
        "min-cost": "min-cost: the cheapest approach that can do the task is preferred",
    }[plan.goal]
    if chosen.time is not None:
        goal += f"; about {chosen.training_hours(plan.epochs):.2f} h for {plan.epochs:g} epochs ({chosen.time.source})"
    return [resources, f"dataset size: {size}", f"task specificity: {task}", f"performance requirement: {goal}"]
