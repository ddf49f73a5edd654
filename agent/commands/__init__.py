"""Subcommands. Each module has ``add_parser(subparsers)`` that sets ``handler``; modules are
imported only when their command runs (or for the full --help)."""
from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ["run", "serve", "report", "estimate", "doctor", "config"]


def load(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")
