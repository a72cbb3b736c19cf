"""Sweep specs: parse and validate a TOML spec, expand it into cells with stable ids and seeds.

A spec names one input workload (``[inputs]``) and one or more estimator blocks (``[[estimators]]``); an
estimator is a registered name, an ``evalab.estimators`` entry point or an import path ``"package.module:Class"``
(evalab.estimators.registry), and its parameters are the class's dataclass fields. Every list-valued parameter is a grid
axis; the cells of a block are the Cartesian product of the block's axes and the inputs' axes. The format is
documented key by key in analysis/sweeps/README.md.

Identity and seeds (all derived from the cell's own content, never from its position in the spec):
- cell key: estimator name, label, every estimator parameter (defaults filled in), the inputs' kind and every
  input parameter (defaults filled in, seed resolved), replicates, the spec seed, dtype and matrix;
  ``cell_id`` is a hash of its canonical JSON. Reordering or editing the grid leaves other cells' ids alone.
- input seed: ``inputs.seed`` when the spec gives it, else derived from (spec seed, inputs key).
- Monte-Carlo seed: derived from (spec seed, inputs key including the input seed), not from the estimator,
  so every estimator run on the same input sees the same noise where the draws' layouts match (common
  random numbers), and paired differences between estimators are sharp.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib

from ..estimators import registry
from ..inputs import kinds

DTYPES = ("float32", "float64")
DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
DEVICE_CHOICES = "'cpu', 'cuda', 'cuda:N', 'mps'"
TOP_LEVEL = ("name", "description", "replicates", "seed", "device", "dtype", "max_memory_gb", "matrix", "inputs", "estimators")
REQUIRED = ("name", "replicates", "inputs", "estimators")
# Input parameters that the sweep itself supplies: set them at the top level of the spec (under these names).
SUPPLIED = {"dtype": "dtype", "device": "device", "max_memory": "max_memory_gb"}


class SpecError(ValueError):
    """An invalid sweep spec; the message names the key path, the bad value and what was expected."""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces); tuples become lists."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any, length: int = 16) -> str:
    """Hex prefix of the sha256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def derive_seed(seed: int, purpose: str, key: Any) -> int:
    """A seed in [0, 2**63) from the spec seed, a purpose tag and a JSON-able key (numpy SeedSequence)."""
    digest = hashlib.sha256(f"{purpose}:{canonical_json(key)}".encode()).digest()
    words = [int(w) for w in np.frombuffer(digest[:16], dtype=np.uint32)]
    state = np.random.SeedSequence([seed, *words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


@dataclass(frozen=True)
class Cell:
    """One point of a sweep: an estimator configuration on one input workload.

    params: every estimator parameter (defaults filled in; scale None means "the inputs' scale").
    inputs: every input parameter except seed/dtype/device (defaults filled in); kind: the inputs' kind.
    input_seed: the inputs' seed (None when the kind takes none); mc_seed: the Monte-Carlo seed.
    error: why the estimator cannot be built with these parameters (the cell is recorded as failed), or None.
    target: the import path ``module:Class`` of an estimator that is not built in (None for built-ins), so that
    processes that do not share this one's registrations (Dask workers) build the same class.
    """

    cell_id: str
    key: dict
    estimator: str
    label: str
    params: dict
    kind: str
    inputs: dict
    input_seed: int | None
    mc_seed: int
    replicates: int
    dtype: str
    matrix: bool | None
    description: str
    error: str | None = None
    target: str | None = None

    @property
    def inputs_id(self) -> str:
        """Identity of the input workload (cells with the same inputs_id run on identical q, k, v)."""
        return short_hash(self.key["inputs"])


@dataclass(frozen=True)
class Spec:
    """A parsed, validated sweep spec. ``cells()`` expands it; ``hash`` identifies its content."""

    name: str
    replicates: int
    inputs: dict
    estimators: tuple
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    max_memory_gb: float | None = None
    matrix: bool | None = None
    description: str = ""
    source: str | None = field(default=None, repr=False, compare=False)
    path: Path | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The spec as a plain dict (the TOML document's structure, optional keys left out when unset)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(replicates=self.replicates, seed=self.seed, device=self.device, dtype=self.dtype)
        if self.max_memory_gb is not None:
            out["max_memory_gb"] = self.max_memory_gb
        if self.matrix is not None:
            out["matrix"] = self.matrix
        out["inputs"] = dict(self.inputs)
        out["estimators"] = [dict(block) for block in self.estimators]
        return out

    @property
    def hash(self) -> str:
        """Hash of the spec's content (formatting and comments do not count)."""
        return short_hash(self.to_dict())

    def to_toml(self) -> str:
        """The spec's original TOML text, or a TOML rendering when it was built from a dict."""
        return self.source if self.source is not None else render_toml(self.to_dict())

    def cells(self) -> list[Cell]:
        """All cells, block by block; within a block the product of the inputs' axes and the block's axes.

        A cell whose key repeats an earlier cell's (overlapping blocks) is listed once.
        """
        return _expand(self)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a TOML sweep spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep spec {str(path)!r} does not exist") from None
    return parse_spec(text, path=path)


def parse_spec(spec: str | dict, *, path: str | Path | None = None) -> Spec:
    """Validate a spec given as TOML text or as a dict of the same structure."""
    where = f"{path}: " if path is not None else ""
    source = None
    if isinstance(spec, str):
        source = spec
        try:
            spec = tomllib.loads(spec)
        except tomllib.TOMLDecodeError as err:
            raise SpecError(f"{where}not valid TOML: {err}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{where}a spec must be a TOML document or a dict, got {type(spec).__name__}")
    try:
        return _validate(spec, source, Path(path) if path is not None else None)
    except SpecError as err:
        raise SpecError(f"{where}{err}") from None


# --- validation -------------------------------------------------------------------------------------------


def _validate(raw: dict, source: str | None, path: Path | None) -> Spec:
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown top-level key; valid keys: {', '.join(TOP_LEVEL)}")
    for key in REQUIRED:
        if key not in raw:
            raise SpecError(f"{key}: missing (required); a spec needs {', '.join(REQUIRED)}")
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"name: {name!r} must be a non-empty string")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"description: {description!r} must be a string")
    replicates = _scalar_int("replicates", raw["replicates"], minimum=2)
    seed = _scalar_int("seed", raw.get("seed", 0), minimum=0)
    device = check_device(raw.get("device", "cpu"), "device")
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise SpecError(f"dtype: {dtype!r} is not supported; expected one of {', '.join(map(repr, DTYPES))}")
    max_memory_gb = raw.get("max_memory_gb")
    if max_memory_gb is not None and (
        isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, (int, float))
        or not math.isfinite(max_memory_gb) or max_memory_gb <= 0
    ):
        raise SpecError(f"max_memory_gb: {max_memory_gb!r} must be a positive number (GiB)")
    matrix = raw.get("matrix")
    if matrix is not None and not isinstance(matrix, bool):
        raise SpecError(f"matrix: {matrix!r} must be true or false")
    inputs = _validate_inputs(raw["inputs"])
    blocks = raw["estimators"]
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
        raise SpecError(f"estimators: {blocks!r} must be a non-empty array of tables ([[estimators]] blocks)")
    estimators = tuple(_validate_block(i, block) for i, block in enumerate(blocks))
    return Spec(
        name=name, replicates=replicates, inputs=inputs, estimators=estimators, seed=seed, device=device,
        dtype=dtype, max_memory_gb=None if max_memory_gb is None else float(max_memory_gb), matrix=matrix,
        description=description, source=source, path=path,
    )


def check_device(device: object, where: str = "device") -> str:
    """Return ``device`` if it names a torch device type evalab runs on; raise SpecError otherwise."""
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise SpecError(f"{where}: {device!r} is not a supported device; expected one of {DEVICE_CHOICES}")
    return device


def _scalar_int(path: str, value: object, *, minimum: int) -> int:
    if isinstance(value, list):
        raise SpecError(f"{path}: {value!r} is a list; {path} must be a single integer (it is not a grid axis)")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{path}: {value!r} must be an integer >= {minimum}")
    return value


def _check_value(path: str, value: object) -> object:
    """A parameter value: scalar, a non-empty list of values (a grid axis), or a list wrapped in a list."""
    if isinstance(value, list):
        if not value:
            raise SpecError(f"{path}: empty list []; a grid axis needs at least one value")
        for i, item in enumerate(value):
            if isinstance(item, list):
                for inner in item:
                    _check_scalar(f"{path}[{i}]", inner)
            else:
                _check_scalar(f"{path}[{i}]", item)
        return value
    return _check_scalar(path, value)


def _check_scalar(path: str, value: object) -> object:
    if isinstance(value, (str, bool, int)) or (isinstance(value, float)):
        return value
    raise SpecError(
        f"{path}: {value!r} ({type(value).__name__}) is not a supported value; expected a string, number, "
        "boolean, or a list of them (a grid axis)"
    )


def input_parameters(kind: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters of a registered inputs kind (name -> inspect.Parameter)."""
    sig = inspect.signature(kinds.kind_function(kind))
    return {
        name: p for name, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def _accepts_any(kind: str) -> bool:
    sig = inspect.signature(kinds.kind_function(kind))
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _validate_inputs(raw: object) -> dict:
    if not isinstance(raw, dict):
        raise SpecError(f"inputs: {raw!r} must be a table ([inputs])")
    known = kinds.names()
    if "kind" not in raw:
        raise SpecError(f"inputs.kind: missing (required); expected one of {', '.join(map(repr, known))}")
    kind = raw["kind"]
    if kind not in known:
        raise SpecError(f"inputs.kind: {kind!r} is not a registered inputs kind; expected one of {', '.join(map(repr, known))}")
    params = input_parameters(kind)
    settable = [name for name in params if name not in SUPPLIED]
    out = {"kind": kind}
    for name, value in raw.items():
        if name == "kind":
            continue
        if name in SUPPLIED:
            raise SpecError(f"inputs.{name}: {value!r}; set {SUPPLIED[name]} at the top level of the spec (it applies to the whole sweep)")
        if name not in params and not _accepts_any(kind):
            raise SpecError(f"inputs.{name}: unknown parameter of inputs kind {kind!r}; its parameters: {', '.join(settable)}")
        out[name] = _check_value(f"inputs.{name}", value)
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in out and name not in SUPPLIED:
            raise SpecError(f"inputs.{name}: missing (required by inputs kind {kind!r})")
    if "seed" in out:
        for i, s in enumerate(out["seed"] if isinstance(out["seed"], list) else [out["seed"]]):
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise SpecError(f"inputs.seed: {s!r} must be an integer >= 0")
    if kind in kinds.MODEL_RUNS:  # these kinds only check their settings (cheap): check every combination now
        names, values = _axes(out, ("kind",))
        for combo in itertools.product(*values):
            try:
                kinds.make_inputs(kind, **dict(zip(names, combo)))
            except (ValueError, TypeError) as err:
                raise SpecError(f"inputs: {err}") from None
    return out


def _validate_block(index: int, raw: dict) -> dict:
    where = f"estimators[{index}]"
    if "name" not in raw:
        names = ", ".join(map(repr, registry.ESTIMATORS))
        raise SpecError(f"{where}.name: missing (required); expected one of {names}, or an import path 'package.module:Class'")
    name = raw["name"]
    if isinstance(name, str) and name.startswith(registry.FITTED + ":"):  # "fitted:<file>" names the file
        if "file" in raw:
            raise SpecError(f"{where}.file: given twice, in name {name!r} and as file = {raw['file']!r}")
        raw = {**raw, "name": registry.FITTED, "file": name[len(registry.FITTED) + 1:], "label": raw.get("label", name)}
        name = registry.FITTED
    try:
        cls = registry.estimator_class(name)
    except ValueError as err:
        raise SpecError(f"{where}.name: {err}") from None
    default_label = Path(str(raw.get("file", name))).stem if name == registry.FITTED else registry.default_label(name)
    label = raw.get("label", default_label)
    if not isinstance(label, str) or not label:
        raise SpecError(f"{where}.label: {label!r} must be a non-empty string")
    params = registry.estimator_parameters(cls)
    known = list(params)
    out = {"name": name, "label": label}
    for key, value in raw.items():
        if key in ("name", "label"):
            continue
        if key not in known:
            hint = " (replicates and seed are top-level keys)" if key in ("replicates", "seed") else ""
            raise SpecError(f"{where}.{key}: unknown parameter of estimator {name!r}{hint}; its parameters: {', '.join(known)}")
        out[key] = _check_value(f"{where}.{key}", value)
    for key, default in params.items():
        if default is registry.REQUIRED and key not in out:
            raise SpecError(f"{where}.{key}: missing (required by estimator {name!r})")
    return out


# --- expansion --------------------------------------------------------------------------------------------


def _as_param(value: object) -> object:
    """A wrapped list (a list inside an axis, or given where one value is meant) becomes a tuple."""
    return tuple(value) if isinstance(value, list) else value


def _coerce(value: object, default: object) -> object:
    """An int given for a parameter whose default is a float becomes a float (so 1 and 1.0 are one key)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _axes(table: dict, skip: tuple[str, ...]) -> tuple[list[str], list[list]]:
    names = [k for k in table if k not in skip]
    values = [[_as_param(v) for v in table[k]] if isinstance(table[k], list) else [table[k]] for k in names]
    return names, values


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _expand(spec: Spec) -> list[Cell]:
    kind = spec.inputs["kind"]
    in_params = input_parameters(kind)
    in_names, in_values = _axes(spec.inputs, ("kind",))
    in_axes = [n for n in in_names if isinstance(spec.inputs[n], list)]
    cells: list[Cell] = []
    seen: set[str] = set()
    for block in spec.estimators:
        name = block["name"]
        cls = registry.estimator_class(name)
        defaults = registry.estimator_parameters(cls)
        target = None if registry.is_builtin(name) else registry.import_path(cls)
        est_names, est_values = _axes(block, ("name", "label"))
        est_axes = [n for n in est_names if isinstance(block[n], list)]
        for in_combo in itertools.product(*in_values):
            given_inputs = dict(zip(in_names, in_combo))
            inputs = {}
            for pname, p in in_params.items():
                if pname in SUPPLIED or pname == "seed":
                    continue
                default = None if p.default is inspect.Parameter.empty else p.default
                inputs[pname] = _coerce(given_inputs.get(pname, default), default)
            inputs.update({k: v for k, v in given_inputs.items() if k not in inputs and k != "seed"})
            inputs_key = {"kind": kind, **{k: _jsonable(v) for k, v in inputs.items()}}
            if "seed" in given_inputs:
                input_seed = given_inputs["seed"]
            elif "seed" in in_params:
                input_seed = derive_seed(spec.seed, "inputs", inputs_key)
            else:
                input_seed = None
            inputs_key["seed"] = input_seed
            mc_seed = derive_seed(spec.seed, "monte_carlo", inputs_key)
            for est_combo in itertools.product(*est_values):
                given = dict(zip(est_names, est_combo))
                params = {}
                for pname, default in defaults.items():
                    default = None if default is registry.REQUIRED else default
                    params[pname] = _coerce(given.get(pname, default), default)
                key = {
                    "estimator": name, "label": block["label"],
                    "params": {k: _jsonable(v) for k, v in params.items()},
                    "inputs": inputs_key, "replicates": spec.replicates, "seed": spec.seed,
                    "dtype": spec.dtype, "matrix": spec.matrix,
                }
                cell_id = short_hash(key)
                if cell_id in seen:
                    continue
                seen.add(cell_id)
                shown = [f"{a}={given[a]}" for a in est_axes] + [f"{a}={given_inputs[a]}" for a in in_axes]
                cells.append(Cell(
                    cell_id=cell_id, key=key, estimator=name, label=block["label"], params=params, kind=kind,
                    inputs=inputs, input_seed=input_seed, mc_seed=mc_seed, replicates=spec.replicates,
                    dtype=spec.dtype, matrix=spec.matrix,
                    description=" ".join([block["label"], *shown]), error=_construct_error(name, given),
                    target=target,
                ))
    return cells


def _construct_error(name: str, given: dict) -> str | None:
    """Build the estimator once (without the inputs' scale) to catch invalid parameter combinations."""
    try:
        registry.make_estimator(name, **given)
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


# --- TOML rendering (specs built from dicts are saved as TOML next to their results) ----------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def render_toml(spec: dict) -> str:
    """TOML text of a spec dict (top-level scalars, an [inputs] table, [[estimators]] blocks)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in spec.items() if k not in ("inputs", "estimators")]
    lines += ["", "[inputs]"] + [f"{k} = {_toml_value(v)}" for k, v in spec["inputs"].items()]
    for block in spec["estimators"]:
        lines += ["", "[[estimators]]"] + [f"{k} = {_toml_value(v)}" for k, v in block.items()]
    return "\n".join(lines) + "\n"
