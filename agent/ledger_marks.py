"""Window edges: the mark queue, and pinning each device's E at a mark once its points are known.

A mark created at time t waits in a ``MarkQueue`` until every device has a value there. Each
device keeps a cursor (``DeviceHistory.cursor``: the next mark seq it has not resolved); the
``resolve_*`` methods pin the marks a device's newest points cover, by interpolating between them
(for counters, shaped by instant power or placed on a power step). ledger_record.py calls them as
readings arrive; the ``Ledger`` (ledger.py) opens marks and forces them when a caller gives up.
Nothing here locks: the Ledger's lock guards every call.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Collection, Iterator

from .history import BACKDATE_EXACT_S, DeviceHistory

__all__ = ["Mark", "MarkQueue", "pin"]


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


def pin(m: Mark, d: DeviceHistory, value: float, slope: float, extrapolated: bool) -> None:
    """Fix ``d``'s energy at mark ``m`` (the first value pinned stays); the mark is done once
    every device has one."""
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


class MarkQueue:
    """The marks some device has not resolved yet, oldest first (marks are in time order)."""

    def __init__(self) -> None:
        self._marks: deque[Mark] = deque()
        self._next_seq = 0

    @property
    def next_seq(self) -> int:
        """The seq the next mark will get: a device added now can be in no mark before it."""
        return self._next_seq

    def __len__(self) -> int:
        return len(self._marks)

    def __iter__(self) -> Iterator[Mark]:
        return iter(self._marks)

    def waiting_on(self, keys: frozenset[str]) -> bool:
        """Whether any mark still waits for one of these devices."""
        return any(k not in m.energy_j for m in self._marks for k in keys)

    def trim(self) -> None:
        """Drop the resolved marks at the head of the queue."""
        while self._marks and self._marks[0].pending <= 0:
            self._marks.popleft()

    def open(self, t: float, devs: Collection[DeviceHistory]) -> Mark:
        """A new mark at ``t``: devices that already have a point past t are pinned at once;
        the rest are resolved as readings come."""
        if self._marks and t < self._marks[-1].t:
            t = self._marks[-1].t   # keep marks ordered when threads race on the clock
        m = Mark(seq=self._next_seq, t=t, pending=len(devs))
        self._next_seq += 1
        for d in devs:
            m.errors[d.device.key] = d.errors   # errors seen up to the mark, for the approximate flag
            if d.last_t is not None and t < d.last_t:
                # The device already has a point past t (estimated refresh times can run
                # ahead, or the window opened before the meter started). Before the first
                # point and not yet measurable back: resolved as readings come.
                found = d.value_at(t)
                if found is not None and not (found[2] and t < d.point(d.oldest())[0]):
                    pin(m, d, found[0], found[1], found[2])
        if m.pending <= 0:
            m.done.set()
        # Queued even when resolved at once: devices find their next mark by its place in the
        # queue (seq - first seq), so a seq missing from it sent a device past the end
        # (IndexError in record()). ``trim`` drops it once it reaches the head.
        self._marks.append(m)
        self.trim()
        return m

    def force(self, m: Mark, devs: Collection[DeviceHistory]) -> None:
        """Estimate each device not yet pinned at ``m`` (instant power carries a counter past its
        last point; else the last power is held) and flag it approximate."""
        for d in devs:
            if d.device.key in m.energy_j:
                continue
            if d.last_t is None:
                pin(m, d, 0.0, 0.0, True)
                continue
            _, extrapolated = d.estimate_at(m.t)
            pin(m, d, d.energy(m.t), d.last_power or 0.0, extrapolated)
        self.trim()

    def next_for(self, d: DeviceHistory) -> Mark | None:
        """The oldest mark this device has not resolved yet."""
        base = self._marks[0].seq if self._marks else self._next_seq
        d.cursor = max(d.cursor, base)
        return self._marks[d.cursor - base] if d.cursor < self._next_seq else None

    # -- resolution as points arrive -------------------------------------------------------------
    def resolve_estimated(self, d: DeviceHistory, t: float) -> None:
        """Marks up to ``t`` from E's estimate, flagged approximate (a fault left the counter
        unable to vouch for the time since its last point)."""
        while (m := self.next_for(d)) is not None and m.t <= t:
            pin(m, d, d.energy(m.t), d.last_power or 0.0, True)
            d.cursor += 1

    def resolve(self, d: DeviceHistory, t_prev: float | None, e_prev: float, slope: float) -> None:
        """Marks before the newest point of a smooth stream (sampled or modelled), interpolated
        between it and the point before (``t_prev``, ``e_prev``)."""
        while (m := self.next_for(d)) is not None:
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
            pin(m, d, value, slope, extrapolated)
            d.cursor += 1

    def resolve_mean(self, d: DeviceHistory, t_prev: float, e_prev: float, power: float) -> None:
        """Marks before a new trailing-mean point: inside the new segment they get the exact
        kernel value, not a straight line."""
        e = d.total_j
        while (m := self.next_for(d)) is not None and m.t < d.last_t:  # type: ignore[operator]
            exact = d.mean.energy(m.t)
            if m.t >= t_prev and exact is not None:
                value = min(max(d.mean_base + exact, e_prev), e)
                pin(m, d, value, power, False)
            else:
                found = d.value_at(m.t)
                pin(m, d, found[0] if found else e_prev, power, found[2] if found else True)
            d.cursor += 1

    def resolve_counter(self, d: DeviceHistory) -> None:
        """Counters: a mark in the newest segment resolves at once when instant power shapes
        that segment; otherwise it waits one more point, so the slopes on both sides are known
        and the edge can be placed on a power step (see step_interpolate)."""
        self._resolve_before_first(d)
        k = d.n - 1
        if k < 1:
            return
        t_a = d.point(k - 1)[0]
        t_b = d.last_t
        while (m := self.next_for(d)) is not None:
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
            pin(m, d, value, d.last_power or 0.0, extrapolated)
            d.cursor += 1

    def _resolve_before_first(self, d: DeviceHistory) -> None:
        """Marks before a counter's first point (a window opened while the meter was still
        starting) are measured back from the first readings (``DeviceHistory.back_energy``);
        with neither instant power nor a second counter point yet, they wait."""
        if d.oldest() != 0:
            return
        t_first = d.point(0)[0]
        while (m := self.next_for(d)) is not None and m.t < t_first:
            found = d.value_at(m.t)
            if found is None or (found[2] and d.back_energy(m.t) is None):
                return
            pin(m, d, found[0], found[1], found[2])
            d.cursor += 1
