"""Time per epoch: from a short calibration run on this machine, or from device throughput.

Training costs about 6 FLOPs per parameter per token when every weight gets a gradient
(2 forward, 4 backward) and about 4 when only adapters or virtual tokens do (the backward
pass still computes input gradients through the frozen weights), plus attention's
`12 · layers · hidden · context` per token. Sustained throughput is a fraction (MFU) of a
device's dense peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from finesmith.advise.hardware import Hardware
from finesmith.advise.memory import FULL_METHODS, NO_TRAINING
from finesmith.advise.model_shape import ModelShape

# Dense peak FLOP/s (no sparsity): bf16 tensor cores where the card has them, else fp16/fp32.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "RTX A6000": 155e12,
    "V100": 125e12, "T4": 65e12,
}
GPU_FALLBACK_FLOPS = 50e12  # an unknown GPU: assume a modest card
GPU_MFU = 0.35  # sustained share of peak for small-batch fine-tuning
# fp32 FLOP/s one CPU core sustains in this loop: the README's demo run (LoRA on the built-in
# model, 25,747 tokens in 148 s on the project's 2-core machine) is 174 tokens/s at ~0.56
# GFLOP per token, ~48 GFLOP/s per core; 40 leaves room for slower cores.
CPU_FLOPS_PER_CORE = 40e9


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds for one pass over the data and how that number was obtained."""

    seconds_per_epoch: float
    tokens_per_second: float
    source: str  # "calibrated on this machine" or "from <device> peak FLOP/s"


def flops_per_token(shape: ModelShape, method: str, context: int) -> float:
    """Training FLOPs per token for `method` at average example length `context`."""
    attention = 12 * shape.layers * shape.hidden * context
    # a mixture of experts computes with the experts each token is routed to, not all of them
    if method in NO_TRAINING:
        return 2 * shape.active_params + attention / 3
    multiplier = 6 if method in FULL_METHODS else 4
    return multiplier * shape.active_params + attention


def device_flops(hardware: Hardware) -> tuple[float, str]:
    """Sustained FLOP/s of the training device and where the number comes from."""
    if hardware.device == "cuda":
        key = gpu_family(hardware.gpu_name or "")
        if key:
            return GPU_PEAK_FLOPS[key] * GPU_MFU, f"from the {key} peak FLOP/s × {GPU_MFU:.0%} utilisation"
        return GPU_FALLBACK_FLOPS * GPU_MFU, f"from an assumed {GPU_FALLBACK_FLOPS / 1e12:.0f} TFLOP/s GPU (unknown card)"
    flops = CPU_FLOPS_PER_CORE * hardware.cpu_count
    return flops, f"from a CPU estimate ({hardware.cpu_count} cores × {CPU_FLOPS_PER_CORE / 1e9:.1f} GFLOP/s)"


def gpu_family(name: str) -> str | None:
    """The GPU_PEAK_FLOPS key a device name belongs to (longest match first), if any."""
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return key
    return None


def estimate_time(shape: ModelShape, method: str, epoch_tokens: int, context: int, hardware: Hardware,
                  calibrated_tokens_per_second: float | None = None) -> TimeEstimate:
    """Seconds per epoch of `epoch_tokens` tokens.

    Args:
        shape: model dimensions.
        method: the training method.
        epoch_tokens: tokens in one pass over the data.
        context: mean tokens per example (for the attention term).
        hardware: the machine.
        calibrated_tokens_per_second: measured tokens/s of `method` on this machine, if known.
    Returns:
        A TimeEstimate naming its source.
    """
    if calibrated_tokens_per_second:
        rate = calibrated_tokens_per_second
        return TimeEstimate(epoch_tokens / rate, rate, "calibrated on this machine")
    flops, source = device_flops(hardware)
    rate = flops / flops_per_token(shape, method, context)
    return TimeEstimate(epoch_tokens / rate, rate, source)


def scale_calibration(measured_tokens_per_second: float, measured_method: str, method: str,
                      shape: ModelShape, context: int) -> float:
    """Carry a tokens/s measured for one method over to another by their FLOPs per token."""
    return measured_tokens_per_second * (flops_per_token(shape, measured_method, context)
                                         / flops_per_token(shape, method, context))
