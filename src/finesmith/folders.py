"""Output folders that never mix a new result into old files."""

from __future__ import annotations

import shutil
from pathlib import Path

from finesmith.errors import FinesmithError


def fresh_folder(output: Path, overwrite: bool, option: str = "--output") -> Path:
    """Create `output` empty: refuse a non-empty folder unless `overwrite`, then replace it.

    Args:
        output: the folder to create.
        overwrite: whether an existing non-empty folder may be deleted first.
        option: how the user names this folder, for the error message.
    Returns:
        `output`.
    """
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FinesmithError(f"{output} is not empty; choose another {option} or pass --overwrite")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    return output
