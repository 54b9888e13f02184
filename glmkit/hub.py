"""Where checkpoints come from: a local directory for now (hub ids resolve through here later)."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, **_: object) -> Path:
    """Return the local directory holding a checkpoint, or raise FileNotFoundError naming it."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    raise FileNotFoundError(f"checkpoint directory {str(name_or_path)!r} does not exist")
