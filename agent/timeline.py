"""A downsampled power timeline per device, read from the ledger's one energy function E(t).

Each span holds a device's mean power between two points, taken as energy differences of the
ledger (``energy_between`` while the history is settled, ``values_at`` at the end). ``finish``
anchors every device to the energy its window recorded, so the timeline integrates to the
record's energy (the spans only shape it). Merging old spans keeps the energy under the curve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


MAX_POINTS = 240
PEAK_MIN_SPAN_S = 0.5     # a shorter span (the run's tail) is too short to be a 1 s mean power


@dataclass
class Timeline:
    t0: float
    max_points: int = MAX_POINTS
    t_s: list[float] = field(default_factory=list)          # end of each span, relative to t0
    power_w: dict[str, list[float]] = field(default_factory=dict)
    _spans: list[float] = field(default_factory=list)
    _t: float | None = None                                  # absolute time of the last point
    _peak_w: dict[str, float] = field(default_factory=dict)

    @property
    def last_t(self) -> float:
        return self.t0 if self._t is None else self._t

    def add_span(self, t: float, energy_j: Mapping[str, float]) -> None:
        """One span from the last point to t, with each device's energy over it (J)."""
        dt = t - self.last_t
        if dt <= 0:
            return
        self.t_s.append(t - self.t0)
        self._spans.append(dt)
        for k, e in energy_j.items():
            series = self.power_w.setdefault(k, [0.0] * (len(self.t_s) - 1))
            watts = max(0.0, e) / dt
            series.append(watts)
            if dt >= PEAK_MIN_SPAN_S:
                self._peak_w[k] = max(self._peak_w.get(k, 0.0), watts)
        for series in self.power_w.values():    # a device with no value for this span
            if len(series) < len(self.t_s):
                series.append(0.0)
        self._t = t
        if len(self.t_s) > self.max_points:
            self._halve()

    def energy_j(self, key: str) -> float:
        return sum(w * s for w, s in zip(self.power_w.get(key, ()), self._spans))

    def finish(self, totals_j: Mapping[str, float]) -> None:
        """Anchor each device's curve to its recorded energy: the shape stays, the integral is exact."""
        duration = sum(self._spans)
        for k, total in totals_j.items():
            series = self.power_w.get(k)
            if series is None or duration <= 0:
                continue
            have = self.energy_j(k)
            if have > 0:
                f = total / have
                self.power_w[k] = [w * f for w in series]
                if k in self._peak_w:
                    self._peak_w[k] *= f
            else:
                self.power_w[k] = [total / duration] * len(series)

    def peak_w(self, key: str) -> float | None:
        """Highest mean power over a span of at least PEAK_MIN_SPAN_S (before any merging)."""
        return self._peak_w.get(key)

    def _halve(self) -> None:
        # Merge neighbouring pairs, weighting by span, so energy under the curve is kept.
        n = len(self.t_s) // 2 * 2
        t_s, spans, power = [], [], {k: [] for k in self.power_w}
        for i in range(0, n, 2):
            a, b = self._spans[i], self._spans[i + 1]
            t_s.append(self.t_s[i + 1])
            spans.append(a + b)
            for k, series in self.power_w.items():
                power[k].append((series[i] * a + series[i + 1] * b) / (a + b))
        if n < len(self.t_s):
            t_s.append(self.t_s[-1])
            spans.append(self._spans[-1])
            for k, series in self.power_w.items():
                power[k].append(series[-1])
        self.t_s, self._spans, self.power_w = t_s, spans, power

    def to_record(self) -> dict:
        return {"t_s": [round(t, 3) for t in self.t_s],
                "power_w": {k: [round(w, 3) for w in v] for k, v in self.power_w.items()}}
