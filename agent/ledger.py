"""Cumulative energy per device: E(t) as a monotonic piecewise-linear function of time.

Counters are differenced (a decrease is a reset, a known range a wrap; never negative energy);
power readings are integrated with the trapezoid rule. Window edges are *marks*: a mark created
at time t is resolved for each device once the points around t are known, by interpolating
between them (for counters, shaped by instant power or placed on a power step). So begin/end
are O(1) and never touch a sensor.
"""
from __future__ import annotations

import math
import threading
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from .model import Device, Reading, Source

RING_POINTS = 4096        # fine history per device (~7 min at 10 Hz)
BLOCK_POINTS = 64         # fine points per coarse peak-power block
SHAPE_SAMPLES = 512       # instant-power samples kept per counter device (~25 s at 20 Hz)
SHAPE_GAP_S = 0.15        # shape samples this dense (20 Hz, jittered) shape a counter segment
TAIL_MAX_S = 0.5          # an edge this close to the next counter read uses the measured tail
TAIL_GAP_S = 0.06         # ...when instant power was read at least this often
POWER_SPAN_S = 1.0        # counter power is the slope over at least this long (refresh-time noise)
RING_BLOCKS = 4096        # coarse history per device (~7 h at 10 Hz)
SAME_VALUE_S = 0.0005     # shape samples closer than this are one value read twice
MIN_BOX_S, MAX_BOX_S = 0.005, 0.05   # a short-window power field's refresh box (H100: 20 ms)


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


class _DeviceLedger:
    __slots__ = ("device", "t", "e", "p", "n", "total_j", "last_counter", "last_power", "last_t",
                 "resets", "errors", "cursor", "blk_t0", "blk_t1", "blk_max", "blk_n", "cur_max",
                 "cur_t0", "cur_count", "anchor_t", "anchor_e", "shape", "exported_j", "last_read_t")

    def __init__(self, device: Device, cursor: int) -> None:
        self.device = device
        self.t = array("d", bytes(8 * RING_POINTS))
        self.e = array("d", bytes(8 * RING_POINTS))
        self.p = array("d", bytes(8 * RING_POINTS))
        self.n = 0                      # points ever appended
        self.total_j = 0.0
        self.last_counter: float | None = None
        self.last_power: float | None = None
        self.last_t: float | None = None
        self.resets = 0
        self.errors = 0
        self.cursor = cursor            # next mark seq this device has not resolved
        self.blk_t0 = array("d", bytes(8 * RING_BLOCKS))
        self.blk_t1 = array("d", bytes(8 * RING_BLOCKS))
        self.blk_max = array("d", bytes(8 * RING_BLOCKS))
        self.blk_n = 0
        self.cur_max = -math.inf
        self.cur_t0 = 0.0
        self.cur_count = 0
        self.anchor_t: float | None = None
        self.anchor_e = 0.0
        self.shape: deque[tuple[float, float]] = deque(maxlen=SHAPE_SAMPLES)
        self.exported_j = 0.0           # high-water mark of what snapshots reported
        self.last_read_t: float | None = None   # when the last counter value was read

    # -- history -------------------------------------------------------------
    def point(self, k: int) -> tuple[float, float, float]:
        i = k % RING_POINTS
        return self.t[i], self.e[i], self.p[i]

    def oldest(self) -> int:
        return max(0, self.n - RING_POINTS)

    def value_at(self, t: float) -> tuple[float, float, bool] | None:
        """(energy, slope, extrapolated) at t from history; None if t is after the last point."""
        if self.n == 0 or t > self.last_t:  # type: ignore[operator]
            return None
        lo, hi = self.oldest(), self.n - 1
        t_lo = self.point(lo)[0]
        if t <= t_lo:
            _, e_lo, p_lo = self.point(lo)
            return e_lo, p_lo, t < t_lo
        while hi - lo > 1:   # binary search over the ring's logical indices
            mid = (lo + hi) // 2
            if self.point(mid)[0] < t:
                lo = mid
            else:
                hi = mid
        t0, e0, _ = self.point(lo)
        t1, e1, p1 = self.point(hi)
        if self.device.source == Source.COUNTER:
            value = self.counter_value(lo, t, allow_step=True)
            if value is not None:
                return value, p1, False
        frac = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        return e0 + (e1 - e0) * frac, p1, False

    def peak_w(self, t0: float, t1: float) -> float | None:
        """Highest power seen between t0 and t1: fine points when still held, else coarse blocks."""
        best = -math.inf
        oldest = self.oldest()
        if self.n and self.point(oldest)[0] <= t0:
            for k in range(self.n - 1, oldest, -1):
                tk, _, pk = self.point(k)
                t_prev = self.point(k - 1)[0]
                if t_prev < t1 and tk > t0:   # segment (t_prev, tk] overlaps the window
                    best = max(best, pk)
                if t_prev <= t0:
                    break
        else:
            for b in range(max(0, self.blk_n - RING_BLOCKS), self.blk_n):
                i = b % RING_BLOCKS
                if self.blk_t1[i] >= t0 and self.blk_t0[i] <= t1:
                    best = max(best, self.blk_max[i])
            for k in range(max(oldest, self.n - self.cur_count), self.n):
                tk, _, pk = self.point(k)
                if t0 <= tk <= t1:
                    best = max(best, pk)
        return None if best == -math.inf else best

    def counter_value(self, k: int, t: float, allow_step: bool) -> float | None:
        """Energy at t inside the counter segment from point k to k+1: shaped by instant power
        when it covers the segment, else (``allow_step``) on a step between the neighbouring
        slopes; None when neither is possible yet."""
        t0, e0, _ = self.point(k)
        t1, e1, _ = self.point(k + 1)
        if t1 <= t0:
            return e1
        if t1 - t <= TAIL_MAX_S:
            # The sampler reads instant power every few ms after an edge and schedules a
            # counter read at the next refresh: the short tail to it is measured directly.
            tail = self.shape_energy(t, t1, TAIL_GAP_S)
            if tail is not None:
                return min(max(e1 - tail, e0), e1)
        whole = self.shape_energy(t0, t1)
        if whole is not None and whole > 0:
            part = self.shape_energy(t0, t) or 0.0
            return e0 + (e1 - e0) * min(1.0, max(0.0, part / whole))
        if not allow_step:
            return None
        low = high = None
        if k > self.oldest():
            tb, eb, _ = self.point(k - 1)
            low = (e0 - eb) / (t0 - tb) if t0 > tb else None
        if k + 2 < self.n:
            ta, ea, _ = self.point(k + 2)
            high = (ea - e1) / (ta - t1) if ta > t1 else None
        return step_interpolate(t0, e0, t1, e1, t, low, high)

    def shape_energy(self, a: float, b: float, gap: float = 0.0) -> float | None:
        """Energy from a to b from instant-power samples, or None unless the samples cover
        [a, b] with no hole wider than ``gap``. Each value counts as the mean power since the
        previous sample's time (NVML dates field values when they were taken): exact for a
        short-window average read at every refresh, half a read interval off for a truly
        instantaneous value. The last value is held forward."""
        gap = gap or SHAPE_GAP_S
        pts: list[tuple[float, float]] = []
        for t, w in self.shape:
            if a - gap <= t <= b + gap and not (pts and t - pts[-1][0] < SAME_VALUE_S):
                pts.append((t, w))       # one value read twice is dated twice, a hair apart
        if not pts or pts[0][0] > a + gap or pts[-1][0] < b - gap:
            return None
        if any(t1 - t0 > gap for (t0, _), (t1, _) in zip(pts, pts[1:])):
            return None
        energy, t_prev = 0.0, a
        for t, w in pts:
            if t > t_prev:
                energy += w * (min(t, b) - t_prev)
                t_prev = min(t, b)
            if t >= b:
                break
        if t_prev < b:
            energy += pts[-1][1] * (b - t_prev)
        return energy + _partial_box_correction(pts, a, b)

    def push(self, t: float, e: float, p: float) -> None:
        i = self.n % RING_POINTS
        self.t[i], self.e[i], self.p[i] = t, e, p
        self.n += 1
        if self.cur_count == 0:
            self.cur_t0 = t
        self.cur_count += 1
        if p > self.cur_max:
            self.cur_max = p
        if self.cur_count == BLOCK_POINTS:
            j = self.blk_n % RING_BLOCKS
            self.blk_t0[j], self.blk_t1[j], self.blk_max[j] = self.cur_t0, t, self.cur_max
            self.blk_n += 1
            self.cur_count, self.cur_max = 0, -math.inf


class Ledger:
    """Thread-safe set of device ledgers plus the mark queue."""

    def __init__(self, devices: Iterable[Device] = ()) -> None:
        self._lock = threading.Lock()
        self._marks: deque[Mark] = deque()
        self._next_seq = 0
        self._devs: dict[str, _DeviceLedger] = {}
        self._added_seq: dict[str, int] = {}   # first mark seq a device could be in (late GPUs)
        for d in devices:
            self.add_device(d)

    # -- devices ---------------------------------------------------------------
    def add_device(self, device: Device) -> None:
        with self._lock:
            if device.key not in self._devs:
                self._devs[device.key] = _DeviceLedger(device, self._next_seq)
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
            for r in readings:
                self._record_one(r)
            self._trim_marks()

    def record_error(self, device_key: str | None) -> None:
        with self._lock:
            if device_key in self._devs:
                self._devs[device_key].errors += 1  # type: ignore[index]
            else:
                for d in self._devs.values():
                    d.errors += 1

    def _record_one(self, r: Reading) -> None:
        d = self._devs.get(r.device_key)
        if d is None:
            return
        if r.energy_j is None and d.device.source == Source.COUNTER:
            if r.power_w is not None and (not d.shape or r.t > d.shape[-1][0]):
                d.shape.append((r.t, r.power_w))   # shapes edges; the counter has the energy
            return
        if d.last_t is not None and r.t <= d.last_t:
            return   # stale or duplicate timestamp: the value has not refreshed
        if r.energy_j is not None:
            if d.last_counter is None:
                delta = 0.0
            elif r.energy_j >= d.last_counter:
                delta = r.energy_j - d.last_counter
            elif d.device.wrap_j:
                delta = r.energy_j + d.device.wrap_j - d.last_counter   # wrapped past its range
            else:
                # A counter that went down was reset (driver reload, GPU back from the bus):
                # what it holds now was burned since the reset.
                d.resets += 1
                delta = r.energy_j
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
            self._resolve_counter(d)
        else:
            # Sampled and modelled streams (even cumulative ones, like a process-tree share)
            # are smooth at the sampling scale: interpolate between the two points at once.
            self._resolve(d, t_prev, e_prev, power)

    def _next_mark(self, d: _DeviceLedger) -> Mark | None:
        """The oldest mark this device has not resolved yet (marks are in time order)."""
        base = self._marks[0].seq if self._marks else self._next_seq
        d.cursor = max(d.cursor, base)
        return self._marks[d.cursor - base] if d.cursor < self._next_seq else None

    def _resolve(self, d: _DeviceLedger, t_prev: float | None, e_prev: float, slope: float) -> None:
        while (m := self._next_mark(d)) is not None:
            if m.t >= d.last_t:  # type: ignore[operator]
                break
            if t_prev is None:
                value, extrapolated = d.total_j, True        # device's first point is after the mark
            elif m.t >= t_prev:
                frac = (m.t - t_prev) / (d.last_t - t_prev)  # type: ignore[operator]
                value, extrapolated = e_prev + (d.total_j - e_prev) * frac, False
            else:
                found = d.value_at(m.t)
                value, extrapolated = (found[0], found[2]) if found else (e_prev, True)
            self._pin(m, d, value, slope, extrapolated)
            d.cursor += 1

    def _resolve_counter(self, d: _DeviceLedger) -> None:
        """Counters: a mark in the newest segment resolves at once when instant power shapes
        that segment; otherwise it waits one more point, so the slopes on both sides are known
        and the edge can be placed on a power step (see step_interpolate)."""
        k = d.n - 1
        if k < 1:
            self._resolve_before_first(d)
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

    def _resolve_before_first(self, d: _DeviceLedger) -> None:
        """Marks before a counter's first point: measured back from it with instant power when
        that was read densely, else pinned to it and flagged (the gap is lost)."""
        t_first, e_first, _ = d.point(0)
        while (m := self._next_mark(d)) is not None:
            if m.t >= t_first:
                break
            tail = d.shape_energy(m.t, t_first, TAIL_GAP_S) if t_first - m.t <= TAIL_MAX_S else None
            self._pin(m, d, e_first - (tail or 0.0), d.last_power or 0.0, tail is None)
            d.cursor += 1

    def _pin(self, m: Mark, d: _DeviceLedger, value: float, slope: float, extrapolated: bool) -> None:
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
                    # The device already has a point past t (estimated refresh times can run ahead).
                    found = d.value_at(t)
                    if found is not None:
                        self._pin(m, d, found[0], found[1], found[2])
            if m.pending <= 0:
                m.done.set()
            else:
                self._marks.append(m)
            return m

    def force_resolve(self, m: Mark) -> None:
        """Give up waiting: extrapolate each unresolved device from its last point."""
        with self._lock:
            for d in self._devs.values():
                if d.device.key in m.energy_j:
                    continue
                found = d.value_at(m.t) if d.last_t is not None else None
                if found is not None:
                    self._pin(m, d, found[0], found[1], found[2])
                    continue
                if d.last_t is None:
                    value = 0.0
                else:
                    slope = d.last_power or 0.0
                    value = d.total_j + slope * max(0.0, m.t - d.last_t)
                self._pin(m, d, value, d.last_power or 0.0, True)
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
        with self._lock:
            d = self._devs.get(key)
            return None if d is None else d.peak_w(t0, t1)

    # -- output ----------------------------------------------------------------
    def snapshot(self) -> dict[str, DeviceSnapshot]:
        """Monotonic totals per device, safe to export as Prometheus counters."""
        with self._lock:
            out = {}
            for k, d in self._devs.items():
                e = d.total_j
                power = d.last_power
                if d.shape and d.last_t is not None:
                    # Counters are read every few seconds; instant power carries the total
                    # up to the latest sample in between, never letting it go backwards.
                    # From the read, not the (estimated) refresh: a little short, never double.
                    t_shape, power = d.shape[-1]
                    t_from = max(d.last_t, d.last_read_t or d.last_t)
                    tail = d.shape_energy(t_from, t_shape) if t_shape > t_from else None
                    d.exported_j = max(d.exported_j, e + (tail or 0.0))
                    e = d.exported_j
                out[k] = DeviceSnapshot(d.device, e, power, d.last_t, d.resets, d.errors)
            return out

    def values_at(self, t: float) -> dict[str, float]:
        """Each device's cumulative energy at time t, interpolated from its history (devices
        whose last point is before t are extrapolated at their last power)."""
        with self._lock:
            out = {}
            for k, d in self._devs.items():
                if d.last_t is None:
                    continue
                found = d.value_at(t)
                out[k] = found[0] if found is not None else \
                    d.total_j + (d.last_power or 0.0) * min(t - d.last_t, 5.0)
            return out

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


def _partial_box_correction(pts: list[tuple[float, float]], a: float, b: float) -> float:
    """What the step model changes at the two ends of ``shape_energy``'s sum.

    Each field value is the mean over one refresh box. An edge inside a box gets a share of
    that box: pro rata assumes the power was flat across it, which is exactly wrong where a
    kernel starts or stops inside the box (the usual case at a job's edges). Where both
    neighbouring boxes were read, the box is modelled as one step between their powers
    (``step_interpolate``), placed so the box's energy is kept."""
    gaps = [t1 - t0 for (t0, _), (t1, _) in zip(pts, pts[1:])]
    box = min(gaps, default=0.0)
    if not MIN_BOX_S <= box <= MAX_BOX_S or sum(abs(g - box) < 0.1 * box for g in gaps) < 2:
        return 0.0

    def step_share(k: int, x: float) -> float | None:
        """Energy of box k from its start to x (None: neighbours missing or not adjacent)."""
        if not 0 < k < len(pts) - 1:
            return None
        (t_lo, w_lo), (t_k, w_k), (t_hi, w_hi) = pts[k - 1], pts[k], pts[k + 1]
        if abs(t_k - t_lo - box) > 0.1 * box or abs(t_hi - t_k - box) > 0.1 * box:
            return None
        return step_interpolate(t_k - box, 0.0, t_k, w_k * box, x, w_lo, w_hi)

    fix = 0.0
    k = next((i for i, (t, _) in enumerate(pts) if t > a), None)
    m = next((i for i, (t, _) in enumerate(pts) if t >= b), None)
    if k is None or m is None or k == m:
        return 0.0          # both ends in one box: nothing to split
    t_k, w_k = pts[k]
    if a > t_k - box and (e := step_share(k, a)) is not None:
        fix += (w_k * box - e) - w_k * (t_k - a)
    t_m, w_m = pts[m]
    if b > t_m - box and (e := step_share(m, b)) is not None:
        fix += e - w_m * (b - (t_m - box))
    return fix


def step_interpolate(t0: float, e0: float, t1: float, e1: float, t: float,
                     low: float | None, high: float | None) -> float:
    """Cumulative energy at t inside the counter segment (t0, e0) -> (t1, e1).

    GPU power mostly moves in steps (kernels start and stop). When the segment's mean power
    lies strictly between the slopes of its neighbours, model it as one step from the
    previous slope to the next, placed so the segment's energy is exact; else interpolate
    linearly. For a job that starts or stops inside a refresh interval this puts the edge
    on the right side of the step, where a straight line splits the difference.
    """
    dt = t1 - t0
    if dt <= 0:
        return e1
    x = min(max(t - t0, 0.0), dt)
    de = e1 - e0
    linear = e0 + de * x / dt
    if low is None or high is None:
        return linear
    mean = de / dt
    lo_w, hi_w = min(low, high), max(low, high)
    if hi_w - lo_w < 0.05 * hi_w or not (lo_w < mean < hi_w):
        return linear
    s = (high * dt - de) / (high - low)          # step position from t0
    return e0 + (low * x if x <= s else low * s + high * (x - s))

