"""`wattmeter doctor`: which sensors work here, and for each that doesn't, why and how to fix it."""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..discovery import SensorPlan, discover
from .common import add_sensor_arguments, sensor_plan, settings_from_cwd

_ALL = ("nvml", "rapl", "cpu_model", "ram_model")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check which sensors work here and how to fix the rest",
                       description="Probe every sensor wattmeter could use on this machine (NVML GPUs, RAPL, "
                                   "the CPU and RAM models), read each once, and print which work, on which "
                                   "devices, and for each that does not, why and how to fix it. Takes the same "
                                   "sensor flags and settings as 'run'. Exits 0; --json for scripts.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_sensor_arguments(p)
    p.set_defaults(handler=doctor)


def doctor(args: argparse.Namespace) -> int:
    plan: SensorPlan = sensor_plan(args, settings_from_cwd(), pid=None)
    found = discover(plan)
    report: list[dict] = []
    for s in found.sensors:
        inner = getattr(s, "inner", s)
        devs = [f"{d.key} ({d.source.value}{', simulated' if d.simulated else ''})" for d in s.devices()]
        batch = s.read(time.monotonic())
        errors = [f"{e.device_key}: {e.kind} {e.message}".strip() for e in (batch.errors if batch else [])]
        report.append({"sensor": inner.name, "ok": not errors, "devices": devs, "errors": errors})
    seen = {r["sensor"] for r in report}
    for name, exc in found.unavailable.items():
        if name not in seen:
            report.append({"sensor": name, "ok": False, "reason": exc.reason, "fix": exc.fix})
    for s in found.sensors:
        s.close()
    if args.json:
        sys.stdout.write(json.dumps({"sensors": report, "notes": found.notes}, indent=2) + "\n")
    else:
        for r in report:
            mark = "ok " if r["ok"] else "NO "
            line = f"[{mark}] {r['sensor']:<10}"
            if r.get("devices"):
                line += " " + ", ".join(r["devices"])
            if r.get("reason"):
                line += f" {r['reason']}"
            sys.stdout.write(line + "\n")
            if r.get("fix"):
                sys.stdout.write(f"       fix: {r['fix']}\n")
            for e in r.get("errors", []):
                sys.stdout.write(f"       error: {e}\n")
        for n in found.notes:
            sys.stdout.write(f"note: {n}\n")
    return 0
