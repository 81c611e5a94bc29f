"""The `xc` command line; see main.py. `python -m xcli.cli.manpage` writes the man pages."""

from xcli.cli.main import cli, main

__all__ = ["cli", "main"]
