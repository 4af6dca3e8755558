"""Where the read-only shared data lives: $UNLEARN_SHARED_DIR, else `shared/` next to the repository
(or next to one of its parent directories, for a checkout nested deeper)."""

from __future__ import annotations

import os
from pathlib import Path


def _find_shared() -> Path:
    if os.environ.get("UNLEARN_SHARED_DIR"):
        return Path(os.environ["UNLEARN_SHARED_DIR"])
    repo = Path(__file__).resolve().parents[1]
    for parent in repo.parents:
        if (parent / "shared" / "data" / "tofu").is_dir():
            return parent / "shared"
    return repo.parent / "shared"


SHARED = _find_shared()
TOFU = SHARED / "data" / "tofu"


def require_tofu() -> Path:
    """The TOFU directory; a clear failure (not a skip) when the shared data is missing."""
    if not (TOFU / "forget10_perturbed.json").is_file():
        raise FileNotFoundError(f"TOFU data not found at {TOFU}: put the shared data there or set UNLEARN_SHARED_DIR")
    return TOFU
