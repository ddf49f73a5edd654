"""JSONL and CSV run records (schema in docs/records.md), written so that none is ever lost.

Each record is one ``write()`` of the whole line on an ``O_APPEND`` descriptor. A short write or
an error truncates the file back to where the line began, so the file only ever holds whole
lines. Regular files are fsynced; a FIFO is opened non-blocking and given a deadline, so a
missing reader never hangs the agent. A record that cannot be written is kept in memory,
retried at each checkpoint, and at exit saved to a fallback file in the user's state folder
(``$XDG_STATE_HOME/wattmeter/``), or to stderr as JSON: ``RecordSink.close`` says where, once.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import select
import stat
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from ..model import Component, Scope, WindowResult
from ..runsink import RunFacts, RunIdentity, SinkClose

__all__ = ["RunIdentity", "RecordSink", "append_line", "record_of", "run_record", "csv_row",
           "check_writable", "fallback_path", "read_records", "SCHEMA", "CSV_FIELDS"]

SCHEMA = "wattmeter.run/1"
CSV_FIELDS = [
    "run_id", "job", "hostname", "status", "exit_code", "start", "end", "duration_s",
    "energy_gpu_j", "energy_cpu_j", "energy_ram_j", "energy_total_j", "energy_kwh", "host_energy_total_j",
    "tokens_prompt", "tokens_generation", "joules_per_token", "emissions_g", "zone", "simulated",
    "approximate", "labels",
]
FIFO_TIMEOUT_S = 2.0       # how long a FIFO may go without a reader (or with a stalled one)
FALLBACK_NAME = "unwritten-records.jsonl"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


def record_of(result: WindowResult, facts: RunFacts) -> dict:
    """The JSON record of a window result and its run facts."""
    return run_record(result, facts.ident, status=facts.status, exit_code=facts.exit_code,
                      checkpoint=facts.checkpoint, carbon=facts.carbon, timeline=facts.timeline,
                      errors=facts.errors)


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


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_line(record: Mapping[str, Any]) -> str:
    """One JSONL line. A non-finite number (a broken sensor) becomes null rather than costing the
    record: strict JSON readers would reject NaN, and a raise here would lose the line."""
    try:
        return json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(_finite(record), separators=(",", ":"), allow_nan=False) + "\n"


# -- writing one line -------------------------------------------------------------
def _open_append(path: str, fifo_timeout_s: float, clock: Callable[[], float]) -> tuple[int, bool]:
    """An O_APPEND descriptor and whether it is a regular file. A FIFO is opened non-blocking:
    without a reader that fails with ENXIO, retried until the deadline (never a hang)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            deadline = clock() + fifo_timeout_s
            while True:
                try:
                    return os.open(path, flags | os.O_NONBLOCK), False
                except OSError as exc:
                    if exc.errno != errno.ENXIO or clock() >= deadline:
                        raise OSError(errno.ENXIO, f"FIFO {path} has no reader") if exc.errno == errno.ENXIO \
                            else exc
                    time.sleep(0.05)
    except FileNotFoundError:
        pass            # a new file (or a missing folder, which the open below reports)
    fd = os.open(path, flags, 0o644)
    return fd, stat.S_ISREG(os.fstat(fd).st_mode)


def _write_all_nonblocking(fd: int, data: bytes, deadline: float, clock: Callable[[], float]) -> None:
    """A pipe takes what fits; wait (bounded) for the reader to drain the rest."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
            continue
        except BlockingIOError:
            pass
        left = deadline - clock()
        if left <= 0:
            raise OSError(errno.ETIMEDOUT, "the FIFO's reader stopped reading")
        select.select([], [fd], [], min(left, 0.1))


def append_line(path: str, text: str, *, fifo_timeout_s: float = FIFO_TIMEOUT_S,
                write: Callable[[int, bytes], int] = os.write,
                clock: Callable[[], float] = time.monotonic) -> None:
    """Append ``text`` (one whole line) to ``path`` or raise OSError, leaving a regular file as it
    was: one ``write()`` on an O_APPEND fd; on a short write or an error, truncate back to the
    line's start. Regular files are fsynced (devices and pipes cannot be)."""
    data = text.encode("utf-8")
    fd, regular = _open_append(path, fifo_timeout_s, clock)
    try:
        if not regular:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                _write_all_nonblocking(fd, data, clock() + fifo_timeout_s, clock)
            else:
                n = write(fd, data)                 # /dev/full, a tty, /dev/null: all or error
                if n != len(data):
                    raise OSError(errno.EIO, f"short write ({n} of {len(data)} bytes)")
            return
        start = os.fstat(fd).st_size
        try:
            n = write(fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, f"short write ({n} of {len(data)} bytes), disk full?")
            os.fsync(fd)
        except OSError:
            # Leave only whole lines: the next record must start on its own line.
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def fallback_path(env: Mapping[str, str] | None = None) -> str:
    """Where records that could not be written go: ``$XDG_STATE_HOME/wattmeter/``."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"),
                                                      ".local", "state")
    return os.path.join(base, "wattmeter", FALLBACK_NAME)


# -- the sink ----------------------------------------------------------------------
class RecordSink:
    """``RunSink`` for JSONL (and optionally CSV) files. Checkpoints go to the JSONL file only;
    a checkpoint still pending is dropped when a newer one (or the final record) supersedes it."""

    def __init__(self, jsonl_path: str | None, csv_path: str | None = None, *,
                 env: Mapping[str, str] | None = None, stderr_fd: int = 2,
                 fifo_timeout_s: float = FIFO_TIMEOUT_S,
                 append: Callable[..., None] = append_line,
                 enrich: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None) -> None:
        self.jsonl_path = jsonl_path
        self._enrich = enrich            # extra fields other features add to each record
        self.enrich_error: str | None = None
        self._append = append            # injected in tests (an I/O error on demand)
        self.csv_path = csv_path
        self.env = dict(os.environ if env is None else env)
        self.stderr_fd = stderr_fd
        self.fifo_timeout_s = fifo_timeout_s
        self._lock = threading.Lock()
        self._pending: list[tuple[str, dict]] = []     # (target: "jsonl" | "csv", record)
        self._reason = ""
        self.last_record: dict | None = None
        for path in (jsonl_path, csv_path):
            if path:
                check_writable(path)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def write(self, result: WindowResult, facts: RunFacts) -> None:
        self.write_record(record_of(result, facts))

    def write_record(self, record: dict) -> None:
        if self._enrich is not None:
            try:
                record = {**record, **self._enrich(record)}
            except Exception as exc:   # noqa: BLE001 - the measured record is kept without the extras
                self.enrich_error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.last_record = record
            # A newer record (checkpoint or final) supersedes any checkpoint still pending.
            self._pending = [(k, r) for k, r in self._pending if not r.get("checkpoint")]
            if self.jsonl_path:
                self._pending.append(("jsonl", record))
            if self.csv_path and not record.get("checkpoint"):
                self._pending.append(("csv", record))
            self._flush()

    def _flush(self) -> None:
        still = []
        for target, record in self._pending:
            try:
                if target == "jsonl":
                    self._append(self.jsonl_path, json_line(record), fifo_timeout_s=self.fifo_timeout_s)
                else:
                    self._append_csv(record)
            except (OSError, ValueError) as exc:
                self._reason = f"{self.jsonl_path if target == 'jsonl' else self.csv_path}: " \
                               f"{getattr(exc, 'strerror', None) or exc}"
                still.append((target, record))
        self._pending = still

    def _append_csv(self, record: Mapping[str, Any]) -> None:
        assert self.csv_path
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        try:
            empty = os.path.getsize(self.csv_path) == 0
        except OSError:
            empty = True
        if empty:
            writer.writeheader()
        writer.writerow(csv_row(record))
        self._append(self.csv_path, buf.getvalue(), fifo_timeout_s=self.fifo_timeout_s)

    def close(self) -> SinkClose:
        with self._lock:
            self._flush()
            if not self._pending:
                return SinkClose()
            records = [r for _, r in self._pending]
            unique = list({id(r): r for r in records}.values())
            text = "".join(json_line(r) for r in unique)
            n, reason = len(unique), self._reason
            self._pending = []
            path = fallback_path(self.env)
            try:
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                append_line(path, text)
                return SinkClose(n, path, reason)
            except OSError:
                pass
            try:
                _write_fd(self.stderr_fd, text)
                return SinkClose(n, "stderr", reason)
            except OSError:
                return SinkClose(n, None, reason)


def _write_fd(fd: int, text: str) -> None:
    data = memoryview(text.encode("utf-8"))
    while data:
        data = data[os.write(fd, data):]


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


def read_records(lines: Sequence[str]) -> list[dict]:
    """Last line per run_id wins (checkpoints are superseded by the final record)."""
    by_id: dict[str, dict] = {}
    for line in lines:
        line = line.strip()
        if line:
            rec = json.loads(line)
            by_id[rec["run_id"]] = rec
    return list(by_id.values())
