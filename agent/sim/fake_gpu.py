"""One simulated GPU: what its driver would report at scenario time t.

Every reading is a pure function of t (the trace, the refresh grids and the faults), so readers
on several threads need no lock; small caches keyed by the refresh tick only skip recomputation.
Values follow the driver's timing, not the trace's: a counter moves only at refresh instants, an
averaged power lags by its window, and so on (docs/fake-nvml.md, "Timing").
"""
from __future__ import annotations

import math
from bisect import bisect_right
from typing import Sequence

from .scenario import CALL_FAULT_KINDS, FaultSpec, GpuSpec, ProcessSpec

_EPS = 1e-9  # an instant within 1 ns after a refresh tick counts as on it (float noise in t)

# (max SM clock, memory clock) in MHz, by architecture: what GetClockInfo reports when busy.
_CLOCKS = {"pascal": (1480, 715), "volta": (1530, 877), "turing": (1590, 5001), "ampere": (1695, 7601),
           "ga100": (1410, 1593), "ada": (2040, 9001), "hopper": (1980, 2619), "blackwell": (1965, 3996)}
IDLE_SM_CLOCK_MHZ = 345


class Grid:
    """Refresh instants phase + k * period; ``tick(t)`` is the index of the last one <= t."""

    __slots__ = ("phase", "period")

    def __init__(self, phase: float, period: float) -> None:
        self.phase = phase % period
        self.period = period

    def tick(self, t: float) -> int:
        return math.floor((t - self.phase) / self.period + _EPS)

    def at(self, k: int) -> float:
        return self.phase + k * self.period


class JitteredGrid(Grid):
    """Refresh k lands at phase + k * period + u_k, u_k uniform in [-jitter, jitter] and a pure
    function of k (a real counter's refreshes wander: +-2.5 ms on an H100)."""

    __slots__ = ("jitter", "seed")

    def __init__(self, phase: float, period: float, jitter: float, seed: int) -> None:
        super().__init__(phase, period)
        self.jitter = min(jitter, 0.45 * period)   # refreshes never swap order
        self.seed = seed

    def _u(self, k: int) -> float:
        x = (k * 0x9E3779B97F4A7C15 + self.seed) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
        return (x / 2.0 ** 64 * 2.0 - 1.0) * self.jitter

    def at(self, k: int) -> float:
        return self.phase + k * self.period + self._u(k)

    def tick(self, t: float) -> int:
        k = super().tick(t)
        while self.at(k) > t + _EPS:
            k -= 1
        while self.at(k + 1) <= t + _EPS:
            k += 1
        return k


class SimGpu:
    def __init__(self, spec: GpuSpec, faults: Sequence[FaultSpec]) -> None:
        self.spec = spec
        self.trace = spec.trace
        s = spec.sensor
        self.counter_grid = (JitteredGrid(s.counter_phase_s, s.counter_refresh_s, s.counter_jitter_s, spec.index)
                             if s.counter_jitter_s > 0 else Grid(s.counter_phase_s, s.counter_refresh_s))
        self.power_grid = Grid(s.counter_phase_s, s.power_refresh_s)
        self.instant_grid = Grid(s.counter_phase_s, s.instant_refresh_s)
        self.util_grid = Grid(s.counter_phase_s, s.util_refresh_s)
        self.averaged = s.power_usage == "average_1s"
        self.average_window_s = s.average_window_s
        self.instant_sampled = s.instant_kind == "sample"
        self.offset_mj = int(round(spec.energy_offset_j * 1000))
        # The wall-clock stamp each field took at its newest refresh: a driver stamps a value
        # once, and a system clock's offset wobbles by a microsecond between two conversions.
        self.field_stamps: dict[int, tuple[float, int]] = {}
        mine = [f for f in faults if f.gpu is None or f.gpu == spec.index]
        self.lost_windows = [(f.at_s, f.end_s) for f in mine if f.kind == "gpu_lost"]
        # The counter restarts at a reset and when a lost GPU comes back (driver reload).
        resets = [f.at_s for f in mine if f.kind == "counter_reset"]
        resets += [end for _, end in self.lost_windows if math.isfinite(end)]
        self.resets = sorted(resets)
        self._reset_cum = [self.trace.cumulative(r) for r in self.resets]
        # A stalled counter repeats its value from at_s until end_s, then catches up at once.
        self.stalls = [(f.at_s, f.end_s) for f in mine if f.kind == "counter_stall"]
        self.call_faults: dict[str, list[FaultSpec]] = {}
        for f in mine:
            if f.kind in CALL_FAULT_KINDS and f.function:
                self.call_faults.setdefault(f.function, []).append(f)
        # Caches: (key, value). A tuple is replaced whole, so a racing reader sees old or new.
        self._counter_cache: tuple[object, int] = (None, 0)
        self._power_cache: tuple[object, float] = (None, 0.0)
        self._instant_cache: tuple[object, float] = (None, 0.0)   # field 186 by its refresh tick
        self._average_cache: tuple[object, float] = (None, 0.0)   # field 185 by the power tick
        self._latency: dict[str, float] = {}     # per function: spec.sensor.latency_s, summed once

    def latency_s(self, function: str) -> float:
        """The simulated duration of a call to ``function`` (the spec's, looked up once)."""
        d = self._latency.get(function)
        if d is None:
            d = self._latency[function] = self.spec.sensor.latency_s(function)
        return d

    # -- faults ------------------------------------------------------------------------------
    def is_lost(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.lost_windows)

    def call_fault(self, function: str, t: float, kind: str) -> FaultSpec | None:
        for f in self.call_faults.get(function, ()):
            if f.kind == kind and f.active(t):
                return f
        return None

    # -- energy --------------------------------------------------------------------------------
    def stalled_at(self, t: float) -> float:
        """The instant whose counter value a read at t shows: t, or the start of a stall around t."""
        for a, b in self.stalls:
            if a <= t < b:
                return a
        return t

    def energy_mj(self, t: float) -> int:
        """The energy counter at t: offset + integral up to the last refresh, restarting at resets."""
        if self.stalls:
            t = self.stalled_at(t)
        k = self.counter_grid.tick(t)
        n = bisect_right(self.resets, t)
        key = (k, n)
        cached = self._counter_cache
        if cached[0] == key:
            return cached[1]
        r = self.counter_grid.at(k)
        if n == 0:
            value = self.offset_mj + math.floor(self.trace.cumulative(r) * 1000.0)
        else:
            base = self.resets[n - 1]
            value = math.floor((self.trace.cumulative(max(r, base)) - self._reset_cum[n - 1]) * 1000.0)
        value = max(0, value)
        self._counter_cache = (key, value)
        return value

    # -- power ---------------------------------------------------------------------------------
    def _box_mean(self, end: float, width: float) -> float:
        return self.trace.integral(end - width, end) / width

    def power_usage(self, t: float) -> tuple[float, float]:
        """(W, refresh instant) as nvmlDeviceGetPowerUsage reports it."""
        k = self.power_grid.tick(t)
        cached = self._power_cache
        r = self.power_grid.at(k)
        if cached[0] == k:
            return cached[1], r
        value = self._box_mean(r, self.average_window_s) if self.averaged else self.trace.power_w(r)
        self._power_cache = (k, value)
        return value, r

    def power_average_1s(self, t: float) -> tuple[float, float]:
        """Field 185: the trailing mean (over average_window_s, 1 s) before the last power refresh.
        The same value and refresh instant as GetPowerUsage in ``average_1s`` mode."""
        grid = self.power_grid       # a plain Grid: tick() and at() inlined (~10 Hz x 8 GPUs)
        k = math.floor((t - grid.phase) / grid.period + _EPS)
        r = grid.phase + k * grid.period
        cached = self._average_cache
        if cached[0] == k:      # fast reads (edges, calibration) see one refresh many times
            return cached[1], r
        value = self._box_mean(r, self.average_window_s)
        self._average_cache = (k, value)
        return value, r

    def power_instant(self, t: float) -> tuple[float, float]:
        """Field 186 at its last refresh: a box mean over the refresh period ("box"), or the
        trace's power at the refresh instant ("sample": an instant sample that aliases)."""
        grid = self.instant_grid     # a plain Grid: tick() and at() inlined
        k = math.floor((t - grid.phase) / grid.period + _EPS)
        r = grid.phase + k * grid.period
        cached = self._instant_cache
        if cached[0] == k:
            return cached[1], r
        value = self.trace.power_w(r) if self.instant_sampled else self._box_mean(r, grid.period)
        self._instant_cache = (k, value)
        return value, r

    def load_fraction(self, t: float) -> float:
        """0 at idle power, 1 at the power limit (drives temperature, clocks, utilisation)."""
        p, _ = self.power_average_1s(t)
        spec = self.spec
        span = max(spec.power_limit_w - spec.idle_power_w, 1e-9)
        return min(1.0, max(0.0, (p - spec.idle_power_w) / span))

    # -- derived readings (rough models: metering never depends on them) --------------------------
    def utilization(self, t: float) -> tuple[int, int]:
        """(gpu %, memory %): the running processes' SM shares, else a guess from power."""
        r = self.util_grid.at(self.util_grid.tick(t))
        procs = [p for p in self.spec.processes if p.active(r)]
        if self.spec.processes:
            gpu = min(100.0, sum(p.sm_util.power_w(r) for p in procs))
        else:
            gpu = min(100.0, 125.0 * self.load_fraction(t))
        return int(round(gpu)), int(round(gpu * 0.45))

    def temperature_c(self, t: float) -> int:
        return int(round(31 + 45 * self.load_fraction(t)))

    def clock_mhz(self, clock_type: int, t: float) -> int:
        sm_max, mem = _CLOCKS[self.spec.architecture]
        if clock_type == 2:           # NVML_CLOCK_MEM
            return mem
        busy = self.load_fraction(t) > 0.02
        if clock_type in (0, 1):      # GRAPHICS, SM
            return sm_max if busy else IDLE_SM_CLOCK_MHZ
        return int(sm_max * 0.9) if busy else IDLE_SM_CLOCK_MHZ   # VIDEO

    def max_clock_mhz(self, clock_type: int) -> int:
        sm_max, mem = _CLOCKS[self.spec.architecture]
        return {2: mem, 3: int(sm_max * 0.9)}.get(clock_type, sm_max)

    def processes(self, t: float, gi_id: int | None = None) -> list[ProcessSpec]:
        return [p for p in self.spec.processes if p.active(t) and (gi_id is None or p.gi_id == gi_id)]

    def process_samples(self, t: float) -> tuple[float, list[tuple[int, int, int]]]:
        """(last util refresh instant, [(pid, sm %, mem %)]) for processes active then."""
        r = self.util_grid.at(self.util_grid.tick(t))
        out = []
        for p in self.spec.processes:
            if p.active(r):
                sm = int(round(min(100.0, p.sm_util.power_w(r))))
                out.append((p.pid, sm, int(round(sm * 0.45))))
        return r, out
