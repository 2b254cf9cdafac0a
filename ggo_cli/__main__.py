"""Allow ``python -m ggo_cli``."""

from .cli import app

app()
