"""The version of evalab (one place: the package face, the command line, result rows and pyproject.toml read it)."""

__version__ = "0.1.0"
