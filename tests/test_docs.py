"""The documentation works as written.

1. Every ```python block of README.md and of each docs/*.md runs: a file's blocks run in order in one
   namespace, in a temporary working directory, with matplotlib on the Agg backend. A block preceded by the
   HTML comment ``<!-- no-test -->`` (on the line just above its fence) is skipped.
2. Every citation "theory.md section N" (also "sections N and M", "sections N-M", "section N.M", with or without
   a comma after theory.md) in the code, the analysis, the notebooks and the docs names a section that exists:
   a "## N. Title" heading of docs/theory.md.
3. Nothing cites the project's private working notes instead of docs/theory.md.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "theory.md"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Folders (and files) whose text may cite docs/theory.md.
CITING = ("evalab", "analysis", "notebooks", "docs", "tests", "figures/README.md", "README.md")
SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".txt"}

FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
OPT_OUT = re.compile(r"<!--\s*no-test\s*-->\s*$")
HEADING = re.compile(r"^## (\d+)\. \S", re.M)
NUMBER = r"\d+(?:\.\d+)?"
CITATION = re.compile(
    rf"theory\.md,?\s+(?:section|§)s?\s+({NUMBER}(?:\s*(?:,|and|or|to|-|–)\s*{NUMBER})*)", re.I
)
#: Text that points at working notes outside the repository instead of docs/theory.md.
FOREIGN = re.compile(r"(?:/work/shared|\.\./shared|shared/(?:theory|design)\.md|\bzoo\.md)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number of the code, code) of each python block not opted out, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if OPT_OUT.search(before):
            continue
        blocks.append((text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return blocks


def section_numbers(text: str) -> set[int]:
    """The N of every "## N. Title" heading."""
    return {int(n) for n in HEADING.findall(text)}


def cited_sections(text: str) -> list[tuple[str, list[int]]]:
    """(the citation as written, the top-level section numbers it names) for every citation in ``text``.

    "N.M" names section N; "N-M" / "N to M" names every section from N to M."""
    found = []
    for match in CITATION.finditer(text):
        parts = re.split(r"\s*(,|and|or|to|-|–)\s*", match.group(1))
        numbers, pending_range = [], False
        for part in parts:
            if part in {"-", "–", "to"}:
                pending_range = True
            elif re.fullmatch(NUMBER, part):
                n = int(part.split(".")[0])
                if pending_range and numbers:
                    numbers.extend(range(numbers[-1] + 1, n + 1))
                else:
                    numbers.append(n)
                pending_range = False
        found.append((" ".join(match.group(0).split()), numbers))
    return found


def readable_text(path: Path) -> str:
    """A file's text; for a notebook, its cells' sources joined (so a citation split across JSON strings reads
    as written)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        cells = json.loads(text)["cells"]
        return "\n\n".join("".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"] for cell in cells)
    return text


def citing_files() -> list[Path]:
    files = []
    for name in CITING:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in SUFFIXES)
    return [p for p in files if "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts]


# --- the collector's own behaviour -------------------------------------------------------------------------


def test_python_blocks_finds_blocks_and_honours_opt_out():
    text = "intro\n```python\nx = 1\n```\n<!-- no-test -->\n```python\nraise SystemExit\n```\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (13, "y = x + 1\n")]


def test_cited_sections_reads_every_form():
    text = (
        "see docs/theory.md section 5. Also (theory.md sections 2 and 7); theory.md, section 6 and\n"
        "theory.md\n    section 10.3; theory.md sections 8-10; theory.md sections 4, 5 and 12."
    )
    assert [numbers for _, numbers in cited_sections(text)] == [[5], [2, 7], [6], [10], [8, 9, 10], [4, 5, 12]]


def test_section_numbers_reads_level_two_headings_only():
    assert section_numbers("# Title\n## 1. One\ntext\n### 1.2 Sub\n## 12. Twelve\n##3. bad\n") == {1, 12}


# --- the documents -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path: Path, tmp_path, monkeypatch):
    """Each python block of the document runs, in order, in one namespace (as a reader pasting them would)."""
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        pass
    namespace = {"__name__": "__main__"}
    for line, code in blocks:
        # padding keeps tracebacks pointing at the document's own line numbers
        compiled = compile("\n" * (line - 1) + code, str(path), "exec")
        try:
            exec(compiled, namespace)
        except Exception as err:  # noqa: BLE001 - report which block failed, with its error
            pytest.fail(f"{path.relative_to(ROOT)}: the python block at line {line} raised {type(err).__name__}: {err}")


def test_theory_has_its_sections():
    """docs/theory.md has the fixed numbering 1..17, each number once, in order."""
    numbers = [int(n) for n in HEADING.findall(THEORY.read_text(encoding="utf-8"))]
    assert numbers == list(range(1, 18))


def test_theory_citations_resolve():
    sections = section_numbers(THEORY.read_text(encoding="utf-8"))
    broken = []
    for path in citing_files():
        for citation, numbers in cited_sections(readable_text(path)):
            missing = [n for n in numbers if n not in sections]
            if missing or not numbers:
                broken.append(f"{path.relative_to(ROOT)}: {citation!r} (no section {missing or '?'})")
    assert not broken, "citations of docs/theory.md that do not resolve:\n" + "\n".join(broken)


def test_no_citation_outside_the_repository():
    """The project cites its own docs/theory.md, never working notes that do not ship with it."""
    offending = []
    for path in citing_files():
        if path == Path(__file__).resolve():
            continue
        for match in FOREIGN.finditer(readable_text(path)):
            offending.append(f"{path.relative_to(ROOT)}: {match.group(0)!r}")
    assert not offending, "\n".join(offending)
