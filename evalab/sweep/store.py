"""The result store of a sweep: one parquet file per cell, written atomically, and ``load_results``.

Layout of an output directory:
    DIR/spec.toml              the spec of the latest run (its original text)
    DIR/specs/<hash>.toml      every spec ever run into DIR, by content hash (rows carry ``spec_hash``)
    DIR/cells/<cell_id>.parquet  one file per cell: one row, status "ok" or "failed"
    DIR/.lock, DIR/.lock.owner   the lock of the running sweep and its holder (pid, host, start)

A cell file is written to a temporary file in the same folder (``.<cell_id>.<pid>.<random>.tmp``) and renamed
over its final name with ``os.replace``, so a reader (or a rerun after a crash) sees either the whole file or
none. One sweep process writes into a directory at a time: ``lock(DIR)`` holds an OS file lock on DIR/.lock
(``filelock``; the kernel releases it when its holder dies, so a killed sweep's lock is taken over safely) and
DIR/.lock.owner names the holder for the message a second sweep gets.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import warnings
from pathlib import Path

import filelock

import pandas as pd

from .._files import TMP_SUFFIX, atomic_write

CELLS = "cells"
PROVENANCE = ("dtype", "device", "status", "error", "cell_id", "spec_name", "spec_hash", "evalab_version",
              "torch_version", "host", "finished_at", "wall_seconds")
SUFFIX = ".parquet"


LOCK, OWNER = ".lock", ".lock.owner"


class DirectoryLocked(RuntimeError):
    """Another sweep process holds the lock of this output directory."""


@contextlib.contextmanager
def lock(out: str | Path):
    """Hold DIR's lock while the body runs; raise DirectoryLocked at once, naming the holder, if it is taken.

    Yields the owner line left by a previous holder that died without releasing it (None otherwise)."""
    out = Path(out)
    held = filelock.FileLock(str(out / LOCK), timeout=0)
    try:
        held.acquire()
    except filelock.Timeout:
        raise DirectoryLocked(
            f"{str(out)!r} is in use by another evalab sweep ({_read_owner(out) or 'owner unknown'}); wait for it to "
            "finish or choose another --out"
        ) from None
    try:
        previous = _read_owner(out)  # still there: its holder was killed before it could remove it
        (out / OWNER).write_text(f"pid {os.getpid()} on {socket.gethostname()}, started "
                                 f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n")
        yield previous
    finally:
        (out / OWNER).unlink(missing_ok=True)
        held.release()


def _read_owner(out: Path) -> str | None:
    try:
        return (out / OWNER).read_text().strip() or None
    except OSError:
        return None


def cells_dir(out: str | Path) -> Path:
    return Path(out) / CELLS


def cell_path(out: str | Path, cell_id: str) -> Path:
    return cells_dir(out) / f"{cell_id}{SUFFIX}"


def write_cell(out: str | Path, cell_id: str, frame: pd.DataFrame) -> Path:
    """Write one cell's rows atomically to DIR/cells/<cell_id>.parquet."""
    path = cell_path(out, cell_id)
    atomic_write(path, lambda handle: frame.to_parquet(handle, index=False))
    return path


def write_spec(out: str | Path, text: str, spec_hash: str) -> None:
    """Save the spec's text as DIR/spec.toml (latest) and DIR/specs/<hash>.toml."""
    out = Path(out)
    data = text.encode()
    for path in (out / "spec.toml", out / "specs" / f"{spec_hash}.toml"):
        atomic_write(path, lambda handle: handle.write(data))


def statuses(out: str | Path) -> dict[str, str]:
    """cell_id -> status ("ok"/"failed") of every readable cell file; unreadable files are left out."""
    found = {}
    folder = cells_dir(out)
    if not folder.is_dir():
        return found
    for path in folder.glob(f"*{SUFFIX}"):
        if path.name.startswith("."):
            continue
        try:
            status = pd.read_parquet(path, columns=["status"])["status"]
        except Exception:  # a partial or foreign file: the cell counts as not done and is rewritten
            continue
        if len(status):
            found[path.stem] = "ok" if (status == "ok").all() else "failed"
    return found


def remove_stale_temporaries(out: str | Path) -> int:
    """Delete temporary files left by sweep processes that no longer run (killed mid-write)."""
    removed = 0
    folder = cells_dir(out)
    if not folder.is_dir():
        return removed
    for path in folder.glob(f".*{TMP_SUFFIX}"):
        parts = path.name.split(".")
        try:
            pid = int(parts[-3])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clear(out: str | Path) -> int:
    """Delete every cell file and temporary file of DIR (``--fresh``); returns how many cell files went."""
    folder = cells_dir(out)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        if path.is_file() and (path.suffix == SUFFIX or path.name.endswith(TMP_SUFFIX)):
            removed += path.suffix == SUFFIX
            path.unlink()
    return removed


def _column_order(columns) -> list[str]:
    """estimator, label, every estimator parameter, the rest as stored, provenance last."""
    from ..estimators import registry

    params = []
    for cls in registry.ESTIMATORS.values():
        params += [name for name in registry.estimator_parameters(cls) if name not in params]
    first = [c for c in ("estimator", "label", *params) if c in columns]
    last = [c for c in PROVENANCE if c in columns]
    return first + [c for c in columns if c not in first and c not in last] + last


def load_results(out: str | Path, *, status: str | None = None, spec=None) -> pd.DataFrame:
    """All stored rows of a sweep directory as one DataFrame (one row per cell).

    Rows of failed cells are included (``status == "failed"``, ``error`` says why, metric columns are NaN);
    ``status="ok"`` keeps only successful cells. ``spec`` (a path, a Spec, or True for DIR/spec.toml) keeps
    only the cells of that spec, in its order; otherwise every cell file in DIR counts, ordered by cell id.
    Temporary files are ignored; unreadable (partial or corrupt) cell files are skipped with a warning.
    With no rows, returns an empty DataFrame and warns.
    """
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"sweep output directory {str(out)!r} does not exist")
    if status not in (None, "ok", "failed"):
        raise ValueError(f"status={status!r} is not supported; expected None (all rows), 'ok' or 'failed'")
    frames = []
    folder = cells_dir(out)
    paths = sorted(p for p in folder.glob(f"*{SUFFIX}") if not p.name.startswith(".")) if folder.is_dir() else []
    order = None
    if spec is not None:
        from .spec import Spec, load_spec

        if spec is True:
            spec = out / "spec.toml"
        if not isinstance(spec, Spec):
            spec = load_spec(spec)
        order = [cell.cell_id for cell in spec.cells()]
        wanted = set(order)
        paths = [p for p in paths if p.stem in wanted]
    for path in paths:
        try:
            frames.append(pd.read_parquet(path))
        except Exception as err:
            warnings.warn(f"skipping unreadable cell file {str(path)!r} ({type(err).__name__}: {err})", stacklevel=2)
    frames = [f for f in frames if len(f)]
    if not frames:
        warnings.warn(f"no sweep results in {str(out)!r} (no readable files under {CELLS}/); run `evalab sweep` first", stacklevel=2)
        return pd.DataFrame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # concat of all-NA columns
        results = pd.concat(frames, ignore_index=True)
    results = results[_column_order(results.columns)]
    if order is not None:
        rank = {cell_id: i for i, cell_id in enumerate(order)}
        results = results.iloc[results["cell_id"].map(rank).argsort(kind="stable")].reset_index(drop=True)
    if status is not None:
        results = results[results["status"] == status].reset_index(drop=True)
    return results
