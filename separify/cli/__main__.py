"""``python -m separify.cli``."""

from separify.cli import run

run()
