"""The ``rankshrink`` command line: ``compress``, ``verify``, ``inspect``, ``compare``.

Each command is thin and lives in its own module: it turns its options into the library's
config, calls the library, and renders the result with rich. :mod:`rankshrink.cli.runner` turns
the project's error types into one red line and an exit code (2 bad input, 3 gate failed,
130/143 interrupted); :mod:`rankshrink.cli.options` holds the options the commands share.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rankshrink import __version__
from rankshrink.cli.compare_cmd import compare
from rankshrink.cli.compress_cmd import compress
from rankshrink.cli.inspect_cmd import inspect
from rankshrink.cli.runner import Command
from rankshrink.cli.verify_cmd import verify

app = typer.Typer(
    name="rankshrink",
    help="Compress a trained PyTorch model into a smaller, verified ONNX file (RaRe + live fusion).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# in --help in this order
app.command(cls=Command)(compress)
app.command(cls=Command)(verify)
app.command(cls=Command)(inspect)
app.command(cls=Command)(compare)


def _version(value: bool) -> None:
    if value:
        print(f"rankshrink {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """rankshrink: make a trained model physically smaller, with proof that it still behaves."""


def run() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
