"""Where the read-only shared data lives: `../shared` next to the repository, or $UNLEARN_SHARED_DIR."""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(os.environ.get("UNLEARN_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
TOFU = SHARED / "data" / "tofu"


def require_tofu() -> Path:
    """The TOFU directory; a clear failure (not a skip) when the shared data is missing."""
    if not (TOFU / "forget10_perturbed.json").is_file():
        raise FileNotFoundError(f"TOFU data not found at {TOFU}: put the shared data there or set UNLEARN_SHARED_DIR")
    return TOFU
