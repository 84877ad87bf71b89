"""The ``retrieval`` command line: click commands that parse, call the Python API and print."""

from retrieval.cli.main import main

__all__ = ["main"]
