"""Run a sweep: every cell not yet done, locally or on a Dask cluster, one parquet file per cell.

Who writes the store: always the process that called ``run_sweep``. Dask workers compute a cell and return
its one-row DataFrame; the client writes the file, so workers need no shared filesystem with the client.
A cell that raises is recorded as a failed row (``status="failed"``, ``error``) and the sweep goes on;
a rerun skips cells whose stored status is "ok" and retries the rest.

What a cell measures comes from the measurement table ``MEASUREMENTS``, chosen by the spec's ``[inputs] kind``:
- "monte_carlo": kinds that build q, k, v (``evalab.inputs.kinds.INPUTS``: gaussian, minilm, ...): Monte Carlo of
  the cell's estimator on them (evalab.measure.monte_carlo);
- "model_gap": kinds that name a pretrained model and its texts (``evalab.inputs.kinds.MODEL_RUNS``: model): the
  model run end to end with the estimator in place of its attention (evalab.measure.model_gap).
A measurement is the kinds it serves and a row function ``(cell, options) -> dict`` of the cell's result
columns; a new one (fitting, say) is one more entry, and the walk over cells never asks what an input is.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .. import _checks
from .._version import __version__
from ..estimators import registry
from ..inputs import kinds
from ..inputs.synthetic import gaussian_bytes
from ..measure.monte_carlo import monte_carlo, plan_batches
from . import store
from .spec import Cell, Spec, SpecError, check_device, input_parameters, load_spec, parse_spec

EXECUTORS = ("local", "dask")
SIZE_COLUMNS = ("seq_len", "key_len", "d", "dv", "batch")
DASK_MISSING = 'the dask executor needs dask.distributed; install it with: pip install "evalab[dask]"'
NON_TTY_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal
SCHEDULER_TIMEOUT = 5.0  # seconds to reach a Dask scheduler before giving up


@dataclass(frozen=True)
class SweepSummary:
    """What one ``run_sweep`` call did: cells computed (done), already complete (skipped), failed."""

    done: int
    skipped: int
    wall_seconds: float
    out: Path
    failures: tuple = ()  # (description, error) of each failed cell

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def total(self) -> int:
        return self.done + self.skipped + self.failed

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def __str__(self) -> str:
        return (f"{self.total} cells: {self.done} done, {self.skipped} skipped (already complete), "
                f"{self.failed} failed in {self.wall_seconds:.1f} s -> {self.out}")


@dataclass(frozen=True)
class RunOptions:
    """Everything a worker needs besides the cell (picklable)."""

    device: str
    max_memory: float | None
    spec_name: str
    spec_hash: str
    threads: int | None = None  # torch intra-op threads to set in the worker (None: leave as is)


# --- what a cell measures: the measurement table ---------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """One entry of the table: ``kinds()`` the [inputs] kinds it serves, ``row(cell, options)`` the result columns
    of one cell (``options``: the sweep's RunOptions)."""

    name: str
    kinds: Callable[[], Mapping]
    row: Callable


_INPUT_CACHE: dict = {}  # the last input workload built in this process: (key, QKV)


def build_inputs(cell: Cell, device, dtype: torch.dtype, max_memory: float | None = None):
    """The cell's input workload (QKV) as every sweep builds it: its parameters and input seed, then cast;
    ``max_memory`` goes to input kinds that take one."""
    params = dict(cell.inputs)
    if cell.input_seed is not None:
        params["seed"] = cell.input_seed
    if max_memory is not None and "max_memory" in input_parameters(cell.kind):
        params["max_memory"] = max_memory
    return kinds.make_inputs(cell.kind, **params).to(device=device, dtype=dtype)


#: Peak bytes of building an input kind's workload from a cell's inputs (kinds whose sizes a spec gives).
INPUT_BYTES = {"gaussian": lambda inputs, itemsize: gaussian_bytes(
    seq_len=inputs["seq_len"], d=inputs["d"], dv=inputs.get("dv"), batch=tuple(inputs.get("batch") or ()),
    key_len=inputs.get("key_len"), itemsize=itemsize)}


def check_memory(cells: list[Cell], max_memory: float | None, device: str = "cpu") -> None:
    """Refuse, before any input is built, a sweep with a cell whose inputs and Monte-Carlo run (one replicate
    per batch) cannot fit in ``max_memory`` bytes (the spec's max_memory_gb; default 2 GiB): a SpecError naming
    the cell, the size and max_memory_gb. Cells of input kinds without a size model are not checked."""
    budget = _checks.DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    limit = f"max_memory_gb={budget / 2**30:.3g}" + (" (the default)" if max_memory is None else "")
    for cell in cells:
        sizes = INPUT_BYTES.get(cell.kind)
        if sizes is None or cell.error is not None:
            continue
        itemsize = 8 if cell.dtype == "float64" else 4
        inputs, params = cell.inputs, dict(cell.params)
        if params.get("scale", 0) is None:
            params["scale"] = 1.0  # the inputs' scale: no bearing on memory
        try:
            estimator = build_estimator(cell, **params)
        except Exception:  # noqa: BLE001 -- the cell itself records why it cannot be built
            continue
        N, d = inputs["seq_len"], inputs["d"]
        M, dv, batch = inputs.get("key_len") or N, inputs.get("dv") or d, math.prod(inputs.get("batch") or ())
        try:
            peak = sizes(inputs, itemsize)
            if peak > budget:
                raise MemoryError(f"its inputs need about {peak / 2**30:.3g} GiB, over {limit}; lower seq_len, "
                                  "key_len, d, dv or batch, or raise max_memory_gb")
            plan_batches(estimator, N=N, M=M, d=d, dv=dv, batch=batch, itemsize=itemsize, replicates=cell.replicates,
                         max_memory=budget, matrix=cell.matrix, device=device.split(":")[0],
                         held=batch * (N * d + M * d + M * dv) * itemsize, option="max_memory_gb")
        except MemoryError as err:
            raise SpecError(f"cell {cell.description!r} (seq_len={inputs.get('seq_len')}, d={inputs.get('d')}): {err}") from None


def _cached_inputs(cell: Cell, device: str, max_memory: float | None = None):
    """``build_inputs`` in the cell's dtype, reused by the next cell on the same inputs."""
    key = (cell.inputs_id, cell.dtype, device)
    if key in _INPUT_CACHE:
        return _INPUT_CACHE[key]
    qkv = build_inputs(cell, device, getattr(torch, cell.dtype), max_memory)
    _INPUT_CACHE.clear()
    _INPUT_CACHE[key] = qkv
    return qkv


def build_estimator(cell, **params):
    """The cell's estimator with ``params``, built by its spec name where registered in this process, else by the
    import path the cell carries (a Dask worker knows only the built-ins and what it can import)."""
    name = cell.estimator if cell.target is None or cell.estimator in registry.ESTIMATORS else cell.target
    return registry.make_estimator(name, **params)


def monte_carlo_row(cell, options) -> dict:
    """Monte Carlo of the cell's estimator on its q, k, v (a ``scale`` left None takes the inputs' scale)."""
    qkv = _cached_inputs(cell, options.device, options.max_memory)
    params = dict(cell.params)
    if "scale" in params and params["scale"] is None:
        params["scale"] = qkv.scale
    est = build_estimator(cell, **params)
    res = monte_carlo(est, qkv.q, qkv.k, qkv.v, replicates=cell.replicates, seed=cell.mc_seed,
                      max_memory=options.max_memory, matrix=cell.matrix)
    row = {**res.to_frame().iloc[0].to_dict(), "estimator": cell.estimator, "input_scale": qkv.scale}
    if callable(getattr(est, "split", None)):  # a fitted estimator: were these inputs among those it was fitted on?
        row["split"] = est.split(qkv)
    return row


def model_gap_row(cell, options) -> dict:
    """The model run end to end with the cell's estimator in place of its attention (evalab.measure.model_gap)."""
    from ..measure.model_gap import sweep_row

    return sweep_row(build_estimator(cell, **cell.params), cell)


MEASUREMENTS = {
    "monte_carlo": Measurement("monte_carlo", lambda: kinds.INPUTS, monte_carlo_row),
    "model_gap": Measurement("model_gap", lambda: kinds.MODEL_RUNS, model_gap_row),
}


def measurement(kind: str) -> Measurement:
    """The measurement that cells of inputs ``kind`` get (the first entry of ``MEASUREMENTS`` serving it)."""
    for m in MEASUREMENTS.values():
        if kind in m.kinds():
            return m
    raise ValueError(f"inputs kind {kind!r} has no measurement; expected one of {', '.join(map(repr, kinds.names()))}")



# --- one cell ---------------------------------------------------------------------------------------------

def _reserved_names() -> set[str]:
    names = {"estimator", "label", "inputs", "replicates", "seed", "scale", "status", "error", "cell_id"}
    for cls in registry.ESTIMATORS.values():
        names.update(registry.estimator_parameters(cls))
    return names


def _input_columns(cell: Cell) -> dict:
    """Every input parameter as a column; names that mean something else in a row get an ``input_`` prefix."""
    reserved = _reserved_names() | set(cell.params)
    columns = {"inputs": cell.kind}
    for name, value in cell.inputs.items():
        if name in SIZE_COLUMNS:  # same idea as the Monte-Carlo sizes, which replace them in ok rows
            columns[name] = math.prod(value) if isinstance(value, (tuple, list)) else value
        else:
            columns[f"input_{name}" if name in reserved else name] = list(value) if isinstance(value, tuple) else value
    columns["input_seed"] = cell.input_seed
    return columns


def run_cell(cell: Cell, options: RunOptions) -> pd.DataFrame:
    """Compute one cell; never raises for a failing cell: returns its row with status "failed" instead."""
    if options.threads is not None and torch.get_num_threads() != options.threads:
        torch.set_num_threads(options.threads)
    start = time.perf_counter()
    row = {"estimator": cell.estimator, "label": cell.label, **cell.params, **_input_columns(cell)}
    row.update(replicates=cell.replicates, seed=cell.mc_seed)
    status, error = "ok", cell.error
    if error is None:
        try:
            row.update(measurement(cell.kind).row(cell, options))
        except Exception as err:  # noqa: BLE001 -- failure isolation: record and go on
            error = f"{type(err).__name__}: {err}"
    if error is not None:
        status = "failed"
    row.update(
        dtype=cell.dtype, device=options.device, status=status, error=error, cell_id=cell.cell_id,
        spec_name=options.spec_name, spec_hash=options.spec_hash, evalab_version=__version__,
        torch_version=torch.__version__, host=socket.gethostname(),
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=time.perf_counter() - start,
    )
    return pd.DataFrame([row])


# --- progress ---------------------------------------------------------------------------------------------


class _Lines:
    """Progress for non-terminals (logs, CI): one line at most every NON_TTY_INTERVAL seconds, and at the end."""

    def __init__(self, total: int, desc: str, file):
        self.total, self.desc, self.file = total, desc, file
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= NON_TTY_INTERVAL or self.n == self.total:
            self.last = now
            elapsed = now - self.start
            eta = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
            print(f"{self.desc}: {self.n}/{self.total} cells, {elapsed:.0f} s elapsed, eta {eta:.0f} s  {self.postfix}",
                  file=self.file, flush=True)

    def close(self) -> None:
        pass


class _Silent:
    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _in_jupyter_kernel() -> bool:
    """True inside a running Jupyter kernel (not merely when ipykernel has been imported)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _progress(enabled: bool, total: int, desc: str):
    if not enabled or total == 0:
        return _Silent()
    if _in_jupyter_kernel():
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit="cell")
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="cell", file=sys.stderr, dynamic_ncols=True)
    return _Lines(total, desc, sys.stderr)


# --- executors --------------------------------------------------------------------------------------------


def _run_local(cells: list[Cell], options: RunOptions, bar):
    for cell in cells:
        bar.set_postfix_str(cell.description)
        yield cell, run_cell(cell, options)


def _run_dask(cells: list[Cell], options: RunOptions, bar, *, workers: int | None, scheduler: str | None):
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as err:
        raise ImportError(DASK_MISSING) from err
    import logging

    cluster = None
    if scheduler is None:
        cores = os.cpu_count() or 1
        workers = workers or cores
        options = dataclasses.replace(options, threads=max(1, cores // workers))
        # the worker processes ignore Ctrl-C (they inherit SIG_IGN): this process stops them cleanly instead
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, silence_logs=logging.CRITICAL,  # failures come back as rows
            )
        finally:
            signal.signal(signal.SIGINT, handler)
        client = Client(cluster)
    else:
        try:
            _probe(scheduler)
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except OSError as err:
            raise ConnectionError(f"cannot reach the Dask scheduler at {scheduler} ({err}); is it running, and is "
                                  "the address right?") from None
    try:
        if scheduler is not None:
            _check_workers_import(client, cells, scheduler)
        by_key = {}
        futures = []
        token = uuid.uuid4().hex[:8]
        for cell in cells:
            future = client.submit(run_cell, cell, options, key=f"evalab-cell-{cell.cell_id}-{token}", pure=False)
            by_key[future.key] = cell
            futures.append(future)
        for future in as_completed(futures):
            cell = by_key[future.key]
            try:
                frame = future.result()
            except Exception as err:  # the worker died or the task could not run: record, go on
                frame = _failed_frame(cell, options, f"{type(err).__name__}: {err}")
            future.release()
            bar.set_postfix_str(cell.description)
            yield cell, frame
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def import_errors(targets: list[str]) -> dict[str, str]:
    """Import path -> why it cannot be imported in this process, for each of ``targets`` that cannot."""
    errors = {}
    for target in targets:
        try:
            registry.estimator_class(target)
        except ValueError as err:
            errors[target] = str(err)
    return errors


def _check_workers_import(client, cells: list[Cell], scheduler: str) -> None:
    """Raise ImportError naming the estimator and the worker when a worker of an external cluster cannot import an
    estimator the cells name by import path (the built-ins every worker has)."""
    targets = sorted({c.target for c in cells if c.target is not None})
    if not targets:
        return
    answers = client.run(import_errors, targets)  # worker address -> {target: error}
    for worker, errors in sorted(answers.items()):
        for target, error in errors.items():
            label = next(c.estimator for c in cells if c.target == target)
            raise ImportError(f"Dask worker {worker} of {scheduler} cannot import estimator {label!r} ({target}): "
                              f"{error}; install its package on every worker (or put its module on their PYTHONPATH)")


def _probe(address: str) -> None:
    """Open and close a TCP connection to a tcp:// address, so that a refused one fails at once (Dask's client
    retries until its timeout)."""
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        if port.isdigit():
            socket.create_connection((host.strip("[]"), int(port)), timeout=SCHEDULER_TIMEOUT).close()


def _failed_frame(cell: Cell, options: RunOptions, error: str) -> pd.DataFrame:
    return run_cell(dataclasses.replace(cell, error=error), options)


# --- the sweep --------------------------------------------------------------------------------------------


def _as_spec(spec) -> Spec:
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    if isinstance(spec, (str, Path)):
        return load_spec(spec)
    raise TypeError(f"spec must be a Spec, a dict or a path to a TOML file, got {type(spec).__name__}")


def run_sweep(
    spec,
    out: str | Path,
    *,
    device: str | None = None,
    executor: str = "local",
    workers: int | None = None,
    scheduler: str | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> SweepSummary:
    """Run every cell of ``spec`` (a path, dict or Spec) not yet complete in ``out``; return a SweepSummary.

    device: overrides the spec's device. executor: "local" (cells one after another in this process) or
    "dask" (``scheduler`` address of a running cluster, or a LocalCluster of ``workers`` processes on
    loopback, one thread each). fresh: delete previous cell files first. progress: a progress bar on a
    terminal, a line every 30 s otherwise. Failed cells are stored with status "failed" and counted.
    Holds ``out``'s lock while it runs: a second sweep into the same directory raises ``DirectoryLocked``.
    """
    spec = _as_spec(spec)
    device = spec.device if device is None else check_device(device, "device")
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not supported; expected one of {', '.join(map(repr, EXECUTORS))}")
    if executor == "local":
        if workers is not None or scheduler is not None:
            raise ValueError("workers and scheduler apply to executor='dask' only")
        _check_available(device)
    if workers is not None and scheduler is not None:
        raise ValueError("give either workers (a local Dask cluster) or scheduler (an existing one), not both")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; expected a directory (existing or to be created)")
    max_memory = None if spec.max_memory_gb is None else spec.max_memory_gb * 2**30
    check_memory(spec.cells(), max_memory, device)
    out.mkdir(parents=True, exist_ok=True)
    with store.lock(out) as stale:  # one sweep per directory; raises DirectoryLocked if taken
        if stale is not None:
            print(f"took over {out}: its previous sweep ({stale}) is no longer running", file=sys.stderr)
        if fresh:
            store.clear(out)
        store.remove_stale_temporaries(out)
        store.write_spec(out, spec.to_toml(), spec.hash)

        cells = spec.cells()
        previous = store.statuses(out)
        todo = [c for c in cells if previous.get(c.cell_id) != "ok"]
        skipped = len(cells) - len(todo)
        # cells sharing inputs run back to back, so each worker builds the inputs once
        first = {}
        for i, c in enumerate(todo):
            first.setdefault(c.inputs_id, i)
        todo.sort(key=lambda c: first[c.inputs_id])
        options = RunOptions(device=device, max_memory=max_memory, spec_name=spec.name, spec_hash=spec.hash)
        invalid = [c for c in todo if c.error is not None]
        runnable = [c for c in todo if c.error is None]
        done = 0
        failures = []
        bar = _progress(progress, len(todo), spec.name)
        try:
            def record(cell: Cell, frame: pd.DataFrame) -> None:
                nonlocal done
                store.write_cell(out, cell.cell_id, frame)
                if frame["status"].iloc[0] == "ok":
                    done += 1
                else:
                    failures.append((cell.description, frame["error"].iloc[0]))
                bar.update(1)

            for cell in invalid:  # invalid parameter combinations: recorded as failed without running
                record(cell, run_cell(cell, options))
            if runnable:
                if executor == "local":
                    results = _run_local(runnable, options, bar)
                else:
                    results = _run_dask(runnable, options, bar, workers=workers, scheduler=scheduler)
                for cell, frame in results:
                    record(cell, frame)
        finally:
            bar.close()
            _INPUT_CACHE.clear()
        return SweepSummary(done, skipped, time.perf_counter() - start, out, tuple(failures))


def _check_available(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device: {device!r} is not available here (torch.cuda.is_available() is False)")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise SpecError(f"device: {device!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SpecError("device: 'mps' is not available here")
