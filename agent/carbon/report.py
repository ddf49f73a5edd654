"""``wattmeter report``: per-job rows, totals grouped by job/host/day/label, and what-if zones.

Pure functions over run records (docs/records.md); rendering lives in ``report_render``.
Token figures use generation tokens when a run counted any, else every counted token
(training runs count input tokens only).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .accounting import J_PER_KWH, what_if
from .records import RecordSet, Skipped
from .tables import ZoneInfo

SCOPES = ("location", "market", "embodied")
COMPONENTS = ("gpu", "cpu", "ram")
BUILTIN_GROUPS = ("job", "host", "day")


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


@dataclass(frozen=True)
class Figures:
    """Sums shared by a job row and a group row, with the per-unit figures derived from them."""

    runs: int
    duration_s: float
    energy_j: Mapping[str, float]            # gpu, cpu, ram, total
    emissions_g: Mapping[str, float]         # scopes present in at least one run
    water_l: float | None
    tokens: int
    gpu_hours: float
    runs_without_carbon: int = 0

    @property
    def energy_kwh(self) -> float:
        return self.energy_j.get("total", 0.0) / J_PER_KWH

    @property
    def j_per_token(self) -> float | None:
        return self.energy_j.get("total", 0.0) / self.tokens if self.tokens else None

    @property
    def wh_per_1k_tokens(self) -> float | None:
        return self.energy_j.get("total", 0.0) / 3600.0 / self.tokens * 1000.0 if self.tokens else None

    @property
    def g_per_gpu_hour(self) -> float | None:
        loc = self.emissions_g.get("location")
        return loc / self.gpu_hours if loc is not None and self.gpu_hours else None

    @property
    def g_per_1k_tokens(self) -> float | None:
        loc = self.emissions_g.get("location")
        return loc / self.tokens * 1000.0 if loc is not None and self.tokens else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs, "duration_s": self.duration_s, "energy_j": dict(self.energy_j),
            "energy_kwh": self.energy_kwh, "emissions_g": dict(self.emissions_g), "water_l": self.water_l,
            "tokens": self.tokens, "gpu_hours": self.gpu_hours, "j_per_token": self.j_per_token,
            "wh_per_1k_tokens": self.wh_per_1k_tokens, "g_per_gpu_hour": self.g_per_gpu_hour,
            "g_per_1k_tokens": self.g_per_1k_tokens, "runs_without_carbon": self.runs_without_carbon,
        }


@dataclass(frozen=True)
class JobRow:
    run_id: str
    job: str
    host: str
    day: str                     # UTC date of the start, YYYY-MM-DD
    start: str
    status: str
    checkpoint: bool             # only checkpoint lines exist: the run is live or was killed
    labels: Mapping[str, str]
    zone: str | None
    intensity_g_per_kwh: float | None
    intensity_source: str | None
    pue: float | None
    tokens_prompt: int
    tokens_generation: int
    gpu_count: int
    gpu_models: tuple[str, ...]
    figures: Figures
    record: Mapping[str, Any] = field(repr=False, compare=False)

    def group_key(self, by: str) -> str:
        if by == "job":
            return self.job
        if by == "host":
            return self.host
        if by == "day":
            return self.day
        return str(self.labels.get(by, "(none)"))

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("run_id", "job", "host", "day", "start", "status", "checkpoint",
                                              "zone", "intensity_g_per_kwh", "intensity_source", "pue",
                                              "tokens_prompt", "tokens_generation", "gpu_count")}
        out["labels"] = dict(self.labels)
        out["gpu_models"] = list(self.gpu_models)
        out.update(self.figures.as_dict())
        return out


def _day(record: Mapping[str, Any]) -> tuple[str, str]:
    start = record.get("start_unix")
    if isinstance(start, (int, float)) and not isinstance(start, bool):
        when = dt.datetime.fromtimestamp(start, dt.timezone.utc)
        return when.strftime("%Y-%m-%d"), str(record.get("start") or when.strftime("%Y-%m-%dT%H:%M:%SZ"))
    text = str(record.get("start") or "")
    return (text[:10] if len(text) >= 10 else "(unknown)"), text


def job_row(record: Mapping[str, Any]) -> JobRow:
    energy = record.get("energy_j") or {}
    parts = {c: _num(energy.get(c)) for c in COMPONENTS}
    total = _num(energy.get("total")) if energy.get("total") is not None else sum(parts.values())
    tokens = record.get("tokens") or {}
    prompt, generation = int(_num(tokens.get("prompt"))), int(_num(tokens.get("generation")))
    duration = _num(record.get("duration_s"))
    gpu_count = int(_num(record.get("gpu_count")))
    carbon = record.get("carbon") if isinstance(record.get("carbon"), Mapping) else None
    scopes: dict[str, float] = {}
    water = None
    if carbon:
        em = carbon.get("emissions_g") if isinstance(carbon.get("emissions_g"), Mapping) else {}
        scopes = {s: _num(em[s]) for s in SCOPES if em.get(s) is not None}
        water = _num(carbon["water_l"]) if carbon.get("water_l") is not None else None
    figures = Figures(1, duration, {**parts, "total": total}, scopes, water,
                      generation or prompt + generation, gpu_count * duration / 3600.0,
                      0 if carbon else 1)
    day, start = _day(record)
    labels = record.get("labels") or {}
    return JobRow(
        run_id=str(record["run_id"]), job=str(record.get("job") or "(unnamed)"),
        host=str(record.get("hostname") or "(unknown)"), day=day, start=start,
        status=str(record.get("status") or "unknown"),
        checkpoint=bool(record.get("checkpoint")), labels={str(k): str(v) for k, v in labels.items()},
        zone=carbon.get("zone") if carbon else None,
        intensity_g_per_kwh=_num(carbon.get("intensity_g_per_kwh")) if carbon else None,
        intensity_source=carbon.get("intensity_source") if carbon else None,
        pue=_num(carbon.get("pue")) if carbon and carbon.get("pue") is not None else None,
        tokens_prompt=prompt, tokens_generation=generation, gpu_count=gpu_count,
        gpu_models=tuple(str(m) for m in record.get("gpu_models") or ()), figures=figures, record=record)


def combine(figures: Sequence[Figures]) -> Figures:
    """Sum figures; a scope's total covers the runs that report that scope."""
    energy = {k: sum(f.energy_j.get(k, 0.0) for f in figures) for k in (*COMPONENTS, "total")}
    scopes: dict[str, float] = {}
    for f in figures:
        for scope, grams in f.emissions_g.items():
            scopes[scope] = scopes.get(scope, 0.0) + grams
    waters = [f.water_l for f in figures if f.water_l is not None]
    return Figures(sum(f.runs for f in figures), sum(f.duration_s for f in figures), energy, scopes,
                   sum(waters) if waters else None, sum(f.tokens for f in figures),
                   sum(f.gpu_hours for f in figures), sum(f.runs_without_carbon for f in figures))


@dataclass(frozen=True)
class WhatIf:
    zones: tuple[ZoneInfo, ...]
    per_run: Mapping[str, Mapping[str, float]]      # run_id -> zone key -> location g
    totals: Mapping[str, float]                     # zone key -> location g


@dataclass(frozen=True)
class Report:
    rows: tuple[JobRow, ...]
    group_by: str
    groups: tuple[tuple[str, Figures], ...]
    total: Figures
    what_if: WhatIf | None
    skipped: tuple[Skipped, ...]
    lines: int
    superseded: int
    paths: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobs": [r.as_dict() for r in self.rows],
            "group_by": self.group_by,
            "groups": [{"key": k, **f.as_dict()} for k, f in self.groups],
            "total": self.total.as_dict(),
            "skipped": [{"path": s.path, "line": s.line, "reason": s.reason} for s in self.skipped],
            "files": list(self.paths),
        }
        if self.what_if is not None:
            out["what_if"] = {
                "zones": [{"zone": z.key, "name": z.name, "g_per_kwh": z.g_per_kwh, "source": z.source_label}
                          for z in self.what_if.zones],
                "per_run": {k: dict(v) for k, v in self.what_if.per_run.items()},
                "totals": dict(self.what_if.totals),
            }
        return out


def compute_what_if(rows: Sequence[JobRow], zones: Sequence[ZoneInfo]) -> WhatIf:
    per_run = {r.run_id: {z.key: what_if(r.record, z)["emissions_g"]["location"] for z in zones} for r in rows}
    totals = {z.key: sum(v[z.key] for v in per_run.values()) for z in zones}
    return WhatIf(tuple(zones), per_run, totals)


def build_report(records: RecordSet, group_by: str = "job",
                 what_if_zones: Sequence[ZoneInfo] = ()) -> Report:
    rows = sorted((job_row(r) for r in records.records), key=lambda r: (r.start, r.run_id))
    keys: dict[str, list[Figures]] = {}
    for row in rows:
        keys.setdefault(row.group_key(group_by), []).append(row.figures)
    groups = tuple((k, combine(v)) for k, v in sorted(keys.items()))
    return Report(tuple(rows), group_by, groups, combine([r.figures for r in rows]),
                  compute_what_if(rows, what_if_zones) if what_if_zones else None,
                  tuple(records.skipped), records.lines, records.superseded, tuple(records.paths))
