"""Output folders that never mix a new result into old files, and never delete a user's files."""

from __future__ import annotations

import shutil
from pathlib import Path

from finesmith.errors import FinesmithError
from finesmith.run import written_by_finesmith


def fresh_folder(output: Path, overwrite: bool, option: str = "--output") -> Path:
    """Create `output` empty: refuse a non-empty folder unless `overwrite`, then replace it.

    `--overwrite` replaces only a folder finesmith wrote (one holding a run or export
    record); any other non-empty folder is refused even then, so `--output .` in a
    project folder can never delete the project.

    Args:
        output: the folder to create.
        overwrite: whether an existing run or export folder may be deleted first.
        option: how the user names this folder, for the error message.
    Returns:
        `output`.
    """
    if output.exists() and not output.is_dir():
        raise FinesmithError(f"{option} {output} is a file; choose a folder path")
    if output.exists() and any(output.iterdir()):
        if not written_by_finesmith(output):
            raise FinesmithError(f"{option} {output} is not empty and was not written by finesmith; "
                                 f"choose a new or empty folder (finesmith never deletes files it did not create)")
        if not overwrite:
            raise FinesmithError(f"{output} already holds a finesmith result; choose another {option} "
                                 "or pass --overwrite to replace it")
        if Path.cwd().resolve().is_relative_to(output.resolve()):
            raise FinesmithError(f"{option} {output} contains the current folder; run from elsewhere to replace it")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    return output
