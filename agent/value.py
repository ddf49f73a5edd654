"""Return on environment: value attached to windows and runs, per kWh and per kg CO2e.

Value is any count a user cares about: samples, images, requests, an eval score. It comes from
``meter.add_value(n, unit=...)``, ``run --value UNIT=N``, or a value file the job writes
(JSON ``{"samples": 1000}`` or lines ``samples=1000``). Tokens count as value automatically
(``tokens`` = generation tokens, else all tokens).

Records carry ``value: {unit: n}``; :func:`value_fields` takes a record dict and returns the
fields to add (``value``, ``value_per_kwh``, ``value_per_kg_co2e``), so every writer of records
shares one definition.
"""
from __future__ import annotations

import json
import math
import threading
from collections import Counter
from typing import Any, Mapping, Sequence

from .errors import UsageError

J_PER_KWH = 3.6e6


def _number(raw: Any, origin: str) -> float:
    if isinstance(raw, bool):
        raise UsageError(f"{origin}: {raw!r} is not a number; give a count such as samples=1000")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{origin}: {raw!r} is not a number; give a count such as samples=1000") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{origin}: {raw!r} must be a finite number >= 0, e.g. samples=1000")
    return value


def parse_value_flag(spec: str, flag: str = "--value") -> tuple[str, float]:
    """``UNIT=N`` as (unit, n). ``samples=1000``, ``images=2.5e4``."""
    unit, sep, raw = str(spec).partition("=")
    unit = unit.strip()
    if not sep or not unit:
        raise UsageError(f"{flag} {spec!r} is not UNIT=N; give e.g. --value samples=1000")
    if not raw.strip():
        raise UsageError(f"{flag} {spec!r} has no number; give e.g. --value {unit}=1000")
    return unit, _number(raw.strip(), f"{flag} {spec}")


def parse_value_text(text: str, origin: str) -> dict[str, float]:
    """A value file: a JSON object of unit -> number, or lines ``UNIT=N`` (``#`` comments)."""
    body = text.strip()
    if not body:
        return {}
    if body.startswith("{"):
        try:
            data = json.loads(body)
        except ValueError:
            raise UsageError(f"{origin}: not valid JSON; write e.g. {{\"samples\": 1000}}") from None
        return {str(k): _number(v, f"{origin} {k}") for k, v in data.items()}
    out: dict[str, float] = {}
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            unit, n = parse_value_flag(line, origin)
            out[unit] = n
    return out


class ValueCounter:
    """Thread-safe running totals of value by unit (what ``meter.add_value`` feeds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: Counter[str] = Counter()

    def add(self, n: float, unit: str = "samples") -> None:
        value = _number(n, f"add_value({n!r}, unit={unit!r})")
        if not unit or not isinstance(unit, str):
            raise UsageError(f"add_value unit {unit!r} must be a non-empty name such as 'samples'")
        with self._lock:
            self._totals[unit] += value

    def totals(self) -> dict[str, float]:
        with self._lock:
            return dict(self._totals)


def record_value(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's value by unit, with tokens added automatically."""
    out = {str(k): float(v) for k, v in (record.get("value") or {}).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tokens = record.get("tokens") or {}
    n = tokens.get("generation") or sum(v for v in tokens.values() if isinstance(v, (int, float)))
    if n and "tokens" not in out:
        out["tokens"] = float(n)
    return out


def record_kwh(record: Mapping[str, Any]) -> float:
    energy = record.get("energy_j") or {}
    total = energy.get("total") if isinstance(energy, Mapping) else None
    return float(total) / J_PER_KWH if isinstance(total, (int, float)) else 0.0


def record_kg_co2e(record: Mapping[str, Any]) -> float | None:
    carbon = record.get("carbon") or {}
    grams = (carbon.get("emissions_g") or {}).get("location") if isinstance(carbon, Mapping) else None
    return float(grams) / 1000.0 if isinstance(grams, (int, float)) else None


def value_fields(record: Mapping[str, Any], extra: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Fields to add to a run record: ``value`` (with ``extra`` merged in), and value per kWh and
    per kg CO2e (location-based) for each unit. Empty when the run has no value at all."""
    merged = dict(record.get("value") or {})
    merged.update(extra or {})
    value = record_value({**record, "value": merged})
    if not value:
        return {}
    kwh, kg = record_kwh(record), record_kg_co2e(record)
    return {
        "value": {k: v for k, v in merged.items()},
        "value_per_kwh": {u: n / kwh for u, n in value.items()} if kwh > 0 else {},
        "value_per_kg_co2e": {u: n / kg for u, n in value.items()} if kg else {},
    }


def compare_runs(records: Sequence[Mapping[str, Any]], unit: str | None = None, per: float = 1000.0) -> str | None:
    """"this run used 18.0 % more energy per 1k samples than the last one": the last two final
    records of one job with value in a shared unit. None when there is nothing to compare."""
    runs = [r for r in records if record_value(r)]
    if len(runs) < 2:
        return None
    last, prev = runs[-1], runs[-2]
    units = [u for u in record_value(last) if u in record_value(prev)]
    if unit is not None:
        units = [u for u in units if u == unit]
    if not units:
        return None
    u = units[0]
    now_n, prev_n = record_value(last)[u], record_value(prev)[u]
    if not now_n or not prev_n or record_kwh(prev) <= 0:
        return None
    now_j = record_kwh(last) * J_PER_KWH / now_n * per
    prev_j = record_kwh(prev) * J_PER_KWH / prev_n * per
    change = 100.0 * (now_j / prev_j - 1.0)
    scale = f"{per / 1000:g}k" if per >= 1000 else f"{per:g}"
    word = "more" if change >= 0 else "less"
    return (f"{last.get('job', 'job')}: this run used {abs(change):.1f} % {word} energy per {scale} {u} than the "
            f"last one ({now_j:,.1f} J vs {prev_j:,.1f} J)")


class WindowValue:
    """A window's value: what ``meter.add_value`` added while it was open, plus its own
    ``window.add_value`` calls. Like tokens, every window open at the time gets meter-wide value."""

    def __init__(self, meter_values: ValueCounter) -> None:
        self._meter_values = meter_values
        self._own = ValueCounter()
        self._v0: dict[str, float] = {}
        self._v1: dict[str, float] | None = None

    def begin(self) -> None:
        self._v0 = self._meter_values.totals()

    def end(self) -> None:
        if self._v1 is None:
            self._v1 = self._meter_values.totals()

    def add(self, n: float, unit: str = "samples") -> None:
        self._own.add(n, unit)

    def totals(self) -> dict[str, float]:
        """Value by unit so far (up to the end once the window ended)."""
        v1 = self._v1 if self._v1 is not None else self._meter_values.totals()
        out = {u: n - self._v0.get(u, 0.0) for u, n in v1.items() if n - self._v0.get(u, 0.0)}
        for u, n in self._own.totals().items():
            out[u] = out.get(u, 0.0) + n
        return out

    def per_kwh(self, energy_j: float) -> dict[str, float]:
        return {u: n / (energy_j / J_PER_KWH) for u, n in self.totals().items()} if energy_j > 0 else {}


class LoggedValue:
    """Value read from a trainer's logged metrics (``eval_accuracy``, ``train_samples``...).

    ``keys`` maps a log key to a value unit. The latest logged number of each key is the value,
    so it suits levels (an accuracy) and running totals (samples seen) alike; tensors and other
    number-likes are read through ``float()``, anything else is ignored."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.latest: dict[str, float] = {}

    def note(self, logs: Mapping[str, Any]) -> None:
        for key, unit in self.keys.items():
            if key in logs and not isinstance(logs[key], bool):
                try:
                    value = float(logs[key])
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    self.latest[unit] = value

    def figures(self, energy_j: float) -> dict[str, float]:
        """``<unit>_per_kwh`` for each unit logged so far (nothing before energy is metered)."""
        if energy_j <= 0:
            return {}
        return {f"{unit}_per_kwh": n / (energy_j / J_PER_KWH) for unit, n in self.latest.items()}
