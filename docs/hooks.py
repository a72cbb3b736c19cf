"""MkDocs hook: the site's pages are the repository's own markdown files, read where they live.

The README (with the CITATION.cff and LICENSE it links), docs/, the figure gallery (figures/README.md with its
PNG and PDF files), the sweep format and the notebooks' guide keep their repository paths in the site, so their
relative links work unchanged on GitHub and in the built site. Nothing is copied into docs/.
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "CHANGELOG.md", "CITATION.cff", "LICENSE", "docs/*.md", "docs/api/*.md", "analysis/sweeps/README.md",
         "analysis/figures/README.md", "notebooks/README.md", "figures/README.md", "figures/*.png", "figures/*.pdf")


def on_files(files: Files, config) -> Files:
    """Replace the files found in docs_dir by the repository files of PAGES; keep the theme's own files."""
    kept = [f for f in files if not Path(f.abs_src_path or "").is_relative_to(ROOT / "docs")]
    chosen = sorted({p for pattern in PAGES for p in ROOT.glob(pattern)})
    ours = [File(p.relative_to(ROOT).as_posix(), str(ROOT), config["site_dir"], config["use_directory_urls"])
            for p in chosen]
    return Files(kept + ours)
