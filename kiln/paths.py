"""Where kiln keeps what it downloads, prepares and trains for reuse: ~/.cache/kiln, or $KILN_CACHE."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """~/.cache/kiln, or $KILN_CACHE."""
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
