"""``wattmeter report RECORDS...``: per-job energy and carbon, totals, what-if zones, plots."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..decisions import add_report_arguments, fleet_report_text, records_decisions_text
from ..errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="summarise run records: energy, kWh, g CO2e, tokens, per-job and grouped",
        description="Per-job energy, carbon and token figures from JSONL run records "
                    "(last line per run wins; malformed lines are skipped and named on stderr).")
    p.add_argument("records", nargs="*", metavar="RECORDS", help="JSONL files written by 'wattmeter run'")
    p.add_argument("--format", "-f", default="table", choices=("table", "csv", "json", "markdown", "codecarbon"),
                   help="output format (codecarbon: rows in CodeCarbon's emissions.csv schema)")
    p.add_argument("--group-by", default="job", metavar="KEY",
                   help="totals by job, host, day, or any --label key such as team or project (default job)")
    p.add_argument("--what-if", metavar="ZONE,ZONE", default=None,
                   help="also show each job's location-based emissions in these zones, e.g. FR,DE,aws:us-east-1")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="draw power over time per GPU and energy per job (needs wattmeter[plot])")
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
    from ..carbon.records import load_records
    from ..carbon.report import build_report
    from ..carbon.report_render import render

    group_by = args.group_by.strip()
    if not group_by:
        raise UsageError("--group-by is empty; use job, host, day or a label key such as team")
    zones = _what_if_zones(args.what_if)            # bad zones fail before any file is read
    if args.prometheus or not args.records:          # decisions: the fleet from Prometheus
        return _write(args, fleet_report_text(args, group_by, zones))
    if args.plot:
        from ..carbon.plot import check_plot_target

        check_plot_target(args.plot)
    records = load_records(args.records)
    if records.skipped:
        sys.stderr.write(f"wattmeter: warning: {records.skipped_summary()}\n")
    report = build_report(records, group_by, zones)
    text = render(report, args.format)
    text = records_decisions_text(text, args.format, records.records, args.price_per_kwh)   # decisions
    _write(args, text)
    if args.plot:
        from ..carbon.plot import plot_report

        path = plot_report(report, args.plot)
        sys.stderr.write(f"wattmeter: plot written to {path}\n")
    return 0


def _write(args: argparse.Namespace, text: str) -> int:
    if args.output:
        out = Path(args.output)
        if not out.parent.exists():
            raise UsageError(f"--output {args.output}: folder '{out.parent}' does not exist")
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--output {args.output}: cannot write ({exc.strerror or exc})") from None
    else:
        sys.stdout.write(text)
    return 0
