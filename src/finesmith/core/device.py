"""Which device a command runs on."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
