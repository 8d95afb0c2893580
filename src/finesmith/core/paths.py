"""Where finesmith keeps its caches on disk."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder: `$FINESMITH_CACHE`, else `~/.cache/finesmith`.

    Converted built-in models live in `models/` under it, tokenized training data in `data/`.
    """
    return Path(os.environ.get("FINESMITH_CACHE") or Path.home() / ".cache" / "finesmith")
