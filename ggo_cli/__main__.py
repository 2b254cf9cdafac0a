"""Allow ``python -m ggo_cli``."""

from .cli.app import app

app()
