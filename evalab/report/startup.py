"""Start-up cost of evalab, each command in a fresh interpreter: ``evalab --help`` against ``python -c pass`` (the
command line imports neither torch nor pandas), and ``import evalab`` (the lazy face) against ``import torch``.
Section (g) of ``evalab bench``."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path


def commands() -> dict[str, list[str]]:
    """The timed commands. ``evalab --help`` is the console script beside this interpreter (``-m evalab`` without one)."""
    script = Path(sys.executable).with_name("evalab")
    evalab = [str(script)] if script.is_file() else [sys.executable, "-m", "evalab"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "evalab --help": [*evalab, "--help"],
        "import evalab": [sys.executable, "-c", "import evalab"],
        "import torch": [sys.executable, "-c", "import torch"],
        "import evalab; ev.RFA": [sys.executable, "-c", "import evalab as ev; ev.RFA"],
    }


def measure_startup(repeats: int = 10) -> dict:
    """Median wall seconds of each command over ``repeats`` rounds (the commands interleaved within a round, so a
    load that comes and goes touches all of them), and ``help_overhead_s``: evalab --help minus python -c pass."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not supported; expected an int >= 1")
    cmds = commands()
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"repeats": repeats, "seconds": median,
            "help_overhead_s": median["evalab --help"] - median["python -c pass"]}


def markdown(startup: dict) -> str:
    """One line for the bench report."""
    s = startup["seconds"]
    cells = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in s.items())
    return (f"\nstart-up, median of {startup['repeats']} fresh interpreters: {cells}; evalab --help is "
            f"{startup['help_overhead_s']:.3f} s above python -c pass")
