"""``python -m gpurec`` is the ``gpurec`` command."""

from gpurec.cli import app

app(prog_name="gpurec")
