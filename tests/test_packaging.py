"""evalab as a wheel: it carries the package, the figure definitions and the notebooks; installed outside the
source tree it renders a figure and copies the notebooks out. One version string everywhere."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import evalab as ev
from evalab.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def test_one_version_string():
    """__version__ is the single source: pyproject reads it, CITATION.cff and the CHANGELOG's latest release repeat it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "evalab.__version__"}' in pyproject
    assert re.search(r"^version: ['\"]?(\S+?)['\"]?$", (ROOT / "CITATION.cff").read_text(), re.M)[1] == ev.__version__
    assert re.search(r"^## \[?(\d[^\]\s]*)", (ROOT / "CHANGELOG.md").read_text(), re.M)[1] == ev.__version__
    assert subprocess.run([sys.executable, "-m", "evalab", "--version"], capture_output=True, text=True,
                          check=True).stdout.strip() == f"evalab {ev.__version__}"


def test_notebooks_command_copies_every_notebook(tmp_path, capsys):
    assert main(["notebooks", str(tmp_path / "nb")]) == 0
    assert sorted(p.name for p in (tmp_path / "nb").glob("*.ipynb")) == SHIPPED_NOTEBOOKS
    assert (tmp_path / "nb" / "01_quickstart.ipynb").read_bytes() == (ROOT / "notebooks" / "01_quickstart.ipynb").read_bytes()
    assert main(["notebooks", str(tmp_path / "nb")]) == 2  # refuses to overwrite
    assert "pass --force" in capsys.readouterr().err
    assert main(["notebooks", str(tmp_path / "nb"), "--force"]) == 0


def _env() -> dict:
    """The environment without this checkout on PYTHONPATH (the installed copy must be the one imported)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``python -m build`` (sdist, then the wheel from the sdist) without build isolation, into a temporary folder."""
    pytest.importorskip("build", reason="the 'build' package (dev extra) builds the wheel")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(out.glob("*.tar.gz"))) == 1
    (path,) = out.glob(f"evalab-{ev.__version__}-py3-none-any.whl")
    return path


@pytest.mark.slow
def test_wheel_holds_the_package_figures_and_notebooks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "evalab").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel: add their package to pyproject.toml"
    figures = {f"evalab/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "analysis" / "figures").glob("f*/*")
               if p.suffix in (".py", ".toml")}
    assert figures and figures <= names
    assert {f"evalab/notebooks/{n}" for n in SHIPPED_NOTEBOOKS} <= names
    assert any(n.endswith("licenses/LICENSE") for n in names)


@pytest.mark.slow
def test_installed_wheel_renders_a_figure_outside_the_source(wheel, tmp_path):
    """A fresh venv that sees this interpreter's packages (torch...) through a .pth file, the wheel installed into it
    without dependencies (nothing is downloaded); every command runs from a folder outside the source tree."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "outer.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, env=_env(), timeout=300)

    def run(*args):
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    where = run(str(python), "-c", "import evalab, evalab.report.reproduce as r; print(evalab.__file__); "
                                   "print(r.find_analysis())")
    package, analysis = map(Path, where.split())
    assert package.is_relative_to(env_dir) and analysis == package.parent / "analysis" / "figures"
    evalab = str(env_dir / "bin" / "evalab")
    run(evalab, "reproduce", "--scale", "tiny", "--only", "f01", "--out", "figs", "--quiet")
    assert (tmp_path / "figs" / "f01_rel_mse_vs_features.png").stat().st_size > 10_000
    assert "## f01_rel_mse_vs_features" in (tmp_path / "figs" / "README.md").read_text()
    run(evalab, "notebooks", "nb")
    assert sorted(p.name for p in (tmp_path / "nb").glob("*.ipynb")) == SHIPPED_NOTEBOOKS
