"""JSONL and CSV run records (schema in docs/records.md). Appends are flushed and fsynced, so a
crash of the agent loses at most the line being written."""
from __future__ import annotations

import csv
import io
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from ..model import Component, Scope, WindowResult

SCHEMA = "wattmeter.run/1"
CSV_FIELDS = [
    "run_id", "job", "hostname", "status", "exit_code", "start", "end", "duration_s",
    "energy_gpu_j", "energy_cpu_j", "energy_ram_j", "energy_total_j", "energy_kwh", "host_energy_total_j",
    "tokens_prompt", "tokens_generation", "joules_per_token", "emissions_g", "zone", "simulated",
    "approximate", "labels",
]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class RunIdentity:
    run_id: str
    job: str
    hostname: str
    command: str
    labels: Mapping[str, str] = field(default_factory=dict)
    context: Mapping[str, str] = field(default_factory=dict)


def _by_component(result: WindowResult, scope: Scope | None) -> dict[str, float]:
    out = {c.value: result.component_energy_j(c, scope) for c in Component}
    out["total"] = sum(out.values())
    return out


def run_record(result: WindowResult, ident: RunIdentity, *, status: str, exit_code: int | None,
               checkpoint: bool = False, carbon: Mapping[str, Any] | None = None,
               timeline: Mapping[str, Any] | None = None, errors: Mapping[str, int] | None = None) -> dict:
    energy = _by_component(result, None)
    gpus = [d for d in result.devices if d.component == Component.GPU]
    gen = result.tokens.get("generation", 0)
    n_tokens = gen or sum(result.tokens.values())
    return {
        "schema": SCHEMA,
        "run_id": ident.run_id,
        "job": ident.job,
        "hostname": ident.hostname,
        "labels": dict(ident.labels),
        "context": dict(ident.context),
        "command": ident.command,
        "status": status,
        "checkpoint": checkpoint,
        "exit_code": exit_code,
        "start": iso(result.start_wall),
        "end": iso(result.end_wall),
        "start_unix": round(result.start_wall, 3),
        "end_unix": round(result.end_wall, 3),
        "duration_s": round(result.duration_s, 6),
        "simulated": result.simulated,
        "approximate": result.approximate,
        "energy_j": {k: round(v, 6) for k, v in energy.items()},
        "host_energy_j": {k: round(v, 6) for k, v in _by_component(result, Scope.HOST).items()},
        "energy_kwh": energy["total"] / 3.6e6,
        "devices": [
            {"key": d.key, "component": d.component.value, "scope": d.scope.value, "source": d.source.value,
             "energy_j": round(d.energy_j, 6), "avg_power_w": round(d.avg_power_w, 3),
             "peak_power_w": None if d.peak_power_w is None else round(d.peak_power_w, 3),
             "labels": {k: v for k, v in d.labels.items() if k != "hostname"}, "approximate": d.approximate}
            for d in result.devices
        ],
        "gpu_count": len(gpus),
        "gpu_models": sorted({d.labels.get("model", "") for d in gpus}),
        "tokens": {"prompt": result.tokens.get("prompt", 0), "generation": gen,
                   **{k: v for k, v in result.tokens.items() if k not in ("prompt", "generation")}},
        "joules_per_token": (energy["total"] / n_tokens) if n_tokens else None,
        "timeline": dict(timeline) if timeline else None,
        "carbon": dict(carbon) if carbon else None,
        "errors": dict(errors or {}),
    }


def csv_row(record: Mapping[str, Any]) -> dict[str, Any]:
    e = record["energy_j"]
    carbon = record.get("carbon") or {}
    return {
        "run_id": record["run_id"], "job": record["job"], "hostname": record["hostname"],
        "status": record["status"], "exit_code": record["exit_code"], "start": record["start"],
        "end": record["end"], "duration_s": record["duration_s"],
        "energy_gpu_j": e["gpu"], "energy_cpu_j": e["cpu"], "energy_ram_j": e["ram"],
        "energy_total_j": e["total"], "energy_kwh": record["energy_kwh"],
        "host_energy_total_j": record["host_energy_j"]["total"],
        "tokens_prompt": record["tokens"]["prompt"], "tokens_generation": record["tokens"]["generation"],
        "joules_per_token": record["joules_per_token"],
        "emissions_g": (carbon.get("emissions_g") or {}).get("location"), "zone": carbon.get("zone"),
        "simulated": record["simulated"], "approximate": record["approximate"],
        "labels": ";".join(f"{k}={v}" for k, v in record["labels"].items()),
    }


class RecordWriter:
    """Appends records to a JSONL file (and optionally CSV). Paths are checked at construction."""

    def __init__(self, jsonl_path: str | None, csv_path: str | None = None) -> None:
        self.jsonl_path = jsonl_path
        self.csv_path = csv_path
        self._lock = threading.Lock()
        for path in (jsonl_path, csv_path):
            if path:
                check_writable(path)

    def write(self, record: Mapping[str, Any], *, final: bool = True) -> None:
        with self._lock:
            if self.jsonl_path:
                _append(self.jsonl_path, json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
            if self.csv_path and final:
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
                if not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0:
                    writer.writeheader()
                writer.writerow(csv_row(record))
                _append(self.csv_path, buf.getvalue())


def check_writable(path: str) -> None:
    """Raise OSError with a clear reason if ``path`` cannot be appended to."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory")
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"directory {parent} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    elif not os.access(parent, os.W_OK):
        raise PermissionError(f"directory {parent} is not writable")


def _append(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(lines: Sequence[str]) -> list[dict]:
    """Last line per run_id wins (checkpoints are superseded by the final record)."""
    by_id: dict[str, dict] = {}
    for line in lines:
        line = line.strip()
        if line:
            rec = json.loads(line)
            by_id[rec["run_id"]] = rec
    return list(by_id.values())
