"""Subcommands. Each module has ``add_parser(subparsers)`` that sets ``handler``."""
from __future__ import annotations

import importlib
from types import ModuleType

_NAMES = ["run", "serve", "report", "estimate", "doctor"]


def _load() -> list[ModuleType]:
    mods = []
    for name in _NAMES:
        try:
            mods.append(importlib.import_module(f"{__name__}.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    return mods


COMMANDS = _load()
