"""The ``evalab`` command line.

Each subcommand is one ``add_<name>_command(commands)`` function that adds its subparser and sets
``run=<function(args) -> exit status>`` with ``set_defaults``; ``build_parser`` calls them in ``COMMANDS``
order. Subcommands import their machinery inside ``run``, and the package face is lazy (evalab/__init__.py), so
``evalab --help`` and ``evalab --version`` import neither torch nor pandas (tests/test_lazy.py).

Errors are one line on stderr, ``evalab <command>: error: ...``. Exit status: 0 success, 1 a failure (a failed
cell or figure, an unwritable directory, an unreachable scheduler, any unexpected error), 2 a usage error (bad
arguments or spec), 130 interrupted (Ctrl-C). ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._version import __version__


class UsageError(Exception):
    """Bad arguments: reported in one line with exit status 2."""


def _output_dir(path: str, option: str = "--out") -> Path:
    """``path`` as an output directory: it may not exist yet, but must not be a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {path!r} is a file; expected a directory (existing or to be created)")
    return out


def _check_device(device: str | None) -> None:
    """Refuse a device torch cannot use here (cuda without CUDA, cuda:N past the last GPU, mps without MPS)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r} is not available here (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device!r} is not available here")


# --- evalab sweep -----------------------------------------------------------------------------------------

SWEEP_EPILOG = """\
output directory layout:
  DIR/spec.toml                 the spec of the latest run (DIR/specs/<hash>.toml keeps every one)
  DIR/cells/<cell_id>.parquet   one row per cell, status ok or failed; load with evalab.load_results(DIR)
  DIR/.lock                     held while a sweep runs: a second sweep into DIR exits at once, naming it

Rerunning skips cells already done (status ok) and retries failed ones; editing the grid reuses the cells that
are still in it. With --executor dask the workers compute and return each cell's row and this process writes
the files, so the workers need no access to DIR. Exit status: 0 all cells ok, 1 some cell failed (or DIR in
use, unwritable, the scheduler unreachable), 2 bad spec or arguments, 130 interrupted (rerun to resume).
The spec format: analysis/sweeps/README.md.
"""


def add_sweep_command(commands) -> None:
    p = commands.add_parser(
        "sweep",
        help="run a sweep spec (TOML) into a resumable parquet store",
        description="Expand a TOML sweep spec into cells and run each cell's Monte-Carlo measurement, one "
                    "parquet file per cell in --out.",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC.toml", help="the sweep spec")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; reruns resume in it)")
    p.add_argument("--device", help="torch device to run on (cpu, cuda, cuda:N, mps); overrides the spec's device")
    p.add_argument("--executor", choices=("local", "dask"), default=None,
                   help="local: cells one after another in this process (default); dask: on a Dask cluster "
                        "(default when --scheduler or --workers is given)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    where.add_argument("--workers", type=int, metavar="N",
                       help="start a local Dask cluster of N worker processes on loopback (default: one per core)")
    p.add_argument("--fresh", action="store_true", help="delete the cells already stored in DIR first")
    p.add_argument("--dry-run", action="store_true", help="validate the spec and list its cells, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the summary line is still printed)")
    p.set_defaults(run=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    from .sweep import SpecError, load_spec, run_sweep
    from .sweep.store import DirectoryLocked, statuses

    try:
        spec = load_spec(args.spec)
    except (SpecError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    _output_dir(args.out)
    if args.dry_run:
        cells = spec.cells()
        stored = statuses(args.out)
        for cell in cells:
            state = stored.get(cell.cell_id, "todo")
            note = f"  [invalid: {cell.error}]" if cell.error else ""
            print(f"{cell.cell_id}  {state:<6}  {cell.description}{note}")
        invalid = sum(c.error is not None for c in cells)
        print(f"{spec.name}: {len(cells)} cells, {invalid} invalid, "
              f"{sum(stored.get(c.cell_id) == 'ok' for c in cells)} already done in {args.out}")
        return 0
    dask_options = args.scheduler is not None or args.workers is not None
    executor = args.executor or ("dask" if dask_options else "local")
    try:  # invalid cells are listed with the failures after the run
        summary = run_sweep(spec, args.out, device=args.device, executor=executor, workers=args.workers,
                            scheduler=args.scheduler, fresh=args.fresh, progress=not args.quiet)
    except (SpecError, ValueError, ImportError) as err:
        raise UsageError(str(err)) from None
    except (DirectoryLocked, ConnectionError) as err:
        print(f"evalab sweep: error: {err}", file=sys.stderr)
        return 1
    for description, error in summary.failures[:20]:
        print(f"failed: {description}: {error}", file=sys.stderr)
    if len(summary.failures) > 20:
        print(f"... and {len(summary.failures) - 20} more failed cells (see the error column)", file=sys.stderr)
    print(f"{spec.name}: {summary}")
    return 0 if summary.ok else 1


# --- evalab bench -----------------------------------------------------------------------------------------


def add_bench_command(commands) -> None:
    p = commands.add_parser(
        "bench",
        help="measure the Monte-Carlo engine and the estimators' cost side by side",
        description="Engine vs a per-replicate loop, fraction of matmul FLOP/s, time and peak memory vs seq_len, "
                    "and RFA vs performer-pytorch. Prints a markdown table (each timing with its spread over repeats, "
                    "warnings first when the machine is busy or a timing too noisy); writes bench.json, bench.md, "
                    "bench.png and says where.",
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on a 2-core CPU)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: a new folder under $XDG_CACHE_HOME/evalab/bench, else "
                        "~/.cache/evalab/bench)")
    p.set_defaults(run=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    from .report.bench import markdown, run_bench

    _check_device(args.device)
    if args.out is not None:
        _output_dir(args.out)
    report = run_bench(plan="quick" if args.quick else "full", device=args.device, out=args.out)
    print(markdown(report))
    print(f"\nwrote bench.json, bench.md and bench.png to {report['out']}", file=sys.stderr)
    return 0


# --- evalab reproduce -------------------------------------------------------------------------------------

REPRODUCE_EPILOG = """\
Each figure is a folder analysis/figures/fNN_name/ (spec.toml, spec_quick.toml, plot.py); its sweeps and cached
tables go to results/<quick|full>/<figure>/ (for --out DIR elsewhere: DIR/../results/<quick|full>/) and reruns
resume from them. Writes <out>/<figure>.png, <out>/<figure>.pdf and <out>/README.md (one caption per figure).
The default --out, results/figures, is ignored by git; the committed gallery is refreshed with --out figures.
Timing on an idle 2-core CPU: --quick about 80 s from scratch (F1-F11), the full sizes about 37 minutes (F1-F8 12, F9 7, F10 13, F11 5). A figure that fails does not stop the others;
the exit status is 1 when some figure failed (skipped figures, e.g. without the optional model packages, do
not count), 2 for bad arguments or when the figure definitions are not found.
"""


def add_reproduce_command(commands) -> None:
    p = commands.add_parser(
        "reproduce",
        help="compute and render every paper figure (PNG + PDF + captions)",
        description="Run each figure's sweeps and analysis (resuming), then render it from the stored rows.",
        epilog=REPRODUCE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes: about 80 s on an idle 2-core CPU")
    p.add_argument("--out", default="results/figures", metavar="DIR",
                   help="output folder for the figures (default: results/figures, ignored by git; "
                        "--out figures refreshes the committed gallery)")
    p.add_argument("--device", help="torch device for the Monte-Carlo work (cpu, cuda, cuda:N, mps)")
    p.add_argument("--analysis", metavar="DIR",
                   help="the figure definitions (default: the analysis/figures that ships with evalab)")
    p.add_argument("--work", metavar="DIR", help="where sweeps and tables are stored (default: results/<scale>)")
    p.add_argument("--only", action="append", metavar="NAME", help="run only figures whose name starts with NAME (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress output (the summary is still printed)")
    p.add_argument("--scale", choices=("tiny", "quick", "full"), help=argparse.SUPPRESS)  # tiny: for tests
    p.set_defaults(run=run_reproduce_command)


def run_reproduce_command(args: argparse.Namespace) -> int:
    from .report.reproduce import reproduce

    _output_dir(args.out)
    if args.work is not None:
        _output_dir(args.work, "--work")
    _check_device(args.device)
    try:
        summary = reproduce(args.out, quick=args.quick, device=args.device, work=args.work, progress=not args.quiet,
                            analysis=args.analysis, only=args.only, scale=args.scale)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    print(summary)
    for result in summary.figures:
        if result.status == "skipped":
            print(f"skipped {result.name}: {result.message}", file=sys.stderr)
    for result in summary.failed:
        print(f"failed {result.name}:\n{result.message}", file=sys.stderr)
    return 0 if summary.ok else 1


# --- evalab notebooks -------------------------------------------------------------------------------------


def add_notebooks_command(commands) -> None:
    p = commands.add_parser(
        "notebooks",
        help="copy the example notebooks into a folder, to open in Jupyter",
        description="Copy the notebooks that ship with evalab (and their README.md) into DIR. Each notebook is "
                    "self-contained: it writes what it makes into a temporary folder.",
    )
    p.add_argument("dir", metavar="DIR", help="destination folder (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite notebooks already in DIR")
    p.set_defaults(run=run_notebooks_command)


def run_notebooks_command(args: argparse.Namespace) -> int:
    import shutil

    from ._shipped import shipped

    out = _output_dir(args.dir, "DIR")
    source = shipped("notebooks")
    files = sorted(source.glob("*.ipynb")) + [source / "README.md"]
    clash = [f.name for f in files if (out / f.name).exists()]
    if clash and not args.force:
        raise UsageError(f"DIR {args.dir!r} already holds {', '.join(clash)}; pass --force to overwrite them")
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, out / f.name)
    print(f"copied {len(files) - 1} notebooks and README.md to {out}; open them with: jupyter lab {out}")
    return 0


# --- evalab check -----------------------------------------------------------------------------------------


def add_check_command(commands) -> None:
    p = commands.add_parser(
        "check", help="check that an estimator follows evalab's estimator protocol",
        description="Run evalab.testing.check_estimator, property by property, on instances of an estimator class: "
                    "the class's check instances, or the one built from --param values. Exit status 1 when a property "
                    "fails.",
    )
    p.add_argument("estimator", metavar="NAME", help="a registered name, an evalab.estimators entry point or an "
                                                     "import path package.module:Class")
    p.add_argument("--param", metavar="KEY=VALUE", action="append", default=[],
                   help="a constructor parameter (a TOML value: 8, 1.5, true, \"iid\"); repeatable")
    p.add_argument("--seq-len", type=int, default=32, metavar="N", help="queries and keys of the test inputs (default 32)")
    p.set_defaults(run=run_check_command)


def _param(text: str) -> tuple[str, object]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, as a package (a dependency there)
        import tomli as tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--param {text!r}: expected KEY=VALUE")
    try:
        return key.strip(), tomllib.loads(f"x = {value.strip()}")["x"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value.strip()  # a bare word: a string


def run_check_command(args: argparse.Namespace) -> int:
    from .estimators import registry
    from .testing import CHECKS, check_instances, check_property

    if args.seq_len < 2:
        raise UsageError(f"--seq-len {args.seq_len}: expected an integer >= 2")
    params = dict(_param(text) for text in args.param)
    try:
        cls = registry.estimator_class(args.estimator)
        instances = [registry.make_estimator(args.estimator, **params)] if params else check_instances(cls)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    failed = 0
    for est in instances:
        failures = []
        for prop in CHECKS:
            try:
                check_property(est, prop, seq_len=args.seq_len)
            except AssertionError as err:
                failures.append(str(err))
        failed += bool(failures)
        print(f"{'FAILED' if failures else 'ok':<6}  {est!r}: {len(CHECKS) - len(failures)} of {len(CHECKS)} properties")
        for message in failures:
            print(f"        {message}")
    print(f"{args.estimator}: {len(instances) - failed} of {len(instances)} instances pass check_estimator")
    return 1 if failed else 0


# --- the parser -------------------------------------------------------------------------------------------

COMMANDS = (add_sweep_command, add_bench_command, add_reproduce_command, add_notebooks_command, add_check_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evalab",
        description="Measure how well efficient attention (RFA, Performer, EVA) approximates softmax attention.",
    )
    parser.add_argument("--version", action="version", version=f"evalab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    parser.set_defaults(command_names=tuple(commands.choices))
    for sub in commands.choices.values():  # also accepted after the command: evalab sweep ... --debug
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse itself exits with 2 on unknown options)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # usage and a one-line error on stderr, exit status 2
        parser.error(f"a command is required ({', '.join(args.command_names)}); evalab --help describes them")
    prog = f"evalab {args.command}"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        resume = "; rerun the same command to resume" if args.command in ("sweep", "reproduce") else ""
        print(f"\n{prog}: interrupted{resume}", file=sys.stderr)
        return 130
    except UsageError as err:
        if args.debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 -- one line for the user, the traceback with --debug
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(err)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    """The error on one line: for an OSError its reason and path (a temporary file's folder), else type and message."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        path = Path(err.filename)
        return f"{err.strerror}: {str(path.parent if path.name.endswith('.tmp') else path)!r}"
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
