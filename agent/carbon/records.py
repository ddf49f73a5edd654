"""Read JSONL run records (docs/records.md) for reports: last line per run wins.

A malformed line is skipped, counted and named (``path:line: reason``); every other line
is kept. A checkpoint line is superseded by any later line with the same ``run_id``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError

SCHEMA_PREFIX = "wattmeter.run/"


@dataclass(frozen=True)
class Skipped:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class RecordSet:
    records: list[dict[str, Any]] = field(default_factory=list)   # one per run_id, first-seen order
    skipped: list[Skipped] = field(default_factory=list)
    lines: int = 0                 # non-blank lines read
    superseded: int = 0            # lines replaced by a later line of the same run
    paths: list[str] = field(default_factory=list)

    def skipped_summary(self, limit: int = 5) -> str:
        """One line naming the skipped lines, for stderr."""
        shown = "; ".join(str(s) for s in self.skipped[:limit])
        more = f"; and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"skipped {len(self.skipped)} malformed line(s): {shown}{more}"


def _problem(obj: Any) -> str | None:
    """Why a parsed line is not a usable run record, or None when it is."""
    if not isinstance(obj, dict):
        return f"not a JSON object ({type(obj).__name__})"
    schema = obj.get("schema")
    if schema is not None and not (isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX)):
        return f"unknown schema {schema!r}"
    if not isinstance(obj.get("run_id"), str) or not obj["run_id"]:
        return "no run_id"
    for name in ("energy_j", "host_energy_j", "tokens", "labels", "timeline", "carbon"):
        if obj.get(name) is not None and not isinstance(obj[name], dict):
            return f"{name} is not an object"
    for name in ("duration_s", "energy_kwh", "start_unix", "end_unix"):
        value = obj.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{name} is not a number"
    energy = obj.get("energy_j") or {}
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in energy.values()):
        return "energy_j holds a non-number"
    return None


def _check_path(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"records file '{path}' does not exist; pass the file 'wattmeter run --records' "
                         "wrote (default ./wattmeter-records.jsonl)")
    if path.is_dir():
        raise UsageError(f"records path '{path}' is a directory; pass the .jsonl file inside it")


def load_records(paths: Sequence[str | Path]) -> RecordSet:
    """Parse every file; raise :class:`UsageError` for a missing or unreadable file."""
    out = RecordSet()
    by_run: dict[str, int] = {}
    for raw_path in paths:
        path = Path(raw_path)
        _check_path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read records file '{path}': {exc.strerror or exc}") from None
        out.paths.append(str(path))
        for number, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            out.lines += 1
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.skipped.append(Skipped(str(path), number, "not UTF-8 text"))
                continue
            except ValueError as exc:
                reason = getattr(exc, "msg", "invalid JSON")
                out.skipped.append(Skipped(str(path), number, f"invalid JSON ({reason})"))
                continue
            problem = _problem(obj)
            if problem:
                out.skipped.append(Skipped(str(path), number, problem))
                continue
            run_id = obj["run_id"]
            if run_id in by_run:
                out.records[by_run[run_id]] = obj
                out.superseded += 1
            else:
                by_run[run_id] = len(out.records)
                out.records.append(obj)
    return out
