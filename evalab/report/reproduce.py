"""``evalab reproduce``: compute and render every paper figure of analysis/figures/.

Each figure is a folder ``analysis/figures/fNN_name/`` holding

- ``spec.toml`` (full size) and ``spec_quick.toml`` (the ``--quick`` size): its sweep, optional. The sweep runs
  through :func:`evalab.run_sweep` into ``<work>/<figure>/sweep`` and resumes there; its ok rows become
  ``frames["sweep"]``.
- ``plot.py`` with ``plot(frames: dict[str, DataFrame]) -> matplotlib Figure``, ``TITLE``,
  ``caption(frames) -> str``, ``REQUIRED`` (table name -> the columns plot needs), and optionally
  ``compute(ctx: FigureContext, frames) -> dict[str, DataFrame]``: the analysis step for tables that are not
  one sweep (theory predictions, attributions, real-model inputs, generated sweeps). Non-Monte-Carlo tables go through :meth:`FigureContext.table`, which caches them as
  parquet in ``<work>/<figure>/tables`` keyed by their parameters.

The flow is one-way: sweep and compute write stored rows, ``plot`` only reads them. Sizes:
``full`` (default), ``quick`` (``--quick``) and ``tiny`` (for tests: the quick
spec shrunk by :func:`shrink_spec`, and each figure's own tiny sizes in compute).

    from evalab.reproduce import reproduce
    summary = reproduce(quick=True)      # results/figures/*.png, *.pdf, README.md; stored rows in results/quick/

By default the renders go to ``results/figures`` (ignored by git, so running the README leaves the checkout
clean); the committed gallery in ``figures/`` is refreshed on purpose with ``--out figures``. Nothing
run-specific (times, dates, hosts) is written into README.md, and the PNG/PDF carry no timestamps: the same
results on the same machine render to the same bytes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pandas as pd

from .._version import __version__
from .._files import atomic_write
from .._shipped import repository_root, shipped
from ..sweep import Spec, load_results, load_spec, parse_spec, run_sweep
from ..sweep.runner import build_inputs
from ..measure.theory import rfa_prediction  # noqa: F401 -- still importable from here
from ..sweep.spec import short_hash

__all__ = [
    "reproduce", "ReproduceSummary", "FigureResult", "FigureContext", "FigureSkipped", "FigureError",
    "find_analysis", "discover", "select", "load_module", "compute_frames", "figure_frames", "shrink_spec",
    "rfa_prediction", "SCALES",
]

SCALES = ("tiny", "quick", "full")
FIGURE_FOLDER = re.compile(r"^f\d\d_[A-Za-z0-9_]+$")
TABLE_FORMAT = 1  # bump to invalidate every cached table
TINY_REPLICATES = 8
TINY_AXIS = 2
TINY_CAPS = {"seq_len": 64, "d": 16, "texts": 4}  # tiny runs cap these input sizes


class FigureSkipped(Exception):
    """Raised by a figure's compute() when it cannot run here for a benign reason (an optional package is
    missing); the figure is reported as skipped, not failed."""


class FigureError(RuntimeError):
    """A figure's computation failed (e.g. sweep cells failed)."""


# --- locating the figures ---------------------------------------------------------------------------------


def find_analysis(analysis: str | os.PathLike | None = None) -> Path:
    """The folder holding the figure folders (fNN_name/).

    ``analysis`` may name that folder or its parent (``analysis/``); by default the ``analysis/figures`` that
    ships with evalab (inside the installed package, or at the top of a source checkout). Raises
    FileNotFoundError with a hint when it is not there.
    """
    candidates = []
    if analysis is None:
        candidates.append(shipped("analysis") / "figures")
        hint = "pass --analysis DIR to point at an analysis/figures folder"
    else:
        base = Path(analysis).expanduser()
        candidates += [base, base / "figures"]
        hint = "--analysis must name analysis/figures (or analysis/) of an evalab source checkout"
    for folder in candidates:
        if folder.is_dir() and any(_is_figure(p) for p in folder.iterdir()):
            return folder.resolve()
    looked = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no figure folders (fNN_name/ with a plot.py) found in {looked}; {hint}")


def _is_figure(path: Path) -> bool:
    return path.is_dir() and bool(FIGURE_FOLDER.match(path.name)) and (path / "plot.py").is_file()


def discover(analysis: str | os.PathLike | None = None) -> list[Path]:
    """The figure folders, sorted by name."""
    folder = find_analysis(analysis)
    return sorted(p for p in folder.iterdir() if _is_figure(p))


def select(folders: list[Path], only: Iterable[str] | None) -> list[Path]:
    """The folders whose name equals or starts with one of ``only`` (e.g. "f03" or "f03_bias_variance")."""
    if not only:
        return folders
    only = [o.strip() for item in only for o in str(item).split(",") if o.strip()]
    chosen = [f for f in folders if any(f.name.startswith(o) for o in only)]
    unknown = [o for o in only if not any(f.name.startswith(o) for f in folders)]
    if unknown:
        names = ", ".join(f.name for f in folders)
        raise ValueError(f"no figure matches {', '.join(map(repr, unknown))}; figures: {names}")
    return chosen


def load_module(folder: Path) -> ModuleType:
    """Import ``folder/plot.py`` as a module named ``evalab_figure_<folder name>``."""
    name = f"evalab_figure_{folder.name}"
    spec = importlib.util.spec_from_file_location(name, folder / "plot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    for attr in ("plot", "TITLE", "caption", "REQUIRED"):
        if not hasattr(module, attr):
            raise AttributeError(f"{folder / 'plot.py'} must define {attr}")
    return module


# --- specs per scale --------------------------------------------------------------------------------------


def _thin(values: list) -> list:
    """First and last of a numeric axis; categorical axes (strings) are kept whole, so every variant runs."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if len(values) <= TINY_AXIS or not numeric:
        return values
    return [values[0], values[-1]]


def _cap(value, cap):
    return min(value, cap) if isinstance(value, int) and not isinstance(value, bool) else value


def shrink_spec(spec: Spec, replicates: int = TINY_REPLICATES) -> Spec:
    """The tiny version of a spec: at most ``replicates`` replicates, at most 2 values (first and last) per
    numeric grid axis, seq_len at most 64, d at most 16 and texts at most 4, so that every code path of a figure still runs in seconds."""
    raw = spec.to_dict()
    raw["replicates"] = min(raw["replicates"], replicates)
    for table in [raw["inputs"], *raw["estimators"]]:
        for key, value in list(table.items()):
            if isinstance(value, list):
                value = _thin(value)
            if table is raw["inputs"] and key in TINY_CAPS:
                cap = TINY_CAPS[key]
                value = list(dict.fromkeys(_cap(v, cap) for v in value)) if isinstance(value, list) else _cap(value, cap)
            table[key] = value
    return parse_spec(raw)


# --- the context a figure computes in ---------------------------------------------------------------------


@dataclass
class FigureContext:
    """What a figure's ``compute(ctx, frames)`` works with.

    name: the figure folder's name; folder: its path; scale: "tiny" | "quick" | "full"; device: torch device
    for Monte-Carlo work (None: the spec's, i.e. cpu); work: this figure's results folder; log: prints a
    progress line when progress is on.
    """

    name: str
    folder: Path
    scale: str
    device: str | None
    work: Path
    progress: bool = True
    _specs: dict = field(default_factory=dict, repr=False)

    def log(self, message: str) -> None:
        if self.progress:
            print(f"[{self.name}] {message}", file=sys.stderr, flush=True)

    @property
    def torch_device(self) -> str:
        return self.device or "cpu"

    def pick(self, *, quick, full, tiny=None):
        """The value for this run's scale (tiny falls back to quick)."""
        return {"full": full, "quick": quick, "tiny": quick if tiny is None else tiny}[self.scale]

    def spec_path(self, stem: str = "spec") -> Path | None:
        """``<stem>.toml`` for the full scale, ``<stem>_quick.toml`` (else ``<stem>.toml``) for quick and tiny."""
        names = [f"{stem}.toml"] if self.scale == "full" else [f"{stem}_quick.toml", f"{stem}.toml"]
        for n in names:
            if (self.folder / n).is_file():
                return self.folder / n
        return None

    def spec(self, stem: str = "spec") -> Spec:
        """The figure's sweep spec for this scale (shrunk for tiny)."""
        if stem not in self._specs:
            path = self.spec_path(stem)
            if path is None:
                raise FileNotFoundError(f"{self.folder} has no {stem}.toml")
            spec = load_spec(path)
            self._specs[stem] = shrink_spec(spec) if self.scale == "tiny" else spec
        return self._specs[stem]

    def sweep(self, spec: Spec | dict | None = None, name: str = "sweep") -> pd.DataFrame:
        """Run (or resume) a sweep into ``<work>/<name>`` and return its ok rows, in spec order.

        ``spec``: a Spec or spec dict (default: :meth:`spec`). A failed cell makes the figure fail (FigureError),
        after the other cells have run and been stored.
        """
        spec = self.spec() if spec is None else spec
        spec = parse_spec(spec) if isinstance(spec, dict) else spec
        out = self.work / name
        cells = len(spec.cells())
        self.log(f"sweep {spec.name!r}: {cells} cells -> {out}")
        summary = run_sweep(spec, out, device=self.device, progress=self.progress)
        if summary.failed:
            first = "; ".join(f"{d}: {e}" for d, e in summary.failures[:3])
            raise FigureError(f"sweep {spec.name!r}: {summary.failed} of {summary.total} cells failed ({first})")
        self.log(f"sweep {spec.name!r}: {summary.done} computed, {summary.skipped} reused, {summary.wall_seconds:.1f} s")
        return load_results(out, status="ok", spec=spec)

    def table(self, name: str, compute: Callable[..., pd.DataFrame], **params) -> pd.DataFrame:
        """``compute(**params)``, cached as ``<work>/tables/<name>-<hash>.parquet`` (the hash covers the figure,
        the table name, ``params`` and TABLE_FORMAT; params must be JSON-able). Returns the DataFrame."""
        key = {"figure": self.name, "table": name, "params": params, "format": TABLE_FORMAT}
        path = self.work / "tables" / f"{name}-{short_hash(key, 12)}.parquet"
        if path.is_file():
            try:
                return pd.read_parquet(path)
            except Exception:  # partial or foreign file: recompute
                pass
        start = time.perf_counter()
        frame = compute(**params)
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"table {name!r}: compute returned {type(frame).__name__}, expected a DataFrame")
        atomic_write(path, lambda handle: frame.to_parquet(handle, index=False))
        self.log(f"table {name!r}: {len(frame)} rows in {time.perf_counter() - start:.1f} s")
        return frame

    def inputs(self, spec: Spec | None = None, *, dtype=None) -> list[tuple[dict, object]]:
        """The distinct input workloads of a sweep spec, as (inputs parameters with ``input_seed``, QKV).

        Built exactly as the sweep builds them (same generator, parameters and seed), in float64 by default,
        on this context's device.
        """
        import torch

        spec = self.spec() if spec is None else spec
        seen, out = set(), []
        for cell in spec.cells():
            if cell.inputs_id in seen:
                continue
            seen.add(cell.inputs_id)
            qkv = build_inputs(cell, self.torch_device, dtype or torch.float64)
            out.append(({**cell.inputs, "input_seed": cell.input_seed}, qkv))
        return out


# --- running ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureResult:
    """The outcome of one figure: status "ok" | "failed" | "skipped", its files, caption and time."""

    name: str
    status: str
    title: str = ""
    files: tuple = ()
    caption: str = ""
    message: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class ReproduceSummary:
    """What ``reproduce`` did: one FigureResult per figure, where it wrote, and how long it took."""

    figures: tuple
    out: Path
    work: Path
    scale: str
    wall_seconds: float

    @property
    def failed(self) -> list[FigureResult]:
        return [f for f in self.figures if f.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        lines = [f"{len(self.figures)} figures ({self.scale}) in {self.wall_seconds:.0f} s -> {self.out}"]
        for f in self.figures:
            extra = f" ({f.message.splitlines()[0] if f.message else ''})" if f.status != "ok" else ""
            lines.append(f"  {f.status:<7} {f.name:<32} {f.seconds:6.1f} s{extra}")
        return "\n".join(lines)


def compute_frames(ctx: FigureContext, module: ModuleType | None = None) -> dict[str, pd.DataFrame]:
    """The tables a figure is drawn from: its sweep's ok rows (``"sweep"``, when it has a spec) and whatever its
    ``compute(ctx, frames)`` returns. Resumes: stored cells and cached tables are reused."""
    module = load_module(ctx.folder) if module is None else module
    frames: dict[str, pd.DataFrame] = {}
    if ctx.spec_path() is not None:
        frames["sweep"] = ctx.sweep()
    if hasattr(module, "compute"):
        frames.update(module.compute(ctx, dict(frames)) or {})
    return frames


def figure_frames(name: str, *, quick: bool = False, scale: str | None = None, work=None, out="figures",
                  device: str | None = None, analysis=None, progress: bool = False) -> dict[str, pd.DataFrame]:
    """The tables of one figure (by name or prefix), computed or loaded from its stored results, for drawing it
    again interactively: ``plot = load_module(folder).plot; plot(figure_frames("f03", quick=True))``."""
    scale = scale or ("quick" if quick else "full")
    folders = select(discover(analysis), [name])
    if len(folders) != 1:
        raise ValueError(f"{name!r} matches {len(folders)} figures: {', '.join(f.name for f in folders)}")
    folder = folders[0]
    out = Path(out).expanduser().resolve()
    work = default_work(out, scale) if work is None else Path(work).expanduser().resolve()
    ctx = FigureContext(folder.name, folder, scale, device, work / folder.name, progress)
    return compute_frames(ctx)


def _run_figure(folder: Path, ctx: FigureContext, out: Path) -> FigureResult:
    import matplotlib.pyplot as plt

    from . import figures

    start = time.perf_counter()
    title = folder.name
    try:
        module = load_module(folder)
        title = module.TITLE
        frames = compute_frames(ctx, module)
        with figures.style():
            fig = module.plot(frames)
            try:
                files = figures.save(fig, out, folder.name)
            finally:
                plt.close(fig)
        caption = module.caption(frames)
        return FigureResult(folder.name, "ok", title, tuple(files), caption, "", time.perf_counter() - start)
    except FigureSkipped as skip:
        return FigureResult(folder.name, "skipped", title, (), "", str(skip), time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 -- one figure's failure must not stop the others
        detail = "".join(traceback.format_exception(type(err), err, err.__traceback__)[-6:])
        return FigureResult(folder.name, "failed", title, (), "", f"{type(err).__name__}: {err}\n{detail}",
                            time.perf_counter() - start)


def _command(scale: str, name: str | None = None, out: Path | None = None) -> str:
    """The command that renders ``out`` (``--out figures`` for the checkout's gallery of record)."""
    flag = {"quick": " --quick", "full": "", "tiny": " --scale tiny"}[scale]
    if out is not None and out == repository_root() / "figures":
        flag += " --out figures"
    return f"evalab reproduce{flag}" + (f" --only {name}" if name else "")


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)


RECORD = "figure.json"


def _record(result: FigureResult, work: Path) -> None:
    """Keep a figure's outcome (title, caption, files, time) next to its results, for README.md."""
    path = work / result.name / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"name": result.name, "status": result.status, "title": result.title, "caption": result.caption,
            "message": result.message, "seconds": result.seconds, "files": [Path(f).name for f in result.files]}
    path.write_text(json.dumps(data, indent=1))


def write_readme(out: Path, work: Path, scale: str, analysis: Path, folders: list[Path]) -> Path:
    """``<out>/README.md``: one section per figure (caption, files, the command that regenerates it alone),
    from the records that each figure's last run left in ``<work>/<figure>/figure.json``."""
    import torch

    records = []
    for folder in folders:
        path = work / folder.name / RECORD
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            records.append({"name": folder.name, "status": "not run", "title": folder.name, "caption": "",
                            "message": "not run yet", "seconds": 0.0, "files": []})
    lines = [
        "# Figures",
        "",
        f"Rendered by `{_command(scale, out=out)}` (evalab {__version__}, torch {torch.__version__}). Each figure is "
        f"defined by one folder of `{_relative(analysis, out)}/` (its sweep spec and `plot.py`); the stored "
        f"results it is drawn from are in `{_relative(work, out)}/<figure>/` (not committed; reruns resume "
        "from them, delete that folder to recompute).",
        "",
        "Intervals are 95%: jackknife over 20 replicate groups for the summed metrics (mse, variance, bias2 "
        "and their relative versions), a Student-t interval for the mean of per-replicate values "
        "(rel_error) and an order-statistic interval for quantiles (rel_error_median, rel_error_p90).",
        "",
    ]
    for r in records:
        lines += [f"## {r['name']}: {r['title']}", ""]
        if r["status"] == "ok" and len(r["files"]) == 2:
            png, pdf = r["files"]
            lines += [f"![{r['title']}]({png})", "", f"Files: [`{png}`]({png}), [`{pdf}`]({pdf}).", "",
                      r["caption"].strip(), ""]
        elif r["status"] == "skipped":
            lines += [f"Skipped: {r['message']}", ""]
        else:
            first = (r["message"] or "").splitlines()[0] if r["message"] else ""
            lines += [f"{r['status'].capitalize()}: `{first}`", ""]
        lines += [f"Regenerate alone: `{_command(scale, r['name'], out)}`", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


DEFAULT_OUT = "results/figures"


def default_work(out: Path, scale: str) -> Path:
    """Where the sweeps and tables of ``out``'s figures are stored: ``<out>/../results/<scale>``, or
    ``<out>/../<scale>`` when ``out`` already lies in a ``results`` folder (the default ``results/figures``)."""
    parent = out.parent
    return (parent if parent.name == "results" else parent / "results") / scale


def reproduce(
    out: str | os.PathLike = DEFAULT_OUT,
    *,
    quick: bool = False,
    device: str | None = None,
    work: str | os.PathLike | None = None,
    progress: bool = True,
    analysis: str | os.PathLike | None = None,
    only: Iterable[str] | None = None,
    scale: str | None = None,
) -> ReproduceSummary:
    """Compute (resuming) and render every figure of analysis/figures into ``out`` (PNG + PDF + README.md).

    out: default ``results/figures`` (ignored by git). quick: the ``--quick`` sizes; otherwise the full sizes.
    ``scale`` ("tiny", "quick", "full") overrides ``quick``; "tiny" is for tests. device: torch device for the Monte-Carlo work.
    work: where sweeps and cached tables are stored, default :func:`default_work`. analysis: the
    figures folder (default: analysis/figures of the source checkout). only: figure names or prefixes.
    A figure that fails is reported in the summary (status "failed") and the others still run.
    """
    scale = scale or ("quick" if quick else "full")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not supported; expected one of {', '.join(map(repr, SCALES))}")
    if device is not None:
        from ..sweep.spec import check_device

        device = check_device(device, "device")
    analysis_dir = find_analysis(analysis)
    every = discover(analysis_dir)
    folders = select(every, only)
    out = Path(out).expanduser().resolve()
    work = default_work(out, scale) if work is None else Path(work).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    for folder in folders:
        ctx = FigureContext(folder.name, folder, scale, device, work / folder.name, progress)
        ctx.log("start")
        result = _run_figure(folder, ctx, out)
        note = f": {result.message.splitlines()[0]}" if result.message else ""
        ctx.log(f"{result.status} in {result.seconds:.1f} s{note}")
        results.append(result)
        _record(result, work)
    write_readme(out, work, scale, analysis_dir, every)
    return ReproduceSummary(tuple(results), out, work, scale, time.perf_counter() - start)

