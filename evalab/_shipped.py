"""The folders that ship with evalab: the figure definitions (analysis/) and the notebooks (notebooks/).

In a source checkout they sit at the top of the repository; an installed wheel carries them inside the
package as ``evalab/analysis`` and ``evalab/notebooks`` (pyproject.toml maps them there).
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
NAMES = ("analysis", "notebooks")


def repository_root() -> Path:
    """The parent of the evalab package directory: the repository root of a source checkout."""
    return PACKAGE.parent


def shipped(name: str) -> Path:
    """The folder ``name`` ("analysis" or "notebooks") of this evalab: inside the installed package, else at the
    top of the source checkout. Raises FileNotFoundError naming both places when neither holds it."""
    if name not in NAMES:
        raise ValueError(f"name={name!r} is not a shipped folder; expected one of {', '.join(map(repr, NAMES))}")
    candidates = (PACKAGE / name, repository_root() / name)
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"evalab's {name}/ folder is missing: looked in {candidates[0]} (an installed wheel) "
                            f"and {candidates[1]} (a source checkout); reinstall evalab")
