"""The API reference site: ``mkdocs build --strict`` passes, every public name of the face is documented, and the
rendered API pages, opened in headless Chromium, show the signatures of EVA and monte_carlo."""
from __future__ import annotations

import html
import inspect
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import evalab as ev

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocstrings", reason="the docs extra (mkdocs, mkdocs-material, mkdocstrings) builds the site")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _inventory(site: Path) -> set[str]:
    """The object names of the site's objects.inv (Sphinx inventory v2: four header lines, then zlib)."""
    raw = (site / "objects.inv").read_bytes()
    body = zlib.decompress(raw.split(b"\n", 4)[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line.strip()}


@pytest.mark.slow
def test_every_public_name_is_documented(site):
    documented = _inventory(site)
    missing = []
    for name in ev.__all__:
        if name == "__version__":
            continue
        obj = getattr(ev, name)
        if inspect.ismodule(obj):  # a module of the face: each of its public names
            members = [getattr(obj, m) for m in getattr(obj, "__all__", vars(obj)) if not m.startswith("_")]
            own = hasattr(obj, "__all__")  # without __all__: the names the module defines itself
            paths = [f"{m.__module__}.{m.__qualname__}" for m in members
                     if hasattr(m, "__qualname__") and (own or getattr(m, "__module__", None) == obj.__name__)]
            missing += [f"{name}: {p}" for p in paths if p not in documented]
            if obj.__name__ not in documented and not any(d.startswith(obj.__name__ + ".") for d in documented):
                missing.append(name)
        elif f"{obj.__module__}.{obj.__qualname__}" not in documented:
            missing.append(f"{name} ({obj.__module__}.{obj.__qualname__})")
    assert not missing, f"add these to a page of docs/api/: {missing}"


def _rendered_text(page: Path, tmp_path: Path) -> str:
    """The page's DOM after Chromium has loaded it, as plain text."""
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", proc.stdout)).split())


def _signature_pattern(name: str, obj) -> re.Pattern:
    """``name(`` followed by every parameter of ``obj`` in order, each with its default where it has one."""
    parts = []
    for p in inspect.signature(obj).parameters.values():
        default = "" if p.default is inspect.Parameter.empty else rf"[^,()]*=\s*{re.escape(repr(p.default))}"
        parts.append(rf"\b{p.name}\b{default}")
    return re.compile(rf"\b{name}\s*\(\s*" + r"[^()]*?".join(parts) + r"[^()]*\)")


@pytest.mark.slow
@pytest.mark.parametrize("page,name", [("docs/api/estimators.html", "EVA"), ("docs/api/measure.html", "monte_carlo")])
def test_browser_shows_signature(site, tmp_path, page, name):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed here (apt-get install -y chromium; .ci/run installs it)")
    text = _rendered_text(site / page, tmp_path)
    pattern = _signature_pattern(name, getattr(ev, name))
    assert pattern.search(text), f"{name}'s signature not found in the rendered {page}: {pattern.pattern}"
