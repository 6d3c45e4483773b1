"""``python -m rankshrink``."""

from rankshrink.cli.app import app

app(prog_name="rankshrink")
