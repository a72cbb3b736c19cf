"""Module paths from before the layered layout stay importable: ``import evalab.reproduce`` gives
``evalab.report.reproduce`` itself (one module object under two names, no copy)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    **{f"evalab.{name}": f"evalab.measure.{name}"
       for name in ("monte_carlo", "attribution", "gradient_gap", "model_gap", "theory", "cost", "intervals")},
    **{f"evalab.{name}": f"evalab.report.{name}" for name in ("figures", "reproduce", "bench", "widgets")},
    "evalab.registry": "evalab.estimators.registry",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path in :data:`MOVED` and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._own_spec = module.__spec__  # the import system overwrites __spec__ with the alias's; put it back
        return module

    def exec_module(self, module):
        module.__spec__ = self._own_spec


def install() -> None:
    """Alias the modules already imported, and put the finder on ``sys.meta_path`` (once) for the others.

    Where an old path shares its name with a function of the package face (``evalab.model_gap``), importing
    it binds the module on ``evalab`` as any submodule import does; the face's module class (evalab/__init__.py)
    refuses that binding, so ``ev.model_gap`` stays the function after ``import evalab.model_gap``.
    """
    for old, new in MOVED.items():
        if new in sys.modules:
            sys.modules.setdefault(old, sys.modules[new])
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
