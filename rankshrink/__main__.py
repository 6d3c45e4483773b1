"""``python -m rankshrink``."""

from rankshrink.cli import app

app(prog_name="rankshrink")
