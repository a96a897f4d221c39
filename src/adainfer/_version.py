"""The package version, in a module of its own: persist.py records it in every policy file
without importing the package's __init__, and pyproject.toml reads it from here."""

__version__ = "0.1.0"
