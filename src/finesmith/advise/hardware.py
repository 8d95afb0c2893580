"""What this machine offers: GPU name and memory, CPU RAM and cores."""

from __future__ import annotations

import dataclasses

import os
from dataclasses import dataclass
from pathlib import Path

from finesmith.errors import FinesmithError

GIB = 1024**3
# A memory budget that overrides detection (GiB), honoured by `advise` and `train --dry-run`:
# useful to plan for another machine, or to keep headroom for other work on this one.
MEMORY_ENV = "FINESMITH_MEMORY_GB"


@dataclass(frozen=True)
class Hardware:
    """The resources a run can use.

    Attributes:
        device: "cuda" when a GPU trains, else "cpu".
        gpu_name: the GPU's name, or None.
        gpu_memory: bytes of GPU memory (0 without a GPU).
        cpu_memory: bytes of RAM available to this process.
        cpu_count: CPU cores usable by this process.
        gpus: GPUs the run spreads over (one process each); memory and name are per GPU.
    """

    device: str
    gpu_name: str | None
    gpu_memory: int
    cpu_memory: int
    cpu_count: int
    gpus: int = 1

    @property
    def training_memory(self) -> int:
        """Bytes the training process may use on the device that trains."""
        return self.gpu_memory if self.device == "cuda" else self.cpu_memory

    def describe(self) -> str:
        if self.device == "cuda":
            count = f"{self.gpus} × " if self.gpus > 1 else ""
            each = " each" if self.gpus > 1 else ""
            return f"{count}GPU {self.gpu_name} ({self.gpu_memory / GIB:.0f} GiB{each}), {self.cpu_count} CPU cores"
        return f"CPU only: {self.cpu_count} cores, {self.cpu_memory / GIB:.1f} GiB RAM available"


def detect_hardware(gpu_memory_gb: float | None = None, gpus: int | None = None) -> Hardware:
    """Detect the GPUs (via torch.cuda), RAM and cores; apply the overrides if given.

    Args:
        gpu_memory_gb: plan for a GPU with this much memory (GiB) instead of what is detected.
        gpus: plan for this many GPUs (of that memory each) instead of the detected count.
            Without it, the `FINESMITH_MEMORY_GB` environment variable, if set, caps the
            memory of the training device.
    Returns:
        The Hardware.
    """
    import torch

    cpu_memory, cpu_count = available_ram(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hardware = Hardware("cuda", props.name, int(props.total_memory), cpu_memory, cpu_count,
                            torch.cuda.device_count())
    else:
        hardware = Hardware("cpu", None, 0, cpu_memory, cpu_count)
    if gpus is not None:
        if gpus < 1:
            raise FinesmithError(f"--gpus must be at least 1, got {gpus}")
        if hardware.device != "cuda" and gpu_memory_gb is None:
            raise FinesmithError("--gpus plans for GPUs and this machine has none; say how much memory each has "
                                 "with --gpu-memory GB")
    if gpu_memory_gb is not None:
        if gpu_memory_gb <= 0:
            raise FinesmithError(f"--gpu-memory must be positive, got {gpu_memory_gb}")
        name = hardware.gpu_name or "planned GPU"
        return Hardware("cuda", name, int(gpu_memory_gb * GIB), cpu_memory, cpu_count, gpus or hardware.gpus)
    hardware = apply_memory_env(hardware)
    return dataclasses.replace(hardware, gpus=gpus) if gpus else hardware


def apply_memory_env(hardware: Hardware) -> Hardware:
    """Cap the training device's memory at `FINESMITH_MEMORY_GB` when that is set."""
    value = os.environ.get(MEMORY_ENV)
    if not value:
        return hardware
    try:
        budget = int(float(value) * GIB)
    except ValueError:
        raise FinesmithError(f"{MEMORY_ENV}={value!r} is not a number of GiB; set e.g. {MEMORY_ENV}=8") from None
    if budget <= 0:
        raise FinesmithError(f"{MEMORY_ENV} must be positive, got {value}")
    if hardware.device == "cuda":
        return Hardware("cuda", hardware.gpu_name, budget, hardware.cpu_memory, hardware.cpu_count, hardware.gpus)
    return Hardware("cpu", None, 0, budget, hardware.cpu_count)


def available_ram() -> int:
    """Bytes of RAM available now (MemAvailable), falling back to psutil or total RAM."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
