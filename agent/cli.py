"""Command-line entry point: the composition root. Subcommands live in ``wattmeter.commands``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import UsageError
from . import __version__


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = f"; see '{self.prog} --help'"
        sys.stderr.write(f"wattmeter: error: {message}{hint}\n")
        raise SystemExit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser. With ``only``, just that subcommand's module is imported, which keeps
    `wattmeter run` from loading the HTTP server, Prometheus and carbon report code."""
    from .commands import NAMES, load

    parser = _Parser(prog="wattmeter", description="Meter the energy, power and carbon of GPU workloads.")
    parser.add_argument("--version", action="version", version=f"wattmeter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in ([only] if only in NAMES else NAMES):
        load(name).add_parser(sub)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"wattmeter: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
