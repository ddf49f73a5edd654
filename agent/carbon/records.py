"""Read JSONL run records (docs/records.md) for reports: last line per run wins.

Files are streamed line by line, and each record can be reduced as it is read (``make``, e.g. to
a report row), so memory follows the number of runs, not the file size. A malformed line is
skipped, counted and named (``path:line: reason``): bad JSON, non-finite numbers, negative
energy, or an average power above 10 kW per GPU. Every other line is kept. A checkpoint line is
superseded by any later line with the same ``run_id``. A file none of whose lines is a record
(binary, or some other JSONL) is a usage error, not "0 runs".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import UsageError

try:  # 4x faster than the standard library on records (docs/performance.md); optional
    from orjson import JSONDecodeError as _FastError, loads as _fast_loads
except ImportError:  # pragma: no cover - the stdlib path is the same, only slower
    _fast_loads, _FastError = None, ValueError

SCHEMA_PREFIX = "wattmeter.run/"
MAX_W_PER_GPU = 10_000.0     # no accelerator draws 10 kW; above it a record is corrupt
MAX_HOST_W = 100_000.0       # CPU + RAM of one host, same idea


@dataclass(frozen=True)
class Skipped:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class RecordSet:
    records: list[Any] = field(default_factory=list)   # one per run_id (``make(record)``), first-seen order
    skipped: list[Skipped] = field(default_factory=list)
    lines: int = 0                 # non-blank lines read
    superseded: int = 0            # lines replaced by a later line of the same run
    paths: list[str] = field(default_factory=list)

    def skipped_summary(self, limit: int = 5) -> str:
        """One line naming the skipped lines, for stderr."""
        shown = "; ".join(str(s) for s in self.skipped[:limit])
        more = f"; and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"skipped {len(self.skipped)} malformed line(s): {shown}{more}"


_NUMBER = (int, float)


MAX_UNIX_S = 253402300800.0     # 10000-01-01: datetime's limit


_isfinite = math.isfinite


def _finite(value: Any) -> bool:
    return type(value) in _NUMBER and _isfinite(value)   # type(): a bool is not a number here


def _absurd(obj: Mapping[str, Any], energy: Mapping[str, Any]) -> str | None:
    """Values no meter produces (beyond the per-field checks of :func:`_problem`): more than
    10 kW per GPU, more than 100 kW of CPU+RAM, non-finite or negative emissions."""
    duration = obj.get("duration_s")
    if duration is not None and duration > 0:
        count = obj.get("gpu_count")
        gpus = max(1, int(count)) if _finite(count) else 1
        gpu_w = (energy.get("gpu") or 0.0) / duration / gpus
        if gpu_w > MAX_W_PER_GPU:
            return f"average GPU power {gpu_w:.3g} W is above {MAX_W_PER_GPU:.0f} W per GPU"
        host_w = ((energy.get("cpu") or 0.0) + (energy.get("ram") or 0.0)) / duration
        if host_w > MAX_HOST_W:
            return f"average CPU+RAM power {host_w:.3g} W is above {MAX_HOST_W:.0f} W"
    carbon = obj.get("carbon")
    emissions = carbon.get("emissions_g") if carbon else None
    if isinstance(emissions, dict):
        for key, value in emissions.items():
            if value is not None and (type(value) not in _NUMBER or not _isfinite(value) or value < 0):
                return f"carbon.emissions_g.{key} is not a finite number >= 0 ({value!r})"
    return None


_OBJECT_FIELDS = ("energy_j", "host_energy_j", "tokens", "labels", "timeline", "carbon")
_NUMBER_FIELDS = ("duration_s", "energy_kwh", "start_unix", "end_unix")


def _problem(obj: Any) -> str | None:
    """Why a parsed line is not a usable run record, or None when it is. Runs once per line of a
    200k-line file: the lookups are bound once and the loops are over constant tuples."""
    if not isinstance(obj, dict):
        return f"not a JSON object ({type(obj).__name__})"
    get = obj.get
    schema = get("schema")
    if schema is not None and not (isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX)):
        return f"unknown schema {schema!r}"
    run_id = get("run_id")
    if not isinstance(run_id, str) or not run_id:
        return "no run_id"
    for name in _OBJECT_FIELDS:
        value = get(name)
        if value is not None and not isinstance(value, dict):
            return f"{name} is not an object"
    for name in _NUMBER_FIELDS:
        value = get(name)
        if value is not None:
            if type(value) not in _NUMBER:
                return f"{name} is not a number"
            if not _isfinite(value):
                return f"{name} is not a finite number ({value!r})"
            if name[-5:] == "_unix" and not 0 <= value < MAX_UNIX_S:   # else no date can be formatted
                return f"{name} {value:.6g} is not a Unix time between 1970 and 9999"
    energy = get("energy_j") or {}
    for key, v in energy.items():
        if v is None:
            continue
        if type(v) not in _NUMBER:
            return "energy_j holds a non-number"
        if not _isfinite(v):
            return f"energy_j.{key} is not a finite number ({v!r})"
        if v < 0:
            return f"energy_j.{key} is negative ({v:.3g} J)"
    return _absurd(obj, energy)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"records file '{path}' does not exist; pass the file 'wattmeter run --records' "
                         "wrote (default ./wattmeter-records.jsonl)")
    if path.is_dir():
        raise UsageError(f"records path '{path}' is a directory; pass the .jsonl file inside it")


def load_records(paths: Sequence[str | Path], make: Callable[[dict[str, Any]], Any] | None = None,
                 into: Any = None) -> RecordSet:
    """Stream every file; raise :class:`UsageError` for a missing, unreadable or non-record file.

    ``make`` reduces each accepted line as it is read (a later line of the same run replaces
    it), so the whole record is never kept when only a summary of it is needed; ``into`` is the
    container for the results (a list by default; anything with append and item assignment).
    """
    out = RecordSet() if into is None else RecordSet(records=into)
    by_run: dict[str, int] = {}
    for raw_path in paths:
        path = Path(raw_path)
        _check_path(path)
        out.paths.append(str(path))
        lines_before, skipped_before, kept = out.lines, len(out.skipped), 0
        records, skipped, seen = out.records, out.skipped, by_run.get
        lines = 0
        try:
            with path.open("rb") as f:
                for number, raw in enumerate(f, start=1):
                    if raw.isspace():       # the same test as "not raw.strip()", without a copy
                        continue
                    lines += 1
                    obj = _fast_parse(raw)
                    if obj is None:                      # not for orjson: the standard parser's verdict
                        obj = _parse_line(raw, str(path), number, skipped)
                        if obj is None:
                            continue
                    else:
                        problem = _problem(obj)
                        if problem:
                            skipped.append(Skipped(str(path), number, problem))
                            continue
                    kept += 1
                    item = make(obj) if make is not None else obj
                    run_id = obj["run_id"]
                    at = seen(run_id)
                    if at is not None:
                        records[at] = item
                        out.superseded += 1
                    else:
                        by_run[run_id] = len(records)
                        records.append(item)
        except OSError as exc:
            out.lines += lines
            raise UsageError(f"cannot read records file '{path}': {exc.strerror or exc}") from None
        out.lines += lines
        if kept == 0 and out.lines > lines_before:
            first = out.skipped[skipped_before]
            raise UsageError(f"records file '{path}' holds no run records (line {first.line}: {first.reason}); "
                             "pass a JSONL file written by 'wattmeter run --records'")
    return out


def _fast_parse(raw: bytes) -> Any:
    """The line parsed by orjson, or None for the standard parser to decide (no orjson, a NUL
    byte, or anything orjson refuses: NaN, big ints, bad UTF-8...). A JSON ``null`` also gives
    None, and the standard parser then says it is no object."""
    if _fast_loads is None or b"\x00" in raw:
        return None
    try:
        return _fast_loads(raw)
    except _FastError:
        return None


def _parse_line(raw: bytes, path: str, number: int, skipped: list[Skipped]) -> dict[str, Any] | None:
    if b"\x00" in raw:
        skipped.append(Skipped(path, number, "binary data, not a JSON line"))
        return None
    obj: Any = None
    if _fast_loads is not None:
        try:
            obj = _fast_loads(raw)
        except _FastError:
            obj = None   # NaN, big ints, bad UTF-8...: the standard parser says exactly what
    try:
        if obj is None:
            obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        skipped.append(Skipped(path, number, "not UTF-8 text"))
        return None
    except ValueError as exc:
        reason = getattr(exc, "msg", "invalid JSON")
        skipped.append(Skipped(path, number, f"invalid JSON ({reason})"))
        return None
    except RecursionError:
        skipped.append(Skipped(path, number, "invalid JSON (nested too deeply)"))
        return None
    problem = _problem(obj)
    if problem:
        skipped.append(Skipped(path, number, problem))
        return None
    return obj
