"""Reading a GPU that has a total-energy counter: the counter at the times its timing plans, and
instant power between counter reads to shape the energy inside each counter span.

The counter (``nvmlDeviceGetTotalEnergyConsumption``, ~3.5 ms a call on an H100) is exact over
any span, so it is read sparsely, when ``CounterTiming`` says (sensors/counter_timing.py).
Field 186 (instant power, ~10 us), else ``nvmlDeviceGetPowerUsage``, is read at the sensor's
cadence and shapes E(t) between counter reads; field 185 (the 1 s trailing mean) comes in the
same call where it answers. Whether field 186's timestamps are refresh or read times is learnt
from the data (``StampEvidence``).
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from ..clock import Clock
from ..model import Reading
from .counter_timing import CounterTiming
from .nvml_power import (FIELD_POWER_AVERAGE, FIELD_POWER_INSTANT, FIELD_READ_DELAY_S, FIELDS_INSTANT,
                         MAX_FIELD_AGE_S, MIN_FIELD_PERIOD_S, RefreshStamps, Stream)
from .power_evidence import COARSE_REFRESH_S, MEAN_WINDOW_S, PowerReference, ShapeEvidence, StampEvidence
from .quiet import QuietEvidence, QuietSchedule

FIELD_STAMPED_AGE_S = 0.0005  # a value stamped this long before its read was stamped when it refreshed
_FIELDS_BOTH = (FIELD_POWER_INSTANT, FIELD_POWER_AVERAGE)   # one call: instant power and the 1 s mean
_struct_get = ctypes.Structure.__getattribute__   # a field value's attributes, without pynvml's wrapper


@dataclass
class ReadStampDating:
    """Dates a read-stamped value that refreshes every ``period_s`` (shown by tight reads: a
    20 ms box stamped at the read). A value is the power up to its refresh, not up to the read:
    dated at the read, such a box lagged the load by a refresh and a half on average (bursty
    1.5 s jobs on a counter GPU: 3.4 % p90). A new value is dated in the middle of the span its
    refresh lies in (after the read before, within a period of this one). The same value read
    again is the same refresh until a period has surely passed since the read that first saw
    it; after that it was refreshed again (a steady load), dated a period on (or more)."""

    value: float | None = None
    read_t: float | None = None          # the previous read
    t: float | None = None               # the date given to the newest value...
    latest_t: float = 0.0                # ...whose refresh came no later than this

    def date(self, value: float, now: float, period_s: float) -> float | None:
        prev, self.read_t = self.read_t, now
        last = self.t
        if value != self.value or last is None:
            self.value = value
            lo = now - period_s if prev is None else max(prev, now - period_s)
            t = 0.5 * (lo + now)
            if last is not None and t <= last:
                t = 0.5 * (last + now)           # dated ahead before: keep the order
            self.latest_t = now
        elif now - self.latest_t >= period_s:
            k = math.floor((now - self.latest_t) / period_s)
            t = last + k * period_s
            self.latest_t += k * period_s
        else:
            return None
        self.t = t
        return t


class CounterReader:
    """Reads one GPU with an energy counter; ``read`` appends its new readings to ``out``."""

    def __init__(self, nvml: ModuleType, handle: Any, key: str, timing: CounterTiming, *,
                 wall: Callable[[float], float], clock: Clock, instant_ok: bool, average_ok: bool) -> None:
        self.nvml, self.handle, self.key = nvml, handle, key
        self.wall = wall            # the meter's clock -> wall time, to date field timestamps
        self.clock = clock          # times the end of each counter call
        self.timing = timing        # when to read the counter, and its dating
        self.instant_ok = instant_ok        # field 186 works (shapes energy between counter reads)
        # Without field 186, GetPowerUsage shapes the counter's spans: instantaneous or a
        # 1 s mean, the counter keeps the energy exact; only the spread inside differs.
        self.shape_usage = not instant_ok
        self.average_ok = average_ok        # field 185 (1 s trailing mean) answers
        self._last_shape_t = -1e18
        self._field_refreshes = RefreshStamps()   # field 186's stamps: new values, and the period...
        self._field_next: float | None = None     # ...and when the next one is expected
        self._field_stamped = False         # the newest value's NVML stamp predates its read (a refresh time)
        self._field_stamps = StampEvidence()     # what field 186 is
        self._field_dating = ReadStampDating()   # a read-stamped field 186 shown to refresh fast
        # GetPowerUsage carries no timestamp: each read is dated at the read, as a read-stamped
        # field's is, and judged coarse the same way (a 100 ms point sample, or a 1 s mean
        # refreshed every 100 ms, must not split a counter span: bursty 1.5 s jobs read 4-7 %
        # off p90 on a counter GPU shaped by an instant 100 ms GetPowerUsage).
        self._usage_stamps = StampEvidence()
        self._usage_stamps.read_stamped = True
        self._instant_w: float | None = None     # its newest value (the stall check's evidence)
        self._shape = ShapeEvidence()            # whether the shaping reading follows the counter
        self._mean_stream = Stream()
        self.quiet = QuietEvidence()             # power holding still: read on the quiet schedule

    def read(self, now: float, out: list[Reading], *, period_s: float, calibrating: bool,
             edges_pending: bool, quiet: QuietSchedule) -> bool:
        """One read at the sensor's cadence ``period_s`` (raises NVMLError: the caller reports
        it), and ``quiet``, when a GPU whose power holds still is read. False when the counter
        has stalled: unchanged while the GPU draws power."""
        timing = self.timing
        cadence = self._read_shape(now, out, period_s, edges_pending, quiet)
        if not timing.due(now, cadence, calibrating, edges_pending):
            return True
        call_t = self.clock.now()
        try:
            mj = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except self.nvml.NVMLError:
            timing.failed()
            raise
        end_t = self.clock.now()
        timing.called(end_t - call_t)
        # A read is taken somewhere inside the call (3.5 ms on an H100): a change seen here
        # happened before the call ended; an unchanged value, that none came before it began
        # (timed from the call, not from ``now``: other GPUs' calls may have come first).
        dated = timing.observe(call_t, mj / 1000.0, end_t)
        for t, v in dated:
            out.append(Reading(self.key, t, energy_j=v, read_t=now))
            self._shape.add_counter(t, v)
            self.quiet.add_counter(t, v)
        if dated:
            return True
        return not timing.stalled(now, self._instant_w)

    def field_wish(self) -> float | None:
        """Where every field-186 value is read (``_dense``): just after the next one lands, so
        each is read once. None: no wish."""
        if self._dense and self._field_next is not None:
            return self._field_next + FIELD_READ_DELAY_S
        return None

    def steady_floor(self, gap_s: float, quiet: QuietSchedule) -> float:
        """Before this time a steady read reads nothing of this GPU: its instant power was read
        less than ``gap_s`` ago (``_read_shape``) and the counter's own reads come as wishes.
        -inf where it is read at every tick: an unshaped or faulted counter, one whose first
        change is not dated yet, or one whose every field value is read. A GPU whose power holds
        still is read only every quiet period (sensors/quiet.py)."""
        c = self.timing
        if c.fault or not c.shaped or not c.tracker.dated or self._dense:
            return -math.inf
        floor = self._last_shape_t + gap_s
        return max(floor, quiet.due_t) if self.quiet.engaged else floor

    @property
    def _dense(self) -> bool:
        """Every field-186 value is read (as on a GPU with no counter): while the counter is
        faulted, instant power bridges its gaps; and on a counter that refreshes only every
        half second or more, reads at the cadence (~7 Hz) leave too few values to shape its
        spans (a 1 s counter's bursty 1.5 s jobs: up to 9 % p90, 1 % with every value; ~50
        field calls a second for that GPU)."""
        return self.instant_ok and (self.timing.fault or self.timing.slow)

    @property
    def reference(self) -> PowerReference:
        """What this GPU's energy is measured from (the counter) and what shapes its spans."""
        if self.instant_ok:
            shape, stamps, what = "field 186", self._field_stamps, "field 186 is stamped with the read time"
        else:
            shape, stamps, what = "nvmlDeviceGetPowerUsage", self._usage_stamps, "GetPowerUsage has no timestamp"
        refresh = stamps.held_s if stamps.read_stamped else None
        src = "field 186" if self.instant_ok else "GetPowerUsage"
        if self._shape.contradicted:
            shape = (f"counter steps ({src} does not follow the counter over its own short spans: "
                     "a trailing mean or an aliased sample cannot split a span)")
        elif stamps.read_stamped and stamps.coarse and refresh is not None:
            # Lagging point samples alias with bursty loads: a wrong split is worse than
            # the counter's own steps.
            shape = (f"counter steps ({what} and changed at most every {refresh * 1000:.0f} ms: "
                     "too coarse to split a counter span)")
        elif not self.instant_ok and self._shape.verdict is None:
            shape = ("counter steps (GetPowerUsage has not yet shown it follows the counter over its own "
                     "short spans: it may be a 1 s mean)")
        elif stamps.read_stamped and stamps.coarse:
            shape = (f"counter steps ({what}, and no reads have yet seen it change twice within "
                     f"{COARSE_REFRESH_S * 1000:.0f} ms: a slower value cannot split a counter span)")
        elif stamps.read_stamped and self.instant_ok:
            shape = "field 186 (read-stamped, dated up to its refresh)"
        return PowerReference("counter", "energy counter",
                              "the GPU has a total-energy counter (exact over any span)", shape, refresh)

    def _instant_sample(self, now: float, average: bool = False
                        ) -> tuple[tuple[float, float | None, int] | None, tuple[float, int] | None]:
        """(watts, clock time the value was sampled) from field 186. NVML stamps each field value
        with the wall time it was taken; a value that is 20 ms old belongs 20 ms back.
        NVML errors pass through (a lost GPU must show as an error, not silence).
        The third item is NVML's raw timestamp (µs), which identifies the value. With
        ``average``, field 185 comes in the same call, returned second as (watts, raw timestamp)."""
        mean = None
        fields = _FIELDS_BOTH if average else FIELDS_INSTANT
        values = self.nvml.nvmlDeviceGetFieldValues(self.handle, fields)
        # pynvml's field struct wraps each attribute in a Python __getattribute__ (to decode
        # bytes; these are numbers): read them through ctypes' own (~1 us apiece, 8 GPUs x 10 Hz).
        get = _struct_get
        if average and len(values) > 1:
            second = values[1]
            if get(second, "nvmlReturn") == 0:
                mean = (get(second, "value").uiVal / 1000.0, int(get(second, "timestamp") or 0))
        entry = values[0]
        if get(entry, "nvmlReturn") != 0:   # the call succeeds while a field fails: check each entry
            return None, mean
        ts_us = int(get(entry, "timestamp") or 0)
        t = None
        if ts_us:
            age = self.wall(now) - ts_us / 1e6
            t = now - age if 0.0 <= age < MAX_FIELD_AGE_S else now
        return (get(entry, "value").uiVal / 1000.0, t, ts_us), mean

    def _read_shape(self, now: float, out: list[Reading], period_s: float, edges_pending: bool,
                    schedule: QuietSchedule) -> bool:
        """Read instant power at the sensor's cadence, and at every read while an edge waits
        (the extra wake-ups for scheduled counter reads need no power sample). True: read."""
        dense = self._dense
        quiet = self.quiet
        if not dense and not edges_pending and \
                (now - self._last_shape_t < 0.8 * period_s or quiet.waits(schedule, now)):
            return False
        if self.instant_ok and self._field_stamped and self._field_next is not None and now < self._field_next \
                and now - self._last_shape_t < MIN_FIELD_PERIOD_S:
            # Fast reads (every 1-5 ms near edges and while calibrating) come faster than field
            # 186 refreshes: where its stamps are refresh times, they say when the next value
            # lands, and a read before then returns the same one (~2/3 of a calibration
            # burst's CPU). Skipped for MIN_FIELD_PERIOD_S at most: the refresh period is learnt
            # from these reads, and skipping up to a period learnt too long (a refresh missed
            # while the reader was late) would keep it too long. Read-stamped values are read
            # every time: the read is what dates them.
            return True
        self._last_shape_t = now
        learn = quiet.learning(now)   # (a quiet read's spacing is the quiet period's, not the sensor's)
        if self.instant_ok:
            sample, mean = self._instant_sample(now, average=self.average_ok)
            if mean is not None:
                # Field 185, the 1 s trailing mean, read in the same call: between counter
                # reads it carries E(t) over seconds better than sparse instant samples.
                w, ts = mean
                t_mean = self._mean_stream.date(w, ts, now, self.wall, learn)
                if t_mean is not None:
                    out.append(Reading(self.key, t_mean, mean_w=w, mean_window_s=MEAN_WINDOW_S))
                    quiet.add_reference(w)
            if sample is not None:
                reading = self._date_instant(now, sample, learn)
                if reading is not None:
                    out.append(reading)
                    quiet.add_sample(reading.t, sample[0])
        elif self.shape_usage:
            w = self._instant_w = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            stamps = self._usage_stamps
            stamps.observe(None, w, now, learn)
            self._shape.add_sample(now, w)
            # With no timestamp of its own it may be a 1 s mean: it shapes spans only once the
            # counter's short spans show it follows them.
            coarse = stamps.coarse or self._shape.verdict is not True
            self.timing.shaped = not coarse
            out.append(Reading(self.key, now, power_w=w, instant_coarse=coarse))
            quiet.add_sample(now, w)
        quiet.read(now)
        return True

    def _date_instant(self, now: float, sample: tuple[float, float | None, int], learn: bool = True
                      ) -> Reading | None:
        """A field-186 value as a shaping sample, or None when it is not new.

        Refresh-stamped values are dated by their stamps. Where the data shows the stamps are
        read times (``StampEvidence``; reads that land on refreshes look the same), each read is
        a sample dated at the read. If the value also refreshes no faster than a short box (a
        ~100 ms point sample), it is flagged coarse: such samples alias with bursty loads and
        lag by up to a refresh, so they must not split a counter span (they still bridge faults)."""
        w, t_s, ts_us = sample
        self._instant_w = w
        stamps = self._field_stamps
        stamps.observe(now - t_s if t_s is not None and ts_us else None, w, now, learn)
        # On evidence only: reads a few ms apart saw the changes, or the counter's own short
        # spans disagree with the values (``ShapeEvidence``).
        coarse = stamps.coarse or self._shape.contradicted
        # The counter is read sparsely only because instant power shapes its spans; where
        # it cannot, the counter is read at every cadence tick instead (~100 ms spans).
        self.timing.shaped = not coarse
        if stamps.read_stamped:
            # Coarse, or not yet timed: every read is a sample dated at the read (a steady
            # load's value never changes, and faults are bridged from these). Shown to refresh
            # fast: each value up to its refresh.
            t = t_s or now
            period = None if coarse else (stamps.period_s or stamps.refresh_max_s)
            if period is not None:
                t = self._field_dating.date(w, t, period)
                if t is None:
                    return None
            self._shape.add_sample(t, w)
            return Reading(self.key, t, power_w=w, instant_coarse=coarse)
        if t_s is not None and ts_us:
            # Field 186 refreshes on its own clock: its stamps give the period and when the
            # next value lands.
            refreshes = self._field_refreshes
            if not refreshes.new(ts_us, learn):
                return None          # the same value again
            if refreshes.stepped and refreshes.min_step_s is not None:
                self._field_next = t_s + max(MIN_FIELD_PERIOD_S, refreshes.min_step_s)
            self._field_stamped = now - t_s > FIELD_STAMPED_AGE_S
        self._shape.add_sample(t_s or now, w)
        return Reading(self.key, t_s or now, power_w=w, instant_coarse=coarse)
