"""`wattmeter doctor`: which sensors work here, and for each that doesn't, why and how to fix it."""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..discovery import SensorPlan, discover
from ..sensors.late import LateNvmlSensor
from ..sensors.nvml import NvmlSensor
from .common import add_sensor_arguments, sensor_plan, settings_from_cwd

_ALL = ("nvml", "rapl", "cpu_model", "ram_model")
EVIDENCE_S = 1.5          # GPUs are read this long before saying what each one's energy comes from...
EVIDENCE_READ_S = 0.005   # ...every few ms, as near a window edge: what a value is shows in its data


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check which sensors work here and how to fix the rest",
                       description="Probe every sensor wattmeter could use on this machine (NVML GPUs, RAPL, "
                                   "the CPU and RAM models), read each, and print which work, on which devices, and "
                                   "for each that does not, why and how to fix it. GPUs are read for 1.5 s first, "
                                   "to say what each one's energy is measured from, and why. Takes the same "
                                   "sensor flags and settings as 'run'. Exits 0; --json for scripts.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_sensor_arguments(p)
    p.set_defaults(handler=doctor)


def doctor(args: argparse.Namespace) -> int:
    plan: SensorPlan = sensor_plan(args, settings_from_cwd(), pid=None)
    found = discover(plan)
    report: list[dict] = []
    for s in found.sensors:
        devs = [f"{d.key} ({d.source.value}{', simulated' if d.simulated else ''})" for d in s.devices()]
        batch = s.read(time.monotonic())
        errors = [f"{e.device_key}: {e.kind} {e.message}".strip() for e in (batch.errors if batch else [])]
        entry: dict = {"sensor": s.name, "ok": not errors, "devices": devs, "errors": errors}
        nvml = s.connected_sensor if isinstance(s, LateNvmlSensor) else s
        if isinstance(s, LateNvmlSensor) and nvml is None:
            entry.update(ok=False, reason=f"pending: {s.pending_reason or 'NVML not ready yet'}")
        if isinstance(nvml, NvmlSensor):
            # Which reading each GPU's energy comes from, and why: decided from the data (field
            # stamps, refresh periods, trailing means), so read for a while first.
            until = time.monotonic() + EVIDENCE_S
            while time.monotonic() < until:
                nvml.read(time.monotonic(), fast=True)
                time.sleep(EVIDENCE_READ_S)
            entry["references"] = {k: r.describe() for k, r in nvml.references().items()}
        report.append(entry)
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
            for key, ref in r.get("references", {}).items():
                sys.stdout.write(f"       {key}: {ref}\n")
            if r.get("fix"):
                sys.stdout.write(f"       fix: {r['fix']}\n")
            for e in r.get("errors", []):
                sys.stdout.write(f"       error: {e}\n")
        for n in found.notes:
            sys.stdout.write(f"note: {n}\n")
    return 0
