"""Cumulative energy per device: E(t) as a monotonic piecewise-linear function of time.

``Ledger`` is the thread-safe front: it owns the lock, the device histories and the mark queue,
and answers every read (snapshots, E(t), power timelines) from the histories alone. Readings go
in through ``Recorder`` (ledger_record.py: counters differenced, power integrated, trailing means
as a reference). Window edges are *marks* (ledger_marks.py): a mark created at time t is resolved
for each device once the points around t are known, by interpolating between them (for counters,
shaped by instant power or placed on a power step). So begin/end are O(1) and never touch a sensor.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

from .history import DeviceHistory
from .ledger_marks import Mark, MarkQueue
from .ledger_record import FAULT_KINDS, Recorder
from .model import Component, Device, Reading, Source
from .shaping import step_interpolate

# An edge of a counter-less GPU that rests on instant power counts as measured where the
# trailing mean confirms it (``DeviceHistory.mean_check_j``) within this share of the window's
# energy (or this many joules). A new meter's first 3 s window (~1,100 J on bursty loads, virtual
# time): 20 ms boxes that tile time checked within 0-9 J (one window begun before the first read,
# 28 J); 100 ms point samples stamped at the read, 2-126 J, most of them over the share.
VOUCH_SHARE = 0.01
VOUCH_MIN_J = 1.0

__all__ = ["Ledger", "Mark", "DeviceSnapshot", "DeviceHistory", "step_interpolate", "FAULT_KINDS"]


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
        self._marks = MarkQueue()
        self._devs: dict[str, DeviceHistory] = {}
        self._added_seq: dict[str, int] = {}   # first mark seq a device could be in (late GPUs)
        self._recorder = Recorder(self._devs, self._marks)
        for d in devices:
            self.add_device(d)

    # -- devices ---------------------------------------------------------------
    def add_device(self, device: Device) -> None:
        with self._lock:
            if device.key not in self._devs:
                self._devs[device.key] = DeviceHistory(device, self._marks.next_seq)
                self._added_seq[device.key] = self._marks.next_seq

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
    def record(self, readings: Iterable[Reading], read_t: float | None = None) -> None:
        """One batch of readings (ledger_record.py), read at ``read_t`` (their times may be
        earlier refreshes); marks they cover are resolved."""
        with self._lock:
            self._recorder.record(readings, read_t)

    def record_error(self, device_key: str | None, kind: str = "", t: float | None = None) -> None:
        """Count a failed read. After a fault that leaves a counter unable to vouch for the time
        since its last point (``FAULT_KINDS``), edges up to ``t`` waiting on it are estimated
        from instant power at once and flagged approximate: a lost GPU never stalls a result."""
        with self._lock:
            self._recorder.record_error(device_key, kind, t)

    # -- marks -----------------------------------------------------------------
    def mark(self, t: float) -> Mark:
        """Pin every device's energy at time t (resolved as later points arrive)."""
        with self._lock:
            return self._marks.open(t, self._devs.values())

    def force_resolve(self, m: Mark) -> None:
        """Give up waiting: estimate each unresolved device at the mark (instant power carries a
        counter past its last point; else the last power is held) and flag it approximate."""
        with self._lock:
            self._marks.force(m, self._devs.values())

    def force_resolve_all(self) -> None:
        """Resolve every waiting mark now (the sampler has stopped)."""
        for m in list(self._marks):
            self.force_resolve(m)

    def pending_marks(self) -> int:
        with self._lock:
            return len(self._marks)

    def settle_lag_s(self) -> float:
        """The longest any device takes, in normal reading, to settle E at an instant (a
        mark there resolves): a result waits about this long before pinning from estimates."""
        with self._lock:
            return max((d.settle_lag_s() for d in self._devs.values()), default=0.0)

    def unresolved(self, keys: frozenset[str]) -> bool:
        """Whether any mark still waits for one of these devices (drives a sensor's fast reads)."""
        with self._lock:
            return self._marks.waiting_on(keys)

    # -- output ----------------------------------------------------------------
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
        (no counter, no trailing mean: a sampled power aliases with periodic loads; or an edge
        before the mean's reference starts, unless the mean confirms E there)."""
        with self._lock:
            d = self._devs.get(key)
            if d is None:
                return False
            instant_only = (d.device.component == Component.GPU and d.device.source == Source.SAMPLED
                            and not (d.mean_active and d.mean_from_t <= t0))
            if instant_only and d.mean_active:
                # A window begun before the reference starts (a new meter's first): the edges
                # resting on instant power count as measured where the mean confirms them.
                tol_j = max(VOUCH_MIN_J, VOUCH_SHARE * abs(d.energy(t1) - d.energy(t0)))
                checks = [d.mean_check_j(t) for t in (t0, t1) if t < d.mean_from_t]
                instant_only = not all(c is not None and abs(c) <= tol_j for c in checks)
            return instant_only or d.approximate_between(t0, t1)

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
                # (E before a device's first point lies below zero; an exported total never does.)
                e = max(0.0, d.energy(at)) if d.last_t is not None else 0.0
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
