"""``wattmeter estimate --gpu H100 --count 8 --hours 100 --zone FR``: kWh and CO2e before a job runs."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from ..errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..carbon.config import add_carbon_arguments
    from ..decisions import add_estimate_arguments

    p = subparsers.add_parser(
        "estimate", help="estimate a job's kWh and CO2e before it runs",
        description="Energy and emissions of a GPU job from board power (or measured power with "
                    "--calibrate) and the offline intensity tables.")
    p.add_argument("--gpu", required=True, metavar="MODEL", help="GPU model, e.g. H100, A100 SXM4, L4, MI300X")
    p.add_argument("--count", type=int, default=1, metavar="N", help="number of GPUs (default 1)")
    p.add_argument("--hours", type=float, required=True, metavar="H", help="wall-clock hours")
    p.add_argument("--utilisation", "--utilization", dest="utilisation", type=float, default=None, metavar="U",
                   help="average fraction of board power drawn, 0 < U <= 1 (default 1.0)")
    p.add_argument("--calibrate", nargs="+", metavar="RECORDS",
                   help="use the average power measured on this GPU family in these run records")
    p.add_argument("--include-simulated", action="store_true",
                   help="with --calibrate, also use runs on simulated (fake NVML) GPUs; they are ignored by default")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_carbon_arguments(p)
    add_estimate_arguments(p)     # decisions: --start-window, --price-per-kwh
    p.set_defaults(handler=run_estimate)


def _file_config() -> dict:
    """[tool.wattmeter] / wattmeter.toml through the shared loader (absent in stripped-down builds)."""
    try:
        from ..config import load_file_config
    except ImportError:
        return {}
    table, _name = load_file_config()
    return table


def run_estimate(args: argparse.Namespace) -> int:
    from ..carbon.config import CarbonConfig
    from ..carbon.estimate import calibrate, estimate, lookup_gpu, render_text
    from ..carbon.records import load_records
    from ..decisions import estimate_extras

    if args.count < 1:
        raise UsageError(f"--count {args.count} must be at least 1")
    if not (args.hours > 0 and math.isfinite(args.hours)):
        raise UsageError(f"--hours {args.hours:g} must be a finite number above 0, e.g. --hours 100")
    utilisation = 1.0 if args.utilisation is None else args.utilisation
    if not 0 < utilisation <= 1:   # NaN fails this too
        raise UsageError(f"--utilisation {utilisation:g} is outside (0, 1]; give a fraction such as 0.7")
    spec = lookup_gpu(args.gpu)
    config = CarbonConfig.from_args(args, os.environ, _file_config())
    calibration = None
    if args.calibrate:
        records = load_records(args.calibrate)
        if records.skipped:
            sys.stderr.write(f"wattmeter: warning: {records.skipped_summary()}\n")
        calibration = calibrate(records, spec, include_simulated=args.include_simulated)
        if calibration is not None and calibration.ignored_simulated and not calibration.runs:
            sys.stderr.write(f"wattmeter: note: {calibration.ignored_simulated} simulated run(s) in "
                             f"{', '.join(args.calibrate)} ignored (fake GPUs are not measurements; "
                             "--include-simulated uses them); using board power\n")
        elif calibration is None:
            sys.stderr.write(f"wattmeter: note: no {spec.family} GPUs in {', '.join(args.calibrate)}; "
                             "using board power\n")
    est = estimate(spec, args.count, args.hours, utilisation, config, calibration)
    extra, extra_text = estimate_extras(args, config, est)     # decisions: cost and best start
    if args.json:
        sys.stdout.write(json.dumps({**est.as_dict(), **extra}, indent=2) + "\n")
    else:
        sys.stdout.write(render_text(est, utilisation_given=args.utilisation is not None) + extra_text)
    return 0
