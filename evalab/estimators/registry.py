"""Names under which specs, result tables and figures refer to estimators.

An estimator is named in a spec (or ``make_estimator``) in one of three ways, looked up in this order:
- a name in ``ESTIMATORS``: the built-ins, and classes added in this process with :func:`register_estimator`;
- a name in the ``evalab.estimators`` entry-point group of an installed package;
- an import path ``"package.module:Class"``.
A fitted estimator saved by ``evalab.save_fitted`` is named ``"fitted"`` (with parameters ``file`` and optionally
``sha256``) or ``"fitted:<file>"`` (evalab.estimators.fitted).
Any class following the protocol of :mod:`evalab.estimators.base` works; the parameters a spec may set are its
dataclass fields (or, for other classes, the keyword parameters of its constructor).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect

import torch

from .control_variates import ControlVariates
from .eva import EVA
from .lara import LARA
from .learned import T2R, Hedgehog, ReBased
from .linear import LinearAttention
from .nystrom import Nystrom
from .ra import RA
from .rfa import RFA
from .scatterbrain import Scatterbrain
from .softmax import Softmax
from .window import LocalWindow

ESTIMATORS = {"softmax": Softmax, "rfa": RFA, "eva": EVA, "control_variates": ControlVariates,
               "ra": RA, "lara": LARA,
               "nystrom": Nystrom, "linear_attention": LinearAttention, "scatterbrain": Scatterbrain}
ESTIMATORS.update({"local_window": LocalWindow, "t2r": T2R, "hedgehog": Hedgehog,
                   "rebased": ReBased})
ENTRY_POINTS = "evalab.estimators"
FITTED = "fitted"  # the name of a fitted estimator loaded from a file: "fitted" or "fitted:<file>"
REQUIRED = inspect.Parameter.empty  # the default of a parameter that has none


def register_estimator(name: str, cls: type) -> type:
    """Make ``cls`` available under ``name`` in this process (specs, ``make_estimator``); returns ``cls``.

    Sweeps on other processes (Dask workers) import the class by its path ``module:Class`` instead, so define
    it in an importable module for those.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name={name!r} must be a non-empty string without ':' (':' marks an import path)")
    if not inspect.isclass(cls):
        raise TypeError(f"cls must be a class, got {cls!r} ({type(cls).__name__})")
    if name in ESTIMATORS and ESTIMATORS[name] is not cls:
        raise ValueError(f"estimator {name!r} is already registered as {import_path(ESTIMATORS[name])}")
    ESTIMATORS[name] = cls
    return cls


def import_path(cls: type) -> str:
    """``"package.module:Class"``, the path that :func:`estimator_class` imports ``cls`` by."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _entry_point(name: str):
    found = importlib.metadata.entry_points(group=ENTRY_POINTS, name=name)
    return next(iter(found), None)


def _import(path: str) -> type:
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"estimator {path!r}: an import path has the form 'package.module:Class'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raised while loading: name the path
        raise ValueError(f"estimator {path!r} cannot be imported: {type(err).__name__}: {err}") from None
    for attr in qualname.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"estimator {path!r} cannot be imported: module {module_name!r} has no {qualname!r}")
        obj = getattr(obj, attr)
    if not inspect.isclass(obj):
        raise ValueError(f"estimator {path!r} is not a class: {obj!r}")
    return obj


def estimator_class(name: str) -> type:
    """The class a spec's estimator ``name`` refers to: a registered name, an entry-point name or an import path."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"estimator name {name!r} must be a non-empty string")
    if name in ESTIMATORS:
        return ESTIMATORS[name]
    if name == FITTED or name.startswith(FITTED + ":"):
        from .fitted import Fitted

        return Fitted
    if ":" in name:
        return _import(name)
    entry = _entry_point(name)
    if entry is not None:
        return _import(entry.value)
    installed = sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINTS))
    raise ValueError(
        f"{name!r} is not a registered estimator; expected one of {', '.join(map(repr, [*ESTIMATORS, *installed]))}, "
        "or an import path 'package.module:Class'"
    )


def is_builtin(name: str) -> bool:
    """True for a name every evalab process knows (the built-in estimators)."""
    cls = ESTIMATORS.get(name)
    return cls is not None and cls.__module__.startswith("evalab.")


def default_label(name: str) -> str:
    """The label of a spec's estimator ``name`` when the spec gives none: the name itself for a built-in or an
    entry point, the class name for an import path or a class registered in this process."""
    if is_builtin(name) or (name not in ESTIMATORS and ":" not in name and _entry_point(name) is not None):
        return name
    return estimator_class(name).__name__


def estimator_parameters(estimator) -> dict:
    """The parameters a spec may set on an estimator class, or the values an instance holds for them.

    Class: parameter -> default (``REQUIRED`` when there is none): its dataclass fields that ``__init__``
    takes and its repr shows (fields left out of the repr, e.g. learned tensors, are not spec parameters), or the
    keyword parameters of its constructor. Instance: parameter -> its value (the attributes of the same names;
    tensor values, and parameters a non-dataclass instance does not keep as attributes, are left out).
    """
    if not inspect.isclass(estimator):
        names = estimator_parameters(type(estimator))
        return {name: getattr(estimator, name) for name in names
                if hasattr(estimator, name) and not isinstance(getattr(estimator, name), torch.Tensor)}
    cls = estimator
    if dataclasses.is_dataclass(cls):
        out = {}
        for f in dataclasses.fields(cls):
            if not f.init or not f.repr:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = REQUIRED
        return out
    params = inspect.signature(cls).parameters.values()
    return {p.name: p.default for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def make_estimator(name: str, **params):
    """Build an estimator by name or import path: ``make_estimator("rfa", num_features=64)``."""
    if isinstance(name, str) and name.startswith(FITTED + ":"):
        name, params = FITTED, {"file": name[len(FITTED) + 1:], **params}
    cls = estimator_class(name)
    known = estimator_parameters(cls)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"estimator {name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: {', '.join(sorted(known))}")
    return cls(**params)


def estimator_name(estimator) -> str:
    """The registered name of an estimator instance (the class name for estimators defined elsewhere)."""
    for name, cls in ESTIMATORS.items():
        if type(estimator) is cls:
            return name
    return type(estimator).__name__
