"""Power traces for the fake NVML backend: P(t) in W over scenario seconds, with exact integrals.

Every trace is defined for all real t (before t=0 it holds its first value, or repeats if it is
periodic) so that trailing averages at scenario start are well defined. ``cumulative(t)`` is the
signed integral from 0 to t in joules, in closed form, so that energy counters and ground truth
cost O(1) or O(log n) per read however long the scenario has run.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from itertools import accumulate
from typing import Protocol, Sequence


class TraceError(ValueError):
    """A trace definition or replay file that cannot be used (the loader adds the field path)."""


class Trace(Protocol):
    kind: str

    def power_w(self, t: float) -> float:
        """Power at scenario time ``t`` (s)."""

    def cumulative(self, t: float) -> float:
        """Signed integral of power from 0 to ``t``, in J."""

    def integral(self, t0: float, t1: float) -> float:
        """Exact energy in J between scenario times ``t0`` and ``t1``."""


class _Base:
    kind = "base"

    def integral(self, t0: float, t1: float) -> float:
        return self.cumulative(t1) - self.cumulative(t0)  # type: ignore[attr-defined]


class ConstantTrace(_Base):
    kind = "constant"

    def __init__(self, power_w: float) -> None:
        self.value_w = float(power_w)

    def power_w(self, t: float) -> float:
        return self.value_w

    def cumulative(self, t: float) -> float:
        return self.value_w * t


class SquareTrace(_Base):
    """``high_w`` for ``high_s``, then ``low_w`` for ``low_s``, repeating; a period starts at ``phase_s``."""

    kind = "square"

    def __init__(self, high_w: float, low_w: float, high_s: float, low_s: float, phase_s: float = 0.0) -> None:
        if high_s <= 0 or low_s <= 0:
            raise TraceError("high_s and low_s must be > 0")
        self.high_w, self.low_w = float(high_w), float(low_w)
        self.high_s, self.low_s, self.phase_s = float(high_s), float(low_s), float(phase_s)
        self._period = self.high_s + self.low_s
        self._per_period_j = self.high_w * self.high_s + self.low_w * self.low_s
        self._g0 = self._g(-self.phase_s)

    def power_w(self, t: float) -> float:
        r = (t - self.phase_s) % self._period
        return self.high_w if r < self.high_s else self.low_w

    def _g(self, x: float) -> float:
        # Integral of the unshifted wave from 0 to x: whole periods plus the partial one.
        n = math.floor(x / self._period)
        r = x - n * self._period
        part = self.high_w * min(r, self.high_s) + self.low_w * max(0.0, r - self.high_s)
        return n * self._per_period_j + part

    def cumulative(self, t: float) -> float:
        return self._g(t - self.phase_s) - self._g0


class RampTrace(_Base):
    """Linear from ``from_w`` at t=0 to ``to_w`` at ``over_s``, then held (``from_w`` before 0)."""

    kind = "ramp"

    def __init__(self, from_w: float, to_w: float, over_s: float) -> None:
        if over_s <= 0:
            raise TraceError("over_s must be > 0")
        self.from_w, self.to_w, self.over_s = float(from_w), float(to_w), float(over_s)
        self._slope = (self.to_w - self.from_w) / self.over_s

    def power_w(self, t: float) -> float:
        if t <= 0:
            return self.from_w
        if t >= self.over_s:
            return self.to_w
        return self.from_w + self._slope * t

    def cumulative(self, t: float) -> float:
        if t <= 0:
            return self.from_w * t
        if t <= self.over_s:
            return self.from_w * t + 0.5 * self._slope * t * t
        ramp_j = 0.5 * (self.from_w + self.to_w) * self.over_s
        return ramp_j + self.to_w * (t - self.over_s)


class StepsTrace(_Base):
    """Piecewise constant: ``points`` = [(t_s, power_w), ...], each value held until the next point."""

    kind = "steps"

    def __init__(self, points: Sequence[tuple[float, float]]) -> None:
        if not points:
            raise TraceError("points must hold at least one [t_s, power_w] pair")
        self._ts = [float(t) for t, _ in points]
        self._ps = [float(p) for _, p in points]
        if any(b <= a for a, b in zip(self._ts, self._ts[1:])):
            raise TraceError("point times must be strictly increasing")
        # _cum[i] = integral from ts[0] to ts[i]
        widths = [(b - a) * p for a, b, p in zip(self._ts, self._ts[1:], self._ps)]
        self._cum = [0.0, *accumulate(widths)]
        self._h0 = self._h(0.0)

    @property
    def points(self) -> list[tuple[float, float]]:
        return list(zip(self._ts, self._ps))

    def power_w(self, t: float) -> float:
        i = bisect_right(self._ts, t) - 1
        return self._ps[max(i, 0)]

    def _h(self, t: float) -> float:
        i = bisect_right(self._ts, t) - 1
        if i < 0:
            return self._ps[0] * (t - self._ts[0])
        return self._cum[i] + self._ps[i] * (t - self._ts[i])

    def cumulative(self, t: float) -> float:
        return self._h(t) - self._h0


class PiecewiseLinearTrace(_Base):
    """Linear interpolation between samples (the ``replay`` kind).

    Without ``loop`` the first/last values are held outside the samples. With ``loop`` the trace
    repeats with period (last - first + one median sample interval), ramping from the last sample
    back to the first over that extra interval, so the loop seam has no jump.
    """

    kind = "replay"

    def __init__(self, times_s: Sequence[float], powers_w: Sequence[float], loop: bool = False) -> None:
        if not times_s or len(times_s) != len(powers_w):
            raise TraceError("needs at least one sample")
        ts, ps = [float(t) for t in times_s], [float(p) for p in powers_w]
        if any(b <= a for a, b in zip(ts, ts[1:])):
            raise TraceError("sample times must be strictly increasing")
        self.loop = bool(loop) and len(ts) >= 2
        if self.loop:
            import statistics  # lazy: ~2 ms of imports (fractions, decimal) that only looping replays need

            gap = statistics.median(b - a for a, b in zip(ts, ts[1:]))
            ts.append(ts[-1] + gap)
            ps.append(ps[0])
        self._ts, self._ps = ts, ps
        self._slopes = [(p1 - p0) / (t1 - t0) for t0, t1, p0, p1 in zip(ts, ts[1:], ps, ps[1:])]
        trapezoids = [0.5 * (p0 + p1) * (t1 - t0) for t0, t1, p0, p1 in zip(ts, ts[1:], ps, ps[1:])]
        self._cum = [0.0, *accumulate(trapezoids)]
        self.period_s = ts[-1] - ts[0] if self.loop else math.inf
        self._h0 = self._h(0.0)

    @property
    def samples(self) -> list[tuple[float, float]]:
        n = len(self._ts) - (1 if self.loop else 0)
        return list(zip(self._ts[:n], self._ps[:n]))

    def _wrap(self, t: float) -> tuple[int, float]:
        """(whole periods, time inside the sample span)."""
        if not self.loop:
            return 0, t
        n = math.floor((t - self._ts[0]) / self.period_s)
        return n, t - n * self.period_s

    def power_w(self, t: float) -> float:
        _, u = self._wrap(t)
        i = bisect_right(self._ts, u) - 1
        if i < 0:
            return self._ps[0]
        if i >= len(self._slopes):
            return self._ps[-1]
        return self._ps[i] + self._slopes[i] * (u - self._ts[i])

    def _h(self, t: float) -> float:
        # Integral from ts[0] to t.
        n, u = self._wrap(t)
        base = n * self._cum[-1]
        i = bisect_right(self._ts, u) - 1
        if i < 0:
            return base + self._ps[0] * (u - self._ts[0])
        if i >= len(self._slopes):
            return base + self._cum[-1] + self._ps[-1] * (u - self._ts[-1])
        du = u - self._ts[i]
        return base + self._cum[i] + self._ps[i] * du + 0.5 * self._slopes[i] * du * du

    def cumulative(self, t: float) -> float:
        return self._h(t) - self._h0


# --- nvidia-smi CSV replay -------------------------------------------------------------------

_POWER_COLUMNS = ("power.draw [w]", "power.draw", "power.draw.instant [w]", "power.draw.average [w]")
_MISSING = ("[n/a]", "n/a", "[not supported]", "[unknown error]", "")


def _parse_timestamp(text: str) -> float:
    from datetime import datetime  # lazy: only nvidia-smi replays parse timestamps

    epoch = datetime(1970, 1, 1)
    for fmt in ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
        try:
            # Naive wall time, no time zone: only differences matter, and a local zone would
            # jump at DST changes. Seconds since 1970 as a float keep about 0.2 us.
            return (datetime.strptime(text, fmt) - epoch).total_seconds()
        except ValueError:
            continue
    raise TraceError(f"bad timestamp {text!r}; expected like '2024/05/01 12:00:00.123'")


def parse_smi_csv(text: str, index: int = 0, source: str = "csv") -> tuple[list[float], list[float]]:
    """Parse an ``nvidia-smi --query-gpu=timestamp,index,power.draw --format=csv`` log.

    Returns (times relative to the first kept sample in s, power in W) for GPU ``index``. Rows
    whose power is ``[N/A]`` are skipped (nvidia-smi prints that for a GPU that cannot report);
    repeated timestamps keep the first row. A header is optional (``noheader`` logs are read as
    timestamp, index, power columns); units are optional (``nounits``).
    """
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if not lines:
        raise TraceError(f"{source}: empty file")
    t_col, i_col, p_col = 0, 1, 2
    first = [c.strip().lower() for c in lines[0][1].split(",")]
    if "timestamp" in first:
        t_col = first.index("timestamp")
        i_col = first.index("index") if "index" in first else -1
        p_col = next((first.index(c) for c in _POWER_COLUMNS if c in first), -1)
        if p_col < 0:
            raise TraceError(f"{source}: no power.draw column in header {lines[0][1].strip()!r}")
        lines = lines[1:]
    times: list[float] = []
    powers: list[float] = []
    for lineno, line in lines:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) <= max(t_col, i_col, p_col):
            raise TraceError(f"{source} line {lineno}: expected at least {max(t_col, i_col, p_col) + 1} columns")
        if i_col >= 0:
            try:
                row_index = int(cells[i_col])
            except ValueError:
                raise TraceError(f"{source} line {lineno}: bad GPU index {cells[i_col]!r}") from None
            if row_index != index:
                continue
        raw = cells[p_col]
        if raw.lower() in _MISSING:
            continue
        try:
            power = float(raw[:-1].strip() if raw[-1:] in ("W", "w") else raw)
        except ValueError:
            raise TraceError(f"{source} line {lineno}: bad power {raw!r}; expected like '312.45 W'") from None
        if power < 0 or not math.isfinite(power):
            raise TraceError(f"{source} line {lineno}: power {raw!r} must be a finite value >= 0")
        try:
            t = _parse_timestamp(cells[t_col])
        except TraceError as exc:
            raise TraceError(f"{source} line {lineno}: {exc}") from None
        if times and t < times[-1]:
            raise TraceError(f"{source} line {lineno}: timestamp goes backwards; sort the log by time")
        if times and t == times[-1]:
            continue
        times.append(t)
        powers.append(power)
    if not times:
        raise TraceError(f"{source}: no power samples for GPU index {index}")
    t0 = times[0]
    return [round(t - t0, 6) for t in times], powers   # nvidia-smi stamps have ms resolution
