"""File-system helpers shared by the writers that publish with write-to-temporary + ``os.replace`` (checkpoints,
the decoded-image cache)."""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["remove_stale_temps"]


def remove_stale_temps(directory: Path, prefix: str, max_age_s: float) -> None:
    """Delete ``prefix*.tmp`` files in ``directory`` older than ``max_age_s``: leftovers of killed writers (younger
    ones may belong to a writer still at work)."""
    now = time.time()
    for p in directory.iterdir():  # not glob: a run or file name may hold glob metacharacters
        try:
            if p.name.startswith(prefix) and p.name.endswith(".tmp") and now - p.stat().st_mtime > max_age_s:
                p.unlink()
        except OSError:
            pass  # gone meanwhile, or not ours to delete: the write itself says if the folder is unusable
