"""A downsampled power timeline per device, built from ledger snapshots (for records and plots)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


MAX_POINTS = 240


@dataclass
class Timeline:
    t0: float
    max_points: int = MAX_POINTS
    t_s: list[float] = field(default_factory=list)
    power_w: dict[str, list[float]] = field(default_factory=dict)
    _last_t: float | None = None
    _last_e: dict[str, float] = field(default_factory=dict)
    _spans: list[float] = field(default_factory=list)

    def add(self, t: float, energy_j: Mapping[str, float]) -> None:
        """Add the average power since the previous point, merging old points to stay bounded.
        ``energy_j`` is each device's cumulative energy at time t (``Ledger.values_at``)."""
        if self._last_t is None:
            self._last_t, self._last_e = t, dict(energy_j)
            return
        dt = t - self._last_t
        if dt <= 0:
            return
        self.t_s.append(round(t - self.t0, 3))
        self._spans.append(dt)
        for k, e in energy_j.items():
            watts = (e - self._last_e.get(k, e)) / dt
            series = self.power_w.setdefault(k, [0.0] * (len(self.t_s) - 1))
            series.append(round(watts, 2))
        self._last_t, self._last_e = t, dict(energy_j)
        if len(self.t_s) > self.max_points:
            self._halve()

    def _halve(self) -> None:
        # Merge neighbouring pairs, weighting by span, so energy under the curve is kept.
        n = len(self.t_s) // 2 * 2
        t_s, spans, power = [], [], {k: [] for k in self.power_w}
        for i in range(0, n, 2):
            a, b = self._spans[i], self._spans[i + 1]
            t_s.append(self.t_s[i + 1])
            spans.append(a + b)
            for k, series in self.power_w.items():
                power[k].append(round((series[i] * a + series[i + 1] * b) / (a + b), 2))
        if n < len(self.t_s):
            t_s.append(self.t_s[-1])
            spans.append(self._spans[-1])
            for k, series in self.power_w.items():
                power[k].append(series[-1])
        self.t_s, self._spans, self.power_w = t_s, spans, power

    def to_record(self) -> dict:
        return {"t_s": list(self.t_s), "power_w": {k: list(v) for k, v in self.power_w.items()}}
