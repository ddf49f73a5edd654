"""``wattmeter report``: per-job rows, totals grouped by job/host/day/label, and what-if zones.

Pure functions over run records (docs/records.md); rendering lives in ``report_render``.
Token figures use generation tokens when a run counted any, else every counted token
(training runs count input tokens only).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from .accounting import J_PER_KWH, what_if
from .records import RecordSet, Skipped
from .tables import ZoneInfo

SCOPES = ("location", "market", "embodied")
COMPONENTS = ("gpu", "cpu", "ram")
BUILTIN_GROUPS = ("job", "host", "day")


_NUMBER = (int, float)


def _num(value: Any) -> float:
    return float(value) if type(value) in _NUMBER else 0.0   # type(), not isinstance: bool is no number


# Figures and JobRow are read-only values, but not frozen: a frozen dataclass's __init__ sets each
# field through object.__setattr__, ~10x the cost of a plain one (2.1 against 0.23 us for 22
# fields), and a 200k-run report builds a row per run for each pass that reads rows (decisions,
# what-if). unsafe_hash keeps them hashable, as frozen did.
@dataclass(slots=True, unsafe_hash=True)
class Figures:
    """Sums shared by a job row and a group row, with the per-unit figures derived from them."""

    runs: int
    duration_s: float
    energy: tuple[float, float, float, float]      # gpu, cpu, ram, total J (a tuple: 200k rows stay small)
    emissions: tuple[tuple[str, float], ...]        # (scope, g) for scopes present in at least one run
    water_l: float | None
    tokens: int
    gpu_hours: float
    runs_without_carbon: int = 0

    @classmethod
    def of(cls, runs: int, duration_s: float, energy_j: Mapping[str, float], emissions_g: Mapping[str, float],
           water_l: float | None, tokens: int, gpu_hours: float, runs_without_carbon: int = 0) -> "Figures":
        energy = tuple(float(energy_j.get(k, 0.0)) for k in (*COMPONENTS, "total"))
        return cls(runs, duration_s, energy, tuple(emissions_g.items()), water_l, tokens,  # type: ignore[arg-type]
                   gpu_hours, runs_without_carbon)

    @property
    def energy_j(self) -> dict[str, float]:
        return dict(zip((*COMPONENTS, "total"), self.energy))

    @property
    def emissions_g(self) -> dict[str, float]:
        return dict(self.emissions)

    @property
    def energy_kwh(self) -> float:
        return self.energy[3] / J_PER_KWH

    @property
    def j_per_token(self) -> float | None:
        return self.energy[3] / self.tokens if self.tokens else None

    @property
    def wh_per_1k_tokens(self) -> float | None:
        return self.energy[3] / 3600.0 / self.tokens * 1000.0 if self.tokens else None

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


@dataclass(slots=True, unsafe_hash=True)
class JobRow:
    run_id: str
    job: str
    host: str
    day: str                     # UTC date of the start, YYYY-MM-DD
    start: str
    status: str
    checkpoint: bool             # only checkpoint lines exist: the run is live or was killed
    labels: tuple[tuple[str, str], ...]   # sorted (key, value) pairs, shared between rows
    zone: str | None
    intensity_g_per_kwh: float | None
    intensity_source: str | None
    pue: float | None
    tokens_prompt: int
    tokens_generation: int
    gpu_count: int
    gpu_models: tuple[str, ...]
    figures: Figures
    simulated: bool = False              # fake NVML: the GPU figures are not measurements
    end_unix: float | None = None
    end: str = ""
    energy_kwh_it: float | None = None   # the record's own energy_kwh (else energy_j.total)
    renewable_share: float | None = None

    def group_key(self, by: str) -> str:
        if by == "job":
            return self.job
        if by == "host":
            return self.host
        if by == "day":
            return self.day
        return dict(self.labels).get(by, "(none)")

    def as_record(self) -> dict[str, Any]:
        """The fields of the run record that what-if and the CodeCarbon rows read (the full
        record is not kept: reports stream, docs/performance.md)."""
        f = self.figures
        carbon: dict[str, Any] | None = None
        if not f.runs_without_carbon:
            carbon = {"zone": self.zone, "pue": self.pue, "intensity_g_per_kwh": self.intensity_g_per_kwh,
                      "emissions_g": dict(f.emissions_g), "water_l": f.water_l,
                      "renewable_share": self.renewable_share}
        return {"run_id": self.run_id, "job": self.job, "labels": dict(self.labels), "start": self.start,
                "end": self.end, "end_unix": self.end_unix, "duration_s": f.duration_s,
                "energy_j": dict(f.energy_j), "energy_kwh": self.energy_kwh_it, "gpu_count": self.gpu_count,
                "gpu_models": list(self.gpu_models), "simulated": self.simulated, "carbon": carbon}

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("run_id", "job", "host", "day", "start", "status", "checkpoint",
                                              "simulated", "zone", "intensity_g_per_kwh", "intensity_source", "pue",
                                              "tokens_prompt", "tokens_generation", "gpu_count")}
        out["labels"] = dict(self.labels)
        out["gpu_models"] = list(self.gpu_models)
        out.update(self.figures.as_dict())
        return out


def _utc_day(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.timezone.utc).strftime("%Y-%m-%d")


def _day(record: Mapping[str, Any], day_of: Callable[[float], str] = _utc_day) -> tuple[str, str]:
    start = record.get("start_unix")
    if type(start) in _NUMBER:
        text = record.get("start")
        if isinstance(text, str) and text:
            return day_of(start), text
        when = dt.datetime.fromtimestamp(start, dt.timezone.utc)
        return when.strftime("%Y-%m-%d"), when.strftime("%Y-%m-%dT%H:%M:%SZ")
    text = str(record.get("start") or "")
    return (text[:10] if len(text) >= 10 else "(unknown)"), text


class _Shared(dict):
    """value -> the first equal value seen: a lookup that stays in C when the value is known."""

    def __missing__(self, value: Any) -> Any:
        self[value] = value
        return value


class RowMaker:
    """:func:`job_row` for a stream of records, with one shared object per distinct label set,
    model list, job and host name: 200k rows then cost ~0.3 kB each (docs/performance.md)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._shared: _Shared = _Shared()
        self._limit = limit     # a flood of unique values is simply not shared
        self._days: dict[int, str] = {}

    def share(self, value: Any) -> Any:
        if len(self._shared) >= self._limit:
            return self._shared.get(value, value)
        return self._shared[value]

    def day(self, unix_s: float) -> str:
        """The UTC date, formatted once per day rather than once per run."""
        key = int(unix_s // 86400)
        got = self._days.get(key)
        if got is None:
            got = self._days[key] = _utc_day(unix_s)
        return got

    def __call__(self, record: Mapping[str, Any]) -> "Encoded":
        # the dict's own lookup while under the limit (a run adds at most 8): 8 shares a run, 200k runs
        share = self._shared.__getitem__ if len(self._shared) <= self._limit - 8 else self.share
        return encode_record(record, share, self.day)


_NAN = float("nan")
Encoded = tuple[list[float], list[int], list[Any]]   # a row in rowstore's column order


def encode_record(record: Mapping[str, Any], _shared: Callable[[Any], Any] = lambda v: v,
                  _day_of: Callable[[float], str] = _utc_day) -> Encoded:
    """A run record as one row of :class:`~wattmeter.carbon.rowstore.RowStore` columns (floats
    with NaN for "none", ints, objects), built without intermediate objects: the report's
    per-run cost, so the number tests are written out (``type(v) in _NUMBER`` is :func:`_num`).
    :func:`job_row` is the same row as a :class:`JobRow`."""
    get = record.get
    energy = get("energy_j") or {}
    v = energy.get("gpu")
    gpu_j = float(v) if type(v) in _NUMBER else 0.0
    v = energy.get("cpu")
    cpu_j = float(v) if type(v) in _NUMBER else 0.0
    v = energy.get("ram")
    ram_j = float(v) if type(v) in _NUMBER else 0.0
    v = energy.get("total")
    total = gpu_j + cpu_j + ram_j if v is None else float(v) if type(v) in _NUMBER else 0.0
    tokens = get("tokens") or {}
    v = tokens.get("prompt")
    prompt = int(float(v)) if type(v) in _NUMBER else 0
    v = tokens.get("generation")
    generation = int(float(v)) if type(v) in _NUMBER else 0
    v = get("duration_s")
    duration = float(v) if type(v) in _NUMBER else 0.0
    v = get("gpu_count")
    gpu_count = int(float(v)) if type(v) in _NUMBER else 0
    carbon = get("carbon")
    carbon = carbon if isinstance(carbon, dict) else None   # dict, not Mapping: JSON objects, and 10x cheaper
    loc = mkt = emb = water = intensity = pue = share = _NAN
    zone = source = None
    if carbon:
        cget = carbon.get
        em = cget("emissions_g")
        if isinstance(em, dict):      # SCOPES, written out
            v = em.get("location")
            if v is not None:
                loc = float(v) if type(v) in _NUMBER else 0.0
            v = em.get("market")
            if v is not None:
                mkt = float(v) if type(v) in _NUMBER else 0.0
            v = em.get("embodied")
            if v is not None:
                emb = float(v) if type(v) in _NUMBER else 0.0
        v = cget("water_l")
        if v is not None:
            water = float(v) if type(v) in _NUMBER else 0.0
        v = cget("intensity_g_per_kwh")
        intensity = float(v) if type(v) in _NUMBER else 0.0
        v = cget("pue")
        if v is not None:
            pue = float(v) if type(v) in _NUMBER else 0.0
        v = cget("renewable_share")
        if type(v) in _NUMBER:
            share = float(v)
        zone, source = _shared(cget("zone")), _shared(cget("intensity_source"))
    v = get("start_unix")
    start = get("start")
    if type(v) in _NUMBER and isinstance(start, str) and start:     # _day's common case
        day = _day_of(v)
    else:
        day, start = _day(record, _day_of)
    labels = get("labels") or {}
    end_unix = get("end_unix")
    has_end = type(end_unix) in _NUMBER
    kwh = get("energy_kwh")
    flags = (1 if get("checkpoint") else 0) | (2 if get("simulated") else 0) | (0 if carbon else 4)
    floats = [duration, gpu_j, cpu_j, ram_j, total, loc, mkt, emb, water, gpu_count * duration / 3600.0,
              intensity, pue, float(end_unix) if has_end else _NAN, float(kwh) if type(kwh) in _NUMBER else _NAN,
              share]
    ints = [generation or prompt + generation, prompt, generation, gpu_count, flags]
    models = get("gpu_models") or ()
    objs = [str(record["run_id"]), _shared(str(get("job") or "(unnamed)")),
            _shared(str(get("hostname") or "(unknown)")), _shared(day), start,
            _shared(str(get("status") or "unknown")),
            _shared(tuple(sorted([(str(k), str(v)) for k, v in labels.items()])) if labels else ()), zone, source,
            _shared(tuple([str(m) for m in models]) if models else ()),
            "" if has_end else str(get("end") or "")]       # end_unix suffices
    return floats, ints, objs


def job_row(record: Mapping[str, Any], _shared: Callable[[Any], Any] = lambda v: v,
            _day_of: Callable[[float], str] = _utc_day) -> JobRow:
    from .rowstore import decode

    return decode(*encode_record(record, _shared, _day_of))


class _Sum:
    """Running sums of :class:`Figures`, so groups of 200k runs never sit in lists."""

    def __init__(self) -> None:
        self.runs, self.duration_s, self.tokens, self.gpu_hours, self.no_carbon = 0, 0.0, 0, 0.0, 0
        self.energy = [0.0, 0.0, 0.0, 0.0]
        self.scopes: dict[str, float] = {}
        self.water: float | None = None

    def add(self, f: Figures) -> None:
        self.runs += f.runs
        self.duration_s += f.duration_s
        self.tokens += f.tokens
        self.gpu_hours += f.gpu_hours
        self.no_carbon += f.runs_without_carbon
        for i, j in enumerate(f.energy):
            self.energy[i] += j
        for scope, grams in f.emissions:
            self.scopes[scope] = self.scopes.get(scope, 0.0) + grams
        if f.water_l is not None:
            self.water = (self.water or 0.0) + f.water_l

    def figures(self) -> Figures:
        return Figures(self.runs, self.duration_s, tuple(self.energy), tuple(self.scopes.items()),  # type: ignore
                       self.water, self.tokens, self.gpu_hours, self.no_carbon)


def combine(figures: Iterable[Figures]) -> Figures:
    """Sum figures; a scope's total covers the runs that report that scope."""
    acc = _Sum()
    for f in figures:
        acc.add(f)
    return acc.figures()


@dataclass(frozen=True)
class WhatIf:
    zones: tuple[ZoneInfo, ...]
    per_run: Mapping[str, Mapping[str, float]]      # run_id -> zone key -> location g
    totals: Mapping[str, float]                     # zone key -> location g


@dataclass(frozen=True)
class Report:
    rows: Sequence[JobRow]          # a sorted view over the stored rows (rowstore.SortedRows)
    group_by: str
    groups: tuple[tuple[str, Figures], ...]
    total: Figures
    what_if: WhatIf | None
    skipped: tuple[Skipped, ...]
    lines: int
    superseded: int
    paths: tuple[str, ...]
    simulated_runs: int = 0         # runs on fake GPUs: every format says so
    checkpoint_runs: int = 0        # runs with only checkpoint lines (live or killed)

    def as_dict(self, jobs: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "simulated_runs": self.simulated_runs,
            **({"jobs": [r.as_dict() for r in self.rows]} if jobs else {}),
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
    per_run = {r.run_id: {z.key: what_if(r.as_record(), z)["emissions_g"]["location"] for z in zones} for r in rows}
    totals = {z.key: sum(v[z.key] for v in per_run.values()) for z in zones}
    return WhatIf(tuple(zones), per_run, totals)


def build_report(records: RecordSet, group_by: str = "job",
                 what_if_zones: Sequence[ZoneInfo] = ()) -> Report:
    """Rows sorted by start, totals by ``group_by``. ``records.records`` holds run records, or,
    when streamed with ``load_records(make=RowMaker(), into=RowStore())``, ready rows."""
    from .rowstore import RowStore, SortedRows

    store = records.records
    if not isinstance(store, RowStore):
        store = RowStore()
        for r in records.records:
            store.append(r if isinstance(r, JobRow) else encode_record(r))
    order = store.order()
    rows = SortedRows(store, order)
    keys = store.group_keys(group_by)
    members: dict[str, list[int]] = {}
    for i in order:
        members.setdefault(keys[i], []).append(i)
    groups = tuple((k, store.figures(members[k])) for k in sorted(members))
    simulated, checkpoints = store.count("simulated"), store.count("checkpoint")
    return Report(rows, group_by, groups, store.figures(order),
                  compute_what_if(rows, what_if_zones) if what_if_zones else None,
                  tuple(records.skipped), records.lines, records.superseded, tuple(records.paths),
                  simulated, checkpoints)
