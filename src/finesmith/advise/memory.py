"""Peak-memory estimate of a training run, component by component.

Every term is arithmetic a reader can check against the model shape:

- weights: parameters × bytes per parameter (fp32: 4 on the CPU and for fully trained
  weights; a frozen base on CUDA in bf16: 2; QLoRA's NF4 linear layers ~0.53 with their
  block scales, embeddings and norms in bf16: 2);
- gradients: trainable parameters × 4 (fp32);
- optimizer states: trainable × 8 (AdamW's two fp32 moments) or × 2 (8-bit AdamW), plus
  one trainable-sized temporary while the foreach AdamW step runs;
- activations: what autograd keeps per token per block (norms, q/k/v and their rotary
  copies, grouped-query keys/values repeated to all heads, the gated MLP's four tensors,
  residuals; LoRA dropout keeps a dropped copy of each adapted layer's input), times tokens
  per micro-batch times layers. With activation checkpointing only each block's input is
  kept, plus one block recomputed during backward. On CPU, attention with finesmith's
  block-diagonal mask runs the math kernel, which keeps the softmax probabilities
  (`heads × tokens²` per block); CUDA's memory-efficient kernel keeps only the mask;
- logits: finesmith runs the LM head only at supervised positions, so the logits, their
  log-softmax and their gradient are `supervised tokens × vocab` each, not `tokens × vocab`;
- runtime: on CPU the Python + torch + transformers process itself, on CUDA the context,
  cuBLAS workspace and allocator slack that `max_memory_allocated` does not see.

Over several GPUs (one process each), DDP keeps a full replica per GPU, so the per-GPU
estimate is the one-GPU estimate plus DDP's gradient buckets (2 × 25 MiB). FSDP2 divides
weights, gradients, optimizer state and the step's temporary by the number of GPUs, and
adds what is gathered at a time: the root unit (embeddings, LM head, final norm) stays
gathered through forward and backward, and up to two decoder blocks are gathered at once
(the current one and the prefetched next), in bf16 on CUDA.

Gradients and activations are never all alive at once: backward frees each block's
activations as it creates its gradients, so the peak is the larger of the backward peak
(weights + optimizer + activations + logits + the LM-head gradient) and the optimizer-step
peak (weights + gradients + optimizer + the step's temporary).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from finesmith.advise.model_shape import ModelShape

GIB = 1024**3
# Resident size of a finesmith training process with a negligible model (the tiny test
# Llama), measured with ru_maxrss on the project's Linux machine: 0.40 GiB.
CPU_RUNTIME = int(0.40 * GIB)
CUDA_RUNTIME = int(1.0 * GIB)
# NF4: 4 bits per weight plus block scales (0.127 bits with double quantisation) ≈ 0.53 bytes.
BYTES = {"fp32": 4.0, "bf16": 2.0, "nf4": 0.53}
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0}
FULL_METHODS = ("full",)
ADAPTER_METHODS = ("lora", "qlora")
NO_TRAINING = ("few_shot",)


@dataclass(frozen=True)
class RunShape:
    """The run-dependent inputs of the estimate.

    Attributes:
        method: full | lora | qlora | prompt_tuning | prefix_tuning | ia3 | few_shot.
        tokens: tokens in the largest micro-batch (finesmith packs a micro-batch into one row).
        supervised: supervised tokens in that micro-batch (where the LM head runs).
        device: "cpu" (fp32) or "cuda" (bf16 autocast).
        checkpointing: activation checkpointing on.
        lora_r: LoRA rank (lora/qlora).
        lora_dropout: above 0, each adapted layer keeps a dropped copy of its input.
        virtual_tokens: prompt/prefix-tuning virtual tokens.
        optimizer: adamw | adamw_8bit | paged_adamw_8bit.
        gpus: processes the run spreads over (1: one device).
        sharded: FSDP2 (weights, gradients and optimizer state split over `gpus`) rather than DDP.
        shared: few_shot: the tokens of `tokens` every prompt shares (fixed shots), held once.
    """

    method: str
    tokens: int
    supervised: int
    device: str = "cpu"
    checkpointing: bool = False
    lora_r: int = 16
    lora_dropout: float = 0.05
    virtual_tokens: int = 20
    optimizer: str = "adamw"
    gpus: int = 1
    sharded: bool = False
    shared: int = 0


DDP_BUCKETS = 2 * 25 * 1024**2  # DDP's default 25 MiB gradient buckets, two in flight


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component and the predicted peak (not their plain sum; see the module doc)."""

    components: dict[str, int] = field(default_factory=dict)
    peak: int = 0

    def fits(self, available: int) -> bool:
        return self.peak <= available


def trainable_parameters(shape: ModelShape, run: RunShape) -> int:
    """Parameters the optimizer updates under `run.method`."""
    if run.method in FULL_METHODS:
        return shape.params
    if run.method in ADAPTER_METHODS:
        return shape.lora_params(run.lora_r)
    if run.method == "prompt_tuning":
        return run.virtual_tokens * shape.hidden
    if run.method == "prefix_tuning":
        return run.virtual_tokens * shape.layers * 2 * shape.kv_heads * shape.head_dim
    if run.method == "ia3":
        return shape.layers * (2 * shape.kv_heads * shape.head_dim + shape.intermediate)
    return 0


def weight_bytes(shape: ModelShape, run: RunShape) -> float:
    """Base weights plus adapters: NF4 linear layers for QLoRA; a frozen base in bf16 on CUDA
    (the precision policy), fp32 on the CPU and for fully trained weights (the fp32 masters)."""
    if run.method == "qlora":
        rest = shape.params - shape.linear_params
        base = shape.linear_params * BYTES["nf4"] + rest * BYTES["bf16"]
    elif run.device == "cuda" and run.method not in FULL_METHODS:
        base = shape.params * BYTES["bf16"]
    else:
        base = shape.params * BYTES["fp32"]
    adapters = trainable_parameters(shape, run) * BYTES["fp32"] if run.method not in FULL_METHODS else 0
    return base + adapters


def block_elements_per_token(shape: ModelShape, run: RunShape) -> int:
    """Elements autograd keeps per token per transformer block (no checkpointing)."""
    h, i = shape.hidden, shape.active_intermediate  # a mixture of experts: the experts a token is routed to
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    elements = (6 * h  # two RMSNorms: input, fp32 normalised copy, output
                + q + 2 * kv  # q, k, v projections
                + 2 * (q + kv)  # rotary embedding: rotated q and k plus their half-rotations
                + 2 * q  # keys and values repeated to every query head (grouped-query attention)
                + 2 * q  # attention output and its contiguous transpose (o-proj input)
                + 2 * h  # o-proj output and the residual sum
                + 4 * i  # MLP: gate, up, silu(gate), their product (down-proj input)
                + h)  # down-proj output / second residual
    if run.method in ADAPTER_METHODS and run.lora_dropout > 0:
        elements += 6 * h + i  # dropped inputs of q, k, v, o, gate, up (h each) and down (i)
    if run.method == "qlora":
        elements += 2 * h + i  # dequantised weights' inputs the 4-bit matmuls keep
    return elements


def activation_bytes(shape: ModelShape, run: RunShape) -> float:
    """Activations of one micro-batch kept for backward."""
    element = BYTES["bf16"] if run.device == "cuda" else BYTES["fp32"]
    block = block_elements_per_token(shape, run) * run.tokens * element + attention_bytes(shape, run)
    if run.checkpointing:
        return shape.layers * run.tokens * shape.hidden * element + block
    return shape.layers * block


def attention_bytes(shape: ModelShape, run: RunShape) -> float:
    """Per-block attention matrices: CPU's math kernel keeps the softmax probabilities."""
    if run.device == "cuda":
        return 0.0
    return shape.heads * run.tokens**2 * BYTES["fp32"]


def estimate_memory(shape: ModelShape, run: RunShape) -> MemoryEstimate:
    """Predicted peak memory of training `shape` as described by `run`.

    Args:
        shape: the model's dimensions.
        run: method, tokens per micro-batch, device and options.
    Returns:
        A MemoryEstimate: bytes per component and the predicted peak. Few-shot prompting
        trains nothing: its estimate is an evaluation's (`estimate_eval_memory`).
    """
    if run.method in NO_TRAINING:
        return estimate_eval_memory(shape, prompting_shape(run))
    trainable = trainable_parameters(shape, run)
    weights = weight_bytes(shape, run)
    runtime = CPU_RUNTIME if run.device == "cpu" else CUDA_RUNTIME
    logits = 3 * run.supervised * shape.vocab * BYTES["fp32"]
    # the device's mask: [tokens, tokens] bool, expanded to a bf16 bias by CUDA's kernel
    mask = run.tokens**2 * (3 if run.device == "cuda" else 1)
    components = {
        "weights": weights,
        "gradients": trainable * BYTES["fp32"],
        "optimizer": trainable * OPTIMIZER_BYTES.get(run.optimizer, 8.0),
        "optimizer step temporary": trainable * BYTES["fp32"],
        "activations": activation_bytes(shape, run) + mask,
        "logits": logits,
        "runtime": runtime,
    }
    # the tied/untied LM head's gradient is created first in backward, while activations live
    head_grad = shape.vocab * shape.hidden * BYTES["fp32"] if run.method in FULL_METHODS else 0
    backward = components["activations"] + logits + head_grad
    if run.gpus > 1 and run.sharded:
        for key in ("weights", "gradients", "optimizer", "optimizer step temporary"):
            components[key] /= run.gpus
        components["gathered weights"] = gathered_bytes(shape, run)
    elif run.gpus > 1:
        components["gradient buckets"] = min(DDP_BUCKETS, components["gradients"])
    resident = components["weights"] + components["optimizer"] + runtime
    resident += components.get("gathered weights", 0) + components.get("gradient buckets", 0)
    optimizer_step = components["gradients"] + components["optimizer step temporary"]
    peak = resident + max(backward, optimizer_step)
    return MemoryEstimate({k: int(v) for k, v in components.items()}, int(peak))


def gathered_bytes(shape: ModelShape, run: RunShape) -> float:
    """FSDP2's gathered weights at the peak: the root unit plus two decoder blocks."""
    element = BYTES["bf16"] if run.device == "cuda" else BYTES["fp32"]
    root = shape.params - shape.layers * block_parameters(shape)
    return (root + 2 * block_parameters(shape)) * element


def block_parameters(shape: ModelShape) -> int:
    """Parameters of one decoder block (attention, gated MLP, two norms)."""
    return shape.linear_params // shape.layers + 2 * shape.hidden


# ---------------------------------------------------------------------------- evaluation
#
# Evaluation (`finesmith eval`, `compare`, few-shot prompting) runs `finesmith.evaluate.engine`:
# prompts are prefilled in batches on top of their group's shared prefix (held once), each
# batch's label trie is forwarded from the same cache, and rows whose greedy answer needs
# decoding wait in a pool that is decoded together once full. What it holds beyond the weights:
#
# - the shared prefix: its keys and values once, `prefix × kv` (kv = layers × 2 × kv_heads ×
#   head_dim × element bytes per token);
# - a prompt batch: the rows' own keys and values (`batch × (prompt + candidates) × kv`), and
#   while one layer runs, the prefix joined to them for attention, the attention scores
#   (`batch × heads × query × keys`: fp32 and the mask on CPU, the mask alone on CUDA) and that
#   layer's activations; the LM head runs only at positions that are read, at most `HEAD_ROWS` at a
#   time (logits and log-probabilities in fp32);
# - the decoding pool: each row's own tokens only, its prompt, the label-trie path its answer took
#   (at most the answer) and room for the answer (`pool × (prompt + 2 × answer) × kv`), and while
#   a step runs, one layer's join with the prefix and the next-token logits.
#
# A batch runs while the pool holds waiting rows, and the pool decodes between batches, so the
# peak is weights + runtime + prefix + the larger of (pool + batch) and (decoding the pool).

HEAD_ROWS = 256  # positions whose full-vocabulary logits exist at once (the engine reads the rest in turn)


@dataclass(frozen=True)
class EvalShape:
    """The evaluation-dependent inputs of `estimate_eval_memory`.

    Attributes:
        prefix: tokens every prompt of a group shares (system prompt, fixed shots), held once.
        prompt: the longest prompt's own tokens after the prefix.
        candidates: label-trie tokens forwarded after each prompt (0 without label scoring).
        answer: tokens a greedy answer may take (max new tokens).
        batch: prompts per prefill forward.
        pool: rows decoded together.
        device: "cpu" (fp32) or "cuda" (bf16).
    """

    prefix: int
    prompt: int
    candidates: int = 0
    answer: int = 32
    batch: int = 16
    pool: int = 64
    device: str = "cpu"


def kv_bytes_per_token(shape: ModelShape, device: str) -> float:
    """Keys and values of one token in every layer."""
    element = BYTES["bf16"] if device == "cuda" else BYTES["fp32"]
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * element


def estimate_eval_memory(shape: ModelShape, ev: EvalShape) -> MemoryEstimate:
    """Predicted peak memory of evaluating with the engine (see the section comment above).

    Args:
        shape: the model's dimensions.
        ev: prompt, prefix and answer lengths, batch and pool sizes, device.
    Returns:
        A MemoryEstimate: weights, runtime, shared prefix, prompt batch, decoding pool, decoding
        step, and the peak.
    """
    element = BYTES["bf16"] if ev.device == "cuda" else BYTES["fp32"]
    kv = kv_bytes_per_token(shape, ev.device)
    layer_kv = kv / shape.layers
    own = ev.prompt + ev.candidates
    query = max(ev.prompt, ev.candidates, 1)
    keys = ev.prefix + own
    read = min(HEAD_ROWS, ev.batch * max(1, ev.candidates))
    # CPU's math kernel keeps fp32 scores beside the boolean mask; CUDA's memory-efficient
    # kernel keeps only the mask, as a bf16 bias (as in training, see `estimate_memory`)
    score = BYTES["fp32"] + 1 if ev.device == "cpu" else 3
    batch = (ev.batch * own * kv  # the rows' own keys and values
             + ev.batch * keys * layer_kv  # one layer's prefix joined to them
             + ev.batch * shape.heads * query * keys * score  # attention scores and the mask
             + ev.batch * query * (4 * shape.hidden + 3 * shape.intermediate) * element  # one layer's activations
             + read * shape.vocab * 2 * BYTES["fp32"])  # logits and log-probabilities of read positions
    row = ev.prompt + 2 * ev.answer
    pool = ev.pool * row * kv
    step = (ev.pool * (ev.prefix + row) * layer_kv  # one layer's join with the prefix
            + ev.pool * shape.heads * (ev.prefix + row) * score
            + ev.pool * shape.vocab * BYTES["fp32"])
    components = {
        "weights": shape.params * element,
        "runtime": CPU_RUNTIME if ev.device == "cpu" else CUDA_RUNTIME,
        "shared prefix": ev.prefix * kv,
        "prompt batch": batch,
        "decoding pool": pool,
        "decoding step": step,
    }
    working = components["shared prefix"] + pool + max(batch, step)
    peak = components["weights"] + components["runtime"] + working
    return MemoryEstimate({k: int(v) for k, v in components.items()}, int(peak))


def eval_working_bytes(estimate: MemoryEstimate) -> int:
    """What an evaluation holds beyond the weights and the runtime (what `--eval-memory` bounds)."""
    return estimate.peak - estimate.components["weights"] - estimate.components["runtime"]


def fit_eval_batches(shape: ModelShape, ev: EvalShape, budget: float) -> EvalShape | None:
    """`ev` with the largest batch and pool (no larger than its own) whose working memory fits
    `budget` bytes: the pool shrinks first (down to the batch), then both; None when one
    prompt and one decoding row do not fit."""
    batch, pool = ev.batch, ev.pool
    while True:
        trial = dataclasses.replace(ev, batch=batch, pool=pool)
        if eval_working_bytes(estimate_eval_memory(shape, trial)) <= budget:
            return trial
        if pool > batch:
            pool = max(batch, pool // 2)
        elif batch > 1:
            batch, pool = batch // 2, max(1, pool // 2)
        else:
            return None


def prompting_shape(run: RunShape) -> EvalShape:
    """Few-shot prompting as an evaluation: prompts of `run.tokens`, of which `run.shared` (the
    fixed shots) are every prompt's shared prefix."""
    return EvalShape(prefix=run.shared, prompt=run.tokens - run.shared, device=run.device)
