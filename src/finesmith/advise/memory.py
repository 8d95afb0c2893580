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
    """Activations of one micro-batch kept for backward (KV cache for inference)."""
    element = BYTES["bf16"] if run.device == "cuda" else BYTES["fp32"]
    if run.method in NO_TRAINING:
        return shape.layers * run.tokens * 2 * shape.kv_heads * shape.head_dim * element
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
        A MemoryEstimate: bytes per component and the predicted peak.
    """
    trainable = trainable_parameters(shape, run)
    weights = weight_bytes(shape, run)
    runtime = CPU_RUNTIME if run.device == "cpu" else CUDA_RUNTIME
    logits = shape.vocab * BYTES["fp32"] if run.method in NO_TRAINING else 3 * run.supervised * shape.vocab * BYTES["fp32"]
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
    if run.method in NO_TRAINING:
        peak = weights + components["activations"] + logits + runtime
    return MemoryEstimate({k: int(v) for k, v in components.items()}, int(peak))


def gathered_bytes(shape: ModelShape, run: RunShape) -> float:
    """FSDP2's gathered weights at the peak: the root unit plus two decoder blocks."""
    element = BYTES["bf16"] if run.device == "cuda" else BYTES["fp32"]
    root = shape.params - shape.layers * block_parameters(shape)
    return (root + 2 * block_parameters(shape)) * element


def block_parameters(shape: ModelShape) -> int:
    """Parameters of one decoder block (attention, gated MLP, two norms)."""
    return shape.linear_params // shape.layers + 2 * shape.hidden
