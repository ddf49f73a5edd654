"""Recording readings into the device histories: E(t) grows point by point.

Counters are differenced (a decrease is a reset, a known range a wrap; never negative energy);
power readings are integrated with the trapezoid rule; trailing means become the reference of a
GPU with no counter. Each new point resolves the marks it covers (ledger_marks.py). Nothing here
locks: the ``Ledger`` (ledger.py) calls a ``Recorder`` under its lock.
"""
from __future__ import annotations

from typing import Iterable

from .counter_faults import counter_delta, flag_bridged
from .history import POWER_SPAN_S, DeviceHistory
from .ledger_marks import MarkQueue
from .mean_reference import MEAN_STALE_S, anchor_on_means
from .model import Reading, Source

__all__ = ["Recorder", "FAULT_KINDS"]

# Errors after which a counter cannot vouch for the time since its last point: edges waiting
# on it are estimated from instant power at once (never stall a result) and flagged.
FAULT_KINDS = frozenset({"gpu_lost", "not_supported", "counter_stalled"})
# A GPU whose energy is its trailing mean holds what its live tail showed when a sample comes
# this long after the one before (a longer --interval): see ``_record_one``.
MEAN_TAIL_HOLD_GAP_S = 0.05


class Recorder:
    """Feeds readings and read errors into the ledger's device histories (``devs``, shared with
    the Ledger, which adds devices to it) and resolves the marks in ``marks`` as points arrive."""

    def __init__(self, devs: dict[str, DeviceHistory], marks: MarkQueue) -> None:
        self._devs = devs
        self._marks = marks
        self._held: set[str] = set()           # devices whose floor this record() has held
        self._read_t: float | None = None      # when this record()'s batch was read

    def record(self, readings: Iterable[Reading], read_t: float | None = None) -> None:
        """One batch of readings (the sampler's tick, read at ``read_t``), in order."""
        self._held.clear()
        self._read_t = read_t
        for r in readings:
            self._record_one(r)
        self._marks.trim()

    def _hold(self, d: DeviceHistory, t: float) -> None:
        """Before a reading dated ``t`` corrects the live tail: what E showed up to then stays
        the floor, up to the batch's read time where known (the reading may be an earlier
        refresh, and a scrape in between saw more). Once per device per ``record()``: no reader
        sees the ledger between the readings of one batch (the lock is held), so only what E
        showed before the batch can need holding; later holds in the batch would floor states
        nobody saw, and each costs an E(t) estimate (holds were ~40 % of the sampler's CPU)."""
        if d.device.key not in self._held:
            self._held.add(d.device.key)
            d.hold(t if self._read_t is None else max(t, self._read_t))

    def record_error(self, device_key: str | None, kind: str = "", t: float | None = None) -> None:
        """Count a failed read (``device_key`` None: every device). After a fault in
        ``FAULT_KINDS``, edges up to ``t`` waiting on the device are estimated at once."""
        devs = [self._devs[device_key]] if device_key in self._devs else \
            (list(self._devs.values()) if device_key is None else [])
        for d in devs:
            d.errors += 1
            if kind in FAULT_KINDS and t is not None:
                self._fault(d, t)
        self._marks.trim()

    def _fault(self, d: DeviceHistory, t: float) -> None:
        if d.last_t is None:
            return
        # What a snapshot showed (at the newest reading) stays the floor: the bridge re-estimates it.
        d.hold(d.newest_t())
        flag_bridged(d, d.last_t, t)
        self._marks.resolve_estimated(d, t)

    def _record_one(self, r: Reading) -> None:
        d = self._devs.get(r.device_key)
        if d is None:
            return
        if self._read_t is not None and self._read_t > d.seen_t:
            d.seen_t = self._read_t
        if r.mean_w is not None:
            self._record_mean(d, r)
            return
        if d.device.source == Source.SAMPLED and r.power_w is not None:
            if d.mean_active and d.last_t is not None and d.samples and \
                    r.t - d.samples.last[0] > MEAN_TAIL_HOLD_GAP_S:
                # Samples far apart: a new one moves the live tail by up to a gap's worth of
                # power, down as well as up (at --interval 0.5, 1 s scrapes of a power-only GPU
                # saw the exported total fall by 150 J). What was shown up to the read stays
                # the floor. At the default every value is read (20-25 ms apart): a correction
                # spans one refresh, and totals scraped 1 s apart never fell (bench_exported);
                # scrapes 15-60 ms apart saw falls of up to ~6 J on 20 ms boxes and ~48 J on
                # 100 ms read-stamped samples. Holding there too (at every sample, or at each
                # new mean and each lower sample) cost 8 such GPUs up to ~2.5 % of a core and
                # took 0.1-0.8 points off 5 s /metrics differences, so it is left.
                self._hold(d, r.t)
            d.mean.add_sample(r.t, r.power_w)      # kept to shape edges, should a mean arrive
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
                d.mean.add_sample(r.t, r.power_w)  # shapes edges; the counter has the energy
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
            delta, d.last_counter = counter_delta(d, r)
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
            self._marks.resolve_counter(d)
        else:
            # Sampled and modelled streams (even cumulative ones, like a process-tree share)
            # are smooth at the sampling scale: interpolate between the two points at once.
            self._marks.resolve(d, t_prev, e_prev, power)

    def _record_mean(self, d: DeviceHistory, r: Reading) -> None:
        """A trailing mean: the energy reference of a GPU with no counter. Points of E sit half
        a window back (the newest instant whose whole kernel the means cover)."""
        assert r.mean_w is not None
        window = r.mean_window_s or 1.0
        # (A mean-referenced GPU with samples holds as they come, in ``_record_one``.)
        if d.last_t is not None and (d.device.source == Source.COUNTER or (d.mean_active and not d.samples)):
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
        self._marks.resolve_mean(d, t_prev, e_prev, power)
