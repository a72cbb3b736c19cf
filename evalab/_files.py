"""Atomic file writes: a reader (or a rerun after a crash) sees the whole file or none of it."""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable) -> None:
    """Call ``write(handle)`` on ``.<stem>.<pid>.<random>.tmp`` beside ``path``, fsync, then rename over ``path``.

    The pid in the temporary name lets a later process tell a dead writer's leftovers from a live one's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
