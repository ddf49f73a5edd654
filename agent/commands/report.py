"""``wattmeter report RECORDS...``: per-job energy and carbon, totals, what-if zones, plots."""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any, Iterable

from ..decisions import (RecordValues, add_report_arguments, decision_chunks, decision_columns, fleet_plot,
                         fleet_report)
from ..errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="summarise run records: energy, kWh, g CO2e, tokens, per-job and grouped",
        description="Per-job energy, carbon and token figures from JSONL run records "
                    "(last line per run wins; malformed lines are skipped and named on stderr).")
    p.add_argument("records", nargs="*", metavar="RECORDS",
                   help="JSONL files written by 'wattmeter run' (or --prometheus URL for the fleet)")
    p.add_argument("--format", "-f", default="table", choices=("table", "csv", "json", "markdown", "codecarbon"),
                   help="output format (codecarbon: rows in CodeCarbon's emissions.csv schema)")
    p.add_argument("--group-by", default="job", metavar="KEY",
                   help="totals by job, host, day, or any --label key such as team or project (default job)")
    p.add_argument("--what-if", metavar="ZONE,ZONE", default=None,
                   help="also show each job's location-based emissions in these zones, e.g. FR,DE,aws:us-east-1")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="draw power over time per GPU and energy per job, or per group with --prometheus "
                        "(needs wattmeter[plot])")
    p.add_argument("--output", "-o", metavar="PATH", default=None, help="write here instead of stdout")
    add_report_arguments(p)       # decisions: --prometheus, --since, --price-per-kwh, waste list
    p.set_defaults(handler=run_report)


def _what_if_zones(spec: str | None) -> list:
    from ..carbon.zones import resolve_zone

    if spec is None:
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UsageError(f"--what-if {spec!r} names no zone; give a comma-separated list such as FR,DE,US-CA")
    return [resolve_zone(name) for name in names]


def run_report(args: argparse.Namespace) -> int:
    from ..carbon.prices import parse_price

    group_by = args.group_by.strip()
    if not group_by:
        raise UsageError("--group-by is empty; use job, host, day or a label key such as team")
    zones = _what_if_zones(args.what_if)            # bad zones fail before any file is read
    if args.output and not Path(args.output).parent.exists():
        raise UsageError(f"--output {args.output}: folder '{Path(args.output).parent}' does not exist")
    if args.prometheus or not args.records:          # decisions: the fleet from Prometheus
        from ..carbon.fleet import render_fleet

        fleet = fleet_report(args, group_by, zones)
        _emit(args, [render_fleet(fleet, args.format)])
        if args.plot:
            sys.stderr.write(f"wattmeter: plot written to {fleet_plot(fleet, args.plot)}\n")
        return 0
    price = parse_price(args.price_per_kwh) if args.price_per_kwh else None   # bad price: exit 2 before reading
    if args.plot:
        from ..carbon.plot import check_plot_target

        check_plot_target(args.plot)
    # No cyclic garbage is made here, yet with 200k rows alive the collector's passes over them
    # were ~7 % of a report's CPU time (docs/performance.md): off while the report runs.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _report_records(args, group_by, zones, price)
    finally:
        if collecting:
            gc.enable()


def _report_records(args: argparse.Namespace, group_by: str, zones: list, price: Any) -> int:
    """The report over RECORDS files, streamed (docs/performance.md)."""
    from ..carbon.records import load_records
    from ..carbon.report import BUILTIN_GROUPS, RowMaker, build_report
    from ..carbon.rowstore import RowStore
    from ..carbon.report_render import render_chunks

    # streamed: one small row per run is kept, plus the value field of the runs that have one
    values = RecordValues(RowMaker())
    records = load_records(args.records, make=values, into=RowStore())
    if records.skipped:
        sys.stderr.write(f"wattmeter: warning: {records.skipped_summary()}\n")
    report = build_report(records, group_by, zones)
    _check_group_by(group_by, report.rows, BUILTIN_GROUPS)
    # decisions: value and cost as trailing columns in csv/codecarbon, as a section elsewhere
    more = decision_columns(report, values, price) if args.format in ("csv", "codecarbon") else None
    chunks = decision_chunks(render_chunks(report, args.format, more), args.format, report.rows, values, price)
    _emit(args, chunks)
    if args.plot:
        from ..carbon.plot import plot_report

        timelines = load_records(args.records)   # plots need the timelines the report dropped
        path = plot_report(report, args.plot, {r["run_id"]: r for r in timelines.records})
        sys.stderr.write(f"wattmeter: plot written to {path}\n")
    return 0


def _emit(args: argparse.Namespace, chunks: Iterable[str]) -> int:
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                out.writelines(chunks)
        except OSError as exc:
            raise UsageError(f"--output {args.output}: cannot write ({exc.strerror or exc})") from None
    else:
        sys.stdout.writelines(chunks)
    return 0


def _check_group_by(key: str, rows, builtin: tuple[str, ...]) -> None:
    """A label key no record has would put every run under '(none)': say so instead."""
    import difflib

    if key in builtin or not rows or any(key == k for r in rows for k, _ in r.labels):
        return
    present = sorted({k for r in rows for k, _ in r.labels})
    choices = list(builtin) + present
    close = difflib.get_close_matches(key, choices, 1, 0.0)
    raise UsageError(f"--group-by {key}: no record has a label '{key}'; use job, host, day"
                     f"{' or a label: ' + ', '.join(present) if present else ''} (closest: {close[0]})")
