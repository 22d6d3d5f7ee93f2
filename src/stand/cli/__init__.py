"""The `stand` command (typer): one module per family of commands, the shared flags in common.py."""

from stand.cli import run, lab, serve  # noqa: F401  (each registers its commands on the app, in this order)
from stand.cli.common import app


def main() -> None:
    app()
