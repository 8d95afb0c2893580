"""The one console every command prints progress and results to, and quiet libraries."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)


def quiet_libraries() -> None:
    """Keep library progress bars and advisory warnings out of the user's terminal."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
