"""Cumulative energy per device: E(t) as a monotonic piecewise-linear function of time.

Counters are differenced (a decrease is a reset, a known range a wrap; never negative energy);
power readings are integrated with the trapezoid rule. Window edges are *marks*: a mark created
at time t is resolved for each device once the points around t are known, by interpolating
between them (for counters, shaped by instant power or placed on a power step). So begin/end
are O(1) and never touch a sensor.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from .counter_faults import counter_delta, flag_bridged
from .history import BACKDATE_EXACT_S, POWER_SPAN_S, DeviceHistory
from .mean_reference import MEAN_STALE_S, anchor_on_means
from .model import Component, Device, Reading, Source
from .shaping import HOLE_S, step_interpolate

__all__ = ["Ledger", "Mark", "DeviceSnapshot", "DeviceHistory", "step_interpolate", "FAULT_KINDS"]

# Errors after which a counter cannot vouch for the time since its last point: edges waiting
# on it are estimated from instant power at once (never stall a result) and flagged.
FAULT_KINDS = frozenset({"gpu_lost", "not_supported", "counter_stalled"})


@dataclass
class Mark:
    """A point in time at which every device's cumulative energy gets pinned."""

    seq: int
    t: float
    energy_j: dict[str, float] = field(default_factory=dict)
    power_w: dict[str, float] = field(default_factory=dict)   # slope at the mark (for edge extrapolation)
    errors: dict[str, int] = field(default_factory=dict)      # device error count at the mark
    extrapolated: set[str] = field(default_factory=set)
    pending: int = 0
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class DeviceSnapshot:
    device: Device
    energy_j: float           # monotonic total since the ledger started
    power_w: float | None     # most recent power estimate
    t: float | None           # time of the most recent point
    resets: int
    errors: int
    gaps_bridged: int = 0     # counter spans filled in from power (reset, lost GPU, stall, NotSupported)


class Ledger:
    """Thread-safe set of device ledgers plus the mark queue."""

    def __init__(self, devices: Iterable[Device] = ()) -> None:
        self._lock = threading.Lock()
        self._marks: deque[Mark] = deque()
        self._next_seq = 0
        self._devs: dict[str, DeviceHistory] = {}
        self._added_seq: dict[str, int] = {}   # first mark seq a device could be in (late GPUs)
        self._held: set[str] = set()           # devices whose floor this record() has held
        for d in devices:
            self.add_device(d)

    # -- devices ---------------------------------------------------------------
    def add_device(self, device: Device) -> None:
        with self._lock:
            if device.key not in self._devs:
                self._devs[device.key] = DeviceHistory(device, self._next_seq)
                self._added_seq[device.key] = self._next_seq

    def added_after(self, key: str, mark: Mark) -> bool:
        """Whether ``key`` joined after ``mark`` was taken (a GPU that came late): its energy
        starts at 0 when it joins, so that is its value at the mark."""
        with self._lock:
            return self._added_seq.get(key, -1) > mark.seq

    @property
    def devices(self) -> list[Device]:
        with self._lock:
            return [d.device for d in self._devs.values()]

    # -- input -----------------------------------------------------------------
    def record(self, readings: Iterable[Reading]) -> None:
        with self._lock:
            self._held.clear()
            for r in readings:
                self._record_one(r)
            self._trim_marks()

    def _hold(self, d: DeviceHistory, t: float) -> None:
        """``d.hold(t)`` once per device per ``record()``: no reader sees the ledger between the
        readings of one batch (the lock is held), so only what E showed before the batch can
        need holding; later holds in the batch would floor states nobody saw, and each costs an
        E(t) estimate (holds were ~40 % of the sampler's CPU)."""
        if d.device.key not in self._held:
            self._held.add(d.device.key)
            d.hold(t)

    def record_error(self, device_key: str | None, kind: str = "", t: float | None = None) -> None:
        """Count a failed read. After a fault that leaves a counter unable to vouch for the time
        since its last point (``FAULT_KINDS``), edges up to ``t`` waiting on it are estimated
        from instant power at once and flagged approximate: a lost GPU never stalls a result."""
        with self._lock:
            devs = [self._devs[device_key]] if device_key in self._devs else \
                (list(self._devs.values()) if device_key is None else [])
            for d in devs:
                d.errors += 1
                if kind in FAULT_KINDS and t is not None:
                    self._fault(d, t)
            self._trim_marks()

    def _fault(self, d: DeviceHistory, t: float) -> None:
        if d.last_t is None:
            return
        # What a snapshot showed (at the newest reading) stays the floor: the bridge re-estimates it.
        d.hold(d.newest_t())
        flag_bridged(d, d.last_t, t)
        while (m := self._next_mark(d)) is not None and m.t <= t:
            self._pin(m, d, d.energy(m.t), d.last_power or 0.0, True)
            d.cursor += 1

    def _record_one(self, r: Reading) -> None:
        d = self._devs.get(r.device_key)
        if d is None:
            return
        if r.mean_w is not None:
            self._record_mean(d, r)
            return
        if d.device.source == Source.SAMPLED and r.power_w is not None:
            d.samples.add(r.t, r.power_w)          # kept to shape edges, should a mean arrive
            if d.mean_active:
                if d.mean and r.t - d.mean.newest_t <= MEAN_STALE_S:
                    return                         # the mean has the energy
                d.mean_active = False   # the trailing mean stopped coming: integrate instant power
        if r.energy_j is None and d.device.source == Source.COUNTER:
            if r.power_w is not None and (not d.samples or r.t > d.samples.last[0]):
                if d.last_t is not None:
                    # A new sample changes how the live tail is estimated (a held value gives
                    # way to a measured one, a hole is filled): what a scrape showed up to now
                    # stays the floor of the exported total (~5 us).
                    self._hold(d, r.t)
                d.samples.add(r.t, r.power_w)      # shapes edges; the counter has the energy
                d.samples.coarse = r.instant_coarse
            return
        if d.last_t is not None and r.t <= d.last_t:
            return   # stale or duplicate timestamp: the value has not refreshed
        if r.energy_j is not None:
            if d.last_t is not None and d.samples:
                # What the live tail showed just before this point stays the floor: an
                # over-estimate is held, not taken back. (Only where instant power carries the
                # tail: a bare counter's tail is a guess that no scrape is shown.)
                self._hold(d, r.t)
            delta = counter_delta(d, r)
            d.last_counter = r.energy_j
            d.last_read_t = r.read_t
            if d.anchor_t is None:
                d.anchor_t, d.anchor_e = r.t, d.total_j
            span = r.t - d.anchor_t
            if span >= POWER_SPAN_S:
                slope = (d.total_j + delta - d.anchor_e) / span
                d.anchor_t, d.anchor_e = r.t, d.total_j + delta
            else:
                slope = d.last_power if d.last_power is not None else 0.0
            power = r.power_w if r.power_w is not None else slope
        elif r.power_w is not None:
            power = max(0.0, r.power_w)
            if d.last_t is None or d.last_power is None:
                delta = 0.0
            elif d.device.power_is_mean:
                delta = power * (r.t - d.last_t)      # the value covers the time since the last one
            else:
                delta = 0.5 * (power + d.last_power) * (r.t - d.last_t)
            slope = delta / (r.t - d.last_t) if d.last_t is not None and r.t > d.last_t else power
        else:
            return
        e_prev, t_prev = d.total_j, d.last_t
        d.total_j += delta
        d.last_power = power
        d.last_t = r.t
        d.push(r.t, d.total_j, power)
        if r.energy_j is not None and d.device.source == Source.COUNTER:
            d.counter_fit.add(r.t, d.total_j, d.fit_era())
            self._resolve_counter(d)
        else:
            # Sampled and modelled streams (even cumulative ones, like a process-tree share)
            # are smooth at the sampling scale: interpolate between the two points at once.
            self._resolve(d, t_prev, e_prev, power)

    def _record_mean(self, d: DeviceHistory, r: Reading) -> None:
        """A trailing mean: the energy reference of a GPU with no counter. Points of E sit half
        a window back (the newest instant whose whole kernel the means cover)."""
        assert r.mean_w is not None
        window = r.mean_window_s or 1.0
        if d.device.source == Source.COUNTER and d.last_t is not None:
            self._hold(d, r.t)
        d.mean.add(r.t, max(0.0, r.mean_w), window)
        if d.device.source == Source.COUNTER:
            # The counter has the energy; the mean carries E between its reads (a new mean
            # moves the tail from instant power onto it: the floor above keeps what was shown).
            return
        t_k = r.t - 0.5 * window
        if not d.mean_active:
            if d.mean.first_t > r.t - window:
                return        # one window of means first: the reference starts half a window back
            self._activate_mean(d)
            return
        raw = d.mean.energy(t_k)
        if raw is None or (d.last_t is not None and t_k <= d.last_t):
            return
        self._push_mean_point(d, t_k, d.mean_base + raw)

    def _activate_mean(self, d: DeviceHistory) -> None:
        """Switch a device to its trailing-mean reference (mean_reference.py), then re-derive
        the points after the anchor from the means."""
        if not anchor_on_means(d):
            return
        assert d.last_t is not None
        for t_m, _, _ in list(d.mean.means):
            t_k = t_m - 0.5 * d.mean.window_s
            if t_k > d.last_t:
                raw_k = d.mean.energy(t_k)
                if raw_k is not None:
                    self._push_mean_point(d, t_k, d.mean_base + raw_k)

    def _push_mean_point(self, d: DeviceHistory, t: float, e: float) -> None:
        assert d.last_t is not None
        e = max(e, d.total_j)             # E never goes backwards (an aliased kernel)
        t_prev, e_prev = d.last_t, d.total_j
        power = (e - e_prev) / (t - t_prev)
        d.total_j, d.last_t, d.last_power = e, t, power
        d.push(t, e, power)
        # Edges inside the new segment get the exact kernel value, not a straight line.
        while (m := self._next_mark(d)) is not None and m.t < t:
            exact = d.mean.energy(m.t)
            if m.t >= t_prev and exact is not None:
                value = min(max(d.mean_base + exact, e_prev), e)
                self._pin(m, d, value, power, False)
            else:
                found = d.value_at(m.t)
                self._pin(m, d, found[0] if found else e_prev, power, found[2] if found else True)
            d.cursor += 1

    def _next_mark(self, d: DeviceHistory) -> Mark | None:
        """The oldest mark this device has not resolved yet (marks are in time order)."""
        base = self._marks[0].seq if self._marks else self._next_seq
        d.cursor = max(d.cursor, base)
        return self._marks[d.cursor - base] if d.cursor < self._next_seq else None

    def _resolve(self, d: DeviceHistory, t_prev: float | None, e_prev: float, slope: float) -> None:
        while (m := self._next_mark(d)) is not None:
            if m.t >= d.last_t:  # type: ignore[operator]
                break
            if t_prev is None:
                # The device's first point is after the mark (a window opened during set-up):
                # measured back from it at its first power.
                gap = d.last_t - m.t  # type: ignore[operator]
                value, extrapolated = d.total_j - slope * gap, gap > BACKDATE_EXACT_S
            elif m.t >= t_prev:
                frac = (m.t - t_prev) / (d.last_t - t_prev)  # type: ignore[operator]
                value, extrapolated = e_prev + (d.total_j - e_prev) * frac, False
            else:
                found = d.value_at(m.t)
                value, extrapolated = (found[0], found[2]) if found else (e_prev, True)
            self._pin(m, d, value, slope, extrapolated)
            d.cursor += 1

    def _resolve_counter(self, d: DeviceHistory) -> None:
        """Counters: a mark in the newest segment resolves at once when instant power shapes
        that segment; otherwise it waits one more point, so the slopes on both sides are known
        and the edge can be placed on a power step (see step_interpolate)."""
        self._resolve_before_first(d)
        k = d.n - 1
        if k < 1:
            return
        t_a = d.point(k - 1)[0]
        t_b = d.last_t
        while (m := self._next_mark(d)) is not None:
            if m.t >= t_b:  # type: ignore[operator]
                break
            if m.t >= t_a:
                value = d.counter_value(k - 1, m.t, allow_step=False)
                if value is None:
                    break               # wait for the next point
                extrapolated = False
            else:
                found = d.value_at(m.t)
                value, extrapolated = (found[0], found[2]) if found else (d.point(k - 1)[1], True)
            self._pin(m, d, value, d.last_power or 0.0, extrapolated)
            d.cursor += 1

    def _resolve_before_first(self, d: DeviceHistory) -> None:
        """Marks before a counter's first point (a window opened while the meter was still
        starting) are measured back from the first readings (``DeviceHistory.back_energy``);
        with neither instant power nor a second counter point yet, they wait."""
        if d.oldest() != 0:
            return
        t_first = d.point(0)[0]
        while (m := self._next_mark(d)) is not None and m.t < t_first:
            found = d.value_at(m.t)
            if found is None or (found[2] and d.back_energy(m.t) is None):
                return
            self._pin(m, d, found[0], found[1], found[2])
            d.cursor += 1

    def _pin(self, m: Mark, d: DeviceHistory, value: float, slope: float, extrapolated: bool) -> None:
        key = d.device.key
        if key in m.energy_j:
            return
        m.energy_j[key] = value
        m.power_w[key] = slope
        if extrapolated:
            m.extrapolated.add(key)
        m.pending -= 1
        if m.pending <= 0:
            m.done.set()

    def _trim_marks(self) -> None:
        while self._marks and self._marks[0].pending <= 0:
            self._marks.popleft()

    # -- marks -----------------------------------------------------------------
    def mark(self, t: float) -> Mark:
        """Pin every device's energy at time t (resolved as later points arrive)."""
        with self._lock:
            if self._marks and t < self._marks[-1].t:
                t = self._marks[-1].t   # keep marks ordered when threads race on the clock
            m = Mark(seq=self._next_seq, t=t, pending=len(self._devs))
            self._next_seq += 1
            for d in self._devs.values():
                m.errors[d.device.key] = d.errors   # errors seen up to the mark, for the approximate flag
                if d.last_t is not None and t < d.last_t:
                    # The device already has a point past t (estimated refresh times can run
                    # ahead, or the window opened before the meter started). Before the first
                    # point and not yet measurable back: resolved as readings come.
                    found = d.value_at(t)
                    if found is not None and not (found[2] and t < d.point(d.oldest())[0]):
                        self._pin(m, d, found[0], found[1], found[2])
            if m.pending <= 0:
                m.done.set()
            else:
                self._marks.append(m)
            return m

    def force_resolve(self, m: Mark) -> None:
        """Give up waiting: estimate each unresolved device at the mark (instant power carries a
        counter past its last point; else the last power is held) and flag it approximate."""
        with self._lock:
            for d in self._devs.values():
                if d.device.key in m.energy_j:
                    continue
                if d.last_t is None:
                    self._pin(m, d, 0.0, 0.0, True)
                    continue
                _, extrapolated = d.estimate_at(m.t)
                self._pin(m, d, d.energy(m.t), d.last_power or 0.0, extrapolated)
            self._trim_marks()

    def force_resolve_all(self) -> None:
        """Resolve every waiting mark now (the sampler has stopped)."""
        for m in list(self._marks):
            self.force_resolve(m)

    def pending_marks(self) -> int:
        with self._lock:
            return len(self._marks)

    def unresolved(self, keys: frozenset[str]) -> bool:
        """Whether any mark still waits for one of these devices (drives a sensor's fast reads)."""
        with self._lock:
            return any(k not in m.energy_j for m in self._marks for k in keys)

    def peak_power_w(self, key: str, t0: float, t1: float) -> float | None:
        """The largest power over [t0, t1]: history points and instant samples, never below the
        window's average (a counter's mean is a power the device reached)."""
        with self._lock:
            d = self._devs.get(key)
            if d is None:
                return None
            return d.peak_power(t0, t1)

    def approximate_between(self, key: str, t0: float, t1: float) -> bool:
        """Whether [t0, t1] of this device is an estimate: a bridged span (reset, lost GPU,
        stall, NotSupported) overlaps it, or a GPU is measured from instant samples alone
        (no counter, no trailing mean: a sampled power aliases with periodic loads)."""
        with self._lock:
            d = self._devs.get(key)
            if d is None:
                return False
            instant_only = (d.device.component == Component.GPU and d.device.source == Source.SAMPLED
                            and not (d.mean_active and d.mean_from_t <= t0))
            return instant_only or d.approximate_between(t0, t1)

    # -- output ----------------------------------------------------------------
    def snapshot(self, t: float | None = None) -> dict[str, DeviceSnapshot]:
        """Monotonic totals per device at time t (default: the newest reading), safe to export
        as Prometheus counters. A pure read: between counter reads the total advances with
        the trailing mean fitted to recent counter points (else instant power), and holds
        where a reading corrected it downwards (``DeviceHistory.energy``)."""
        with self._lock:
            out = {}
            for k, d in self._devs.items():
                at = t
                if at is None:
                    at = d.newest_t()
                power = d.samples.last[1] if d.samples else d.last_power
                e = d.energy(at) if d.last_t is not None else 0.0
                out[k] = DeviceSnapshot(d.device, e, power, d.last_t, d.resets, d.errors, d.bridges)
            return out

    def energy_at(self, key: str, t: float) -> float | None:
        """E(t): the device's cumulative energy at t, the one function every figure reads
        (exact inside the history; past the last point, carried forward by instant power)."""
        with self._lock:
            d = self._devs.get(key)
            if d is None or d.last_t is None:
                return None
            return d.energy(t)

    def values_at(self, t: float) -> dict[str, float]:
        """Each device's E(t) (see ``energy_at``); devices with no point yet are left out."""
        with self._lock:
            return {k: d.energy(t) for k, d in self._devs.items() if d.last_t is not None}

    def power_timeline(self, key: str, t0: float, t1: float, step_s: float = 1.0) -> list[tuple[float, float, float]]:
        """[(start, end, mean power_w)] tiling [t0, t1] in steps of ``step_s``: each step's power
        is its energy from E(t), so the timeline integrates to E(t1) - E(t0) exactly."""
        if step_s <= 0:
            raise ValueError(f"step_s must be > 0, got {step_s}")
        with self._lock:
            d = self._devs.get(key)
            if d is None or d.last_t is None or t1 <= t0:
                return []
            return d.timeline(t0, t1, step_s)

    def energy_between(self, key: str, t0: float, t1: float) -> float | None:
        """Energy of one device between two times still inside its history."""
        with self._lock:
            d = self._devs.get(key)
            if d is None:
                return None
            a, b = d.value_at(t0), d.value_at(t1)
            if a is None or b is None:
                return None
            return b[0] - a[0]
