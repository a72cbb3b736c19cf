"""The version of evalab, in one place: the package face (and so pyproject.toml), the command line and result rows
read it."""

__version__ = "0.2.0"
