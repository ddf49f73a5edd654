"""Timing a polled counter that refreshes on its own schedule (NVML energy: about every 100 ms).

A read at time r returns the value as of the counter's last refresh, not as of r. Stamping the
value with r would lag the true curve by up to one refresh period and bias every window edge.
Each observed change brackets one refresh instant inside (previous read, this read]. Refreshes
are roughly periodic, so the brackets are intersected modulo the period (phase locking); the
carried bracket widens a little each period, and an empty intersection (drift, an irregular
counter) restarts the lock from the new bracket instead of holding a wrong phase.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RefreshTracker:
    period_s: float = 0.1
    drift_per_period: float = 0.003    # fraction of a period the phase may wander per period
    _last_value: float | None = None
    _prev_read: float | None = None    # last read that still saw the old value
    _lo: float = 0.0                   # bracket of the last refresh instant
    _hi: float = 0.0
    _locked: bool = False
    _fast_changes: int = 0             # consecutive fast reads that all saw a change

    def observe(self, read_t: float, value: float) -> float | None:
        """Feed one read. Returns the estimated time of ``value`` if it is new, else None."""
        if self._last_value is None:
            self._last_value, self._prev_read = value, read_t
            return read_t
        if value == self._last_value:
            self._prev_read = read_t
            self._fast_changes = 0
            return None
        p = self.period_s
        prev = self._prev_read if self._prev_read is not None else read_t - p
        self._last_value, self._prev_read = value, read_t
        # Several changes in a row on reads much closer than a period: the counter refreshes
        # at least as often as we read it, so the value is current.
        self._fast_changes = self._fast_changes + 1 if read_t - prev < 0.5 * p else 0
        if self._fast_changes >= 3:
            self._locked = False
            return read_t
        lo, hi = max(prev, read_t - p), read_t
        if self._locked:
            lo, hi = self._intersect(lo, hi)
        self._lo, self._hi, self._locked = lo, hi, True
        return 0.5 * (lo + hi)

    def _intersect(self, lo: float, hi: float) -> tuple[float, float]:
        """Intersect [lo, hi] with the copies of the carried bracket shifted by whole periods.
        When two copies meet the bracket the phase is ambiguous: keep their hull, never guess."""
        p = self.period_s
        k0 = int((lo - self._hi) // p)
        hits = []
        for k in (k0, k0 + 1, k0 + 2):
            grow = self.drift_per_period * p * max(1, abs(k))
            n_lo, n_hi = max(lo, self._lo + k * p - grow), min(hi, self._hi + k * p + grow)
            if n_lo <= n_hi:
                hits.append((n_lo, n_hi))
        if not hits:
            return lo, hi
        return min(h[0] for h in hits), max(h[1] for h in hits)
