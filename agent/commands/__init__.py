"""Subcommands. Each module has ``add_parser(subparsers)`` that sets ``handler``."""
from __future__ import annotations

from . import doctor, estimate, report, run, serve

COMMANDS = [run, serve, report, estimate, doctor]
