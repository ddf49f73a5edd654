"""Reading a GPU that has no energy counter: instant power and a trailing mean, dated by evidence.

Per read, one ``nvmlDeviceGetFieldValues`` call returns field 186 (instant power) and field 185
(averaged power) where they answer; else ``nvmlDeviceGetPowerUsage`` is read. What each value
is, and how to date it, is learnt from the data (``power_evidence``):

- a field value is new when its timestamp moves (refresh-stamped); where timestamps are read
  times, each read is a sample taken at the read (a counter GPU's reader dates a value shown to
  refresh fast up to its refresh: ``nvml_counter.ReadStampDating``);
- a candidate that tracks the mean of the instant samples over the last second is emitted as
  ``Reading.mean_w`` (the ledger's energy reference, instant power only shapes edges inside
  it); one that tracks the latest instant value is just another instant reading.
"""
from __future__ import annotations

import ctypes
from collections import deque
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from ..model import Reading
from .power_evidence import MEAN_WINDOW_S, HoldEvidence, MeanEvidence, PowerReference, SelfEvidence, StampEvidence
from .quiet import QUIET_MEAN_PERIOD_S, QuietEvidence

FIELD_POWER_AVERAGE = 185
FIELD_POWER_INSTANT = 186
FIELDS_INSTANT = (FIELD_POWER_INSTANT,)     # a read of instant power alone
MAX_FIELD_AGE_S = 1.0         # older field timestamps mean clocks disagree: use the read time
MIN_FIELD_PERIOD_S = 0.01     # never chase a field faster than 100 Hz
FIELD_READ_DELAY_S = 0.002    # read a new field value this long after it is expected
MEAN_EARLY_S = 0.005          # field 185 is asked for from this long before its next refresh
FIELD_FAILS_TO_DROP = 3       # field reads failed in a row after which GetPowerUsage takes over
# Stamps this close are one refresh: a value's stamp converted between clocks twice may move by
# a microsecond, and a step that small taken for a refresh period (~0) had the reader poll a
# power-only GPU at ~1 kHz (8 GPUs: 13 % of a core).
STAMP_WOBBLE_US = 1000
# A field value's attributes through ctypes' own __getattribute__: pynvml's wrapper only decodes
# bytes, and costs ~1 us per attribute.
_struct_get = ctypes.Structure.__getattribute__


@dataclass
class RefreshStamps:
    """A refresh-stamped value's NVML stamps: which read is a new refresh, and the refresh
    period (the shortest recent step: missed values show up as multiples)."""

    last_us: int = 0
    steps: deque[float] = field(default_factory=lambda: deque(maxlen=32))   # recent stamp steps, s
    min_step_s: float | None = None      # min(steps): asked at every wake-up, kept, not recomputed
    stepped: bool = False                # the newest refresh added a step

    def new(self, ts_us: int, learn: bool = True) -> bool:
        """Whether stamp ``ts_us`` is a refresh not seen before (learning the period from it,
        unless the read came a quiet period after the one before: sensors/quiet.py)."""
        step_us = ts_us - self.last_us
        if abs(step_us) < STAMP_WOBBLE_US:
            return False              # the same refresh again
        # (A step back is the wall clock's, not a period.)
        self.stepped = bool(self.last_us) and step_us > 0 and learn
        if self.stepped:
            self.steps.append(step_us / 1e6)
            self.min_step_s = min(self.steps)
        self.last_us = ts_us
        return True


@dataclass
class Stream:
    """One power value read repeatedly: which of its reads are new, and when each was taken."""

    stamps: StampEvidence = field(default_factory=StampEvidence)
    refreshes: RefreshStamps = field(default_factory=RefreshStamps)
    last_read_t: float | None = None
    last_t: float | None = None          # clock time of the newest value

    def date(self, value: float, ts_us: int, now: float, wall: Callable[[float], float],
             learn: bool = True) -> float | None:
        """Clock time of ``value`` if it is new, else None (``learn``: see ``RefreshStamps.new``)."""
        age = None
        if ts_us:
            age = wall(now) - ts_us / 1e6
            if not 0.0 <= age < MAX_FIELD_AGE_S:
                age = 0.0             # clocks disagree: the stamp says nothing
        changed = self.stamps.observe(age, value, now, learn)
        prev_read, self.last_read_t = self.last_read_t, now
        if ts_us and self.stamps.read_stamped is not True:
            if not self.refreshes.new(ts_us, learn):
                return None           # the same refresh again
            t = now - (age or 0.0)
        else:
            # Read-stamped (or unstamped): the stamp says nothing about the value's age, so the
            # value is a sample of the power held since it last refreshed, taken now. (Not
            # dated up to its refresh as on a counter GPU: reads 10 ms apart cannot time the
            # changes closely enough to fit the period, and the shortest span between changes,
            # two periods for a point sample of a square load, made it worse: 1.5 s jobs on a
            # 100 ms square 2.0 -> 6.8 %.)
            t = now
        if self.last_t is not None and t <= self.last_t:
            return None
        self.last_t = t
        return t

    @property
    def refresh_s(self) -> float | None:
        if self.stamps.read_stamped is True:
            return self.stamps.refresh_s
        refreshes = self.refreshes
        return refreshes.min_step_s if len(refreshes.steps) >= 2 else None

    @property
    def stamp_kind(self) -> str:
        return {True: "read-stamped", False: "refresh-stamped"}.get(self.stamps.read_stamped, "stamps not judged yet")


class PowerOnlyReader:
    """Reads one counter-less GPU; ``read`` appends its new readings to ``out``."""

    def __init__(self, nvml: ModuleType, handle: Any, key: str, wall: Callable[[float], float],
                 instant_ok: bool, average_ok: bool) -> None:
        self.nvml, self.handle, self.key, self.wall = nvml, handle, key, wall
        self.instant_ok, self.average_ok = instant_ok, average_ok
        self.instant = Stream()
        self.mean = Stream()
        self.mean_evidence = MeanEvidence()
        self.self_evidence = SelfEvidence()
        # Field 186: a box before its stamp, or a point sample at it (judged on the instant
        # values MeanEvidence keeps).
        self.hold = HoldEvidence(self.mean_evidence.instant)
        self._last_instant: tuple[float, float] | None = None   # (t, value) of the newest instant value
        self._undecided: deque[tuple[float, float]] = deque(maxlen=int(4 * MEAN_WINDOW_S / 0.05))
        self._fields = ([FIELD_POWER_INSTANT] if instant_ok else []) + ([FIELD_POWER_AVERAGE] if average_ok else [])
        self._field_fails = 0               # field reads failed in a row
        self.quiet = QuietEvidence(QUIET_MEAN_PERIOD_S)   # power holding still: read on the quiet schedule

    def read(self, now: float, out: list[Reading]) -> bool:
        """One read. False when the instant field failed (the caller reports it); the read
        still carries on from field 185 or ``GetPowerUsage``, so a field that stops answering
        mid-run leaves no hole (with nothing read, the last value was held: a bursty 8 s job
        read +-38 %). After FIELD_FAILS_TO_DROP failures in a row the fields are given up."""
        n = self.nvml
        quiet = self.quiet
        learn = quiet.learning(now)   # (a quiet read's spacing is the quiet period's, not the sensor's)
        inst: tuple[float, int] | None = None
        cand: tuple[float, int] | None = None
        failed = False
        from_field = False
        skipped_mean = False
        if self._fields:
            fields = self._fields_due(now)
            skipped_mean = fields is not self._fields
            try:
                values = n.nvmlDeviceGetFieldValues(self.handle, fields)
            except n.NVMLError as exc:
                if exc.value != n.NVML_ERROR_NOT_SUPPORTED:
                    raise
                values = []
            get = _struct_get
            for fid, entry in zip(fields, values):
                if get(entry, "nvmlReturn") != 0:     # the call succeeds while a field fails: check each
                    continue
                got = (get(entry, "value").uiVal / 1000.0, int(get(entry, "timestamp") or 0))
                if fid == FIELD_POWER_INSTANT:
                    inst = got
                else:
                    cand, from_field = got, True
            failed = (self.instant_ok and inst is None) or (not values)
            self._field_fails = self._field_fails + 1 if failed else 0
            if self._field_fails >= FIELD_FAILS_TO_DROP:
                self._fields, self.instant_ok, self.average_ok = [], False, False
        if cand is None and (not self.average_ok or not self._fields or (failed and not skipped_mean)):
            cand = (n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0, 0)
        if inst is not None:
            t = self.instant.date(inst[0], inst[1], now, self.wall, learn)
            if t is not None:
                out.append(Reading(self.key, t, power_w=self._held_back(t, inst[0])))
                self.mean_evidence.add_instant(t, inst[0])
                quiet.add_sample(t, inst[0])
        if cand is not None:
            t = self.mean.date(cand[0], cand[1], now, self.wall, learn)
            if t is not None:
                if inst is not None:
                    verdict = self.mean_evidence.add_candidate(t, cand[0])
                else:
                    verdict = self.self_evidence.add(t, cand[0])
                # Field 185 is documented as averaged power: trusted as a 1 s mean unless the
                # data says otherwise. GetPowerUsage must show it first.
                is_mean = verdict if verdict is not None else (self.average_ok and from_field)
                if is_mean:
                    # Values seen while undecided are a reference too: the ledger gets them.
                    out.extend(Reading(self.key, tp, mean_w=wp, mean_window_s=MEAN_WINDOW_S)
                               for tp, wp in self._undecided)
                    self._undecided.clear()
                    out.append(Reading(self.key, t, mean_w=cand[0], mean_window_s=MEAN_WINDOW_S))
                    quiet.add_reference(cand[0])
                    if self.mean.stamps.read_stamped is False and self.instant.stamps.read_stamped is False:
                        self.hold.add_mean(t, cand[0], self.instant.refresh_s)
                else:
                    self._undecided.append((t, cand[0]))
                    if inst is None:
                        out.append(Reading(self.key, t, power_w=cand[0]))
                        quiet.add_sample(t, cand[0])
        quiet.read(now, allowed=self.mean.stamps.read_stamped is False)   # (see sensors/quiet.py)
        return not failed

    def _points(self) -> bool:
        """The evidence says field 186 is a refresh-stamped point sample (not a box)."""
        return self.hold.verdict == "point" and self.instant.stamps.read_stamped is False

    def _held_back(self, t: float, w: float) -> float:
        """The power the ledger holds back from ``t`` to the value before (a box's own value).
        A point sample's is the trapezoid's: the mean of it and the one before, where that came
        one refresh before (held back as they were, 100 ms point samples moved every edge 50 ms
        early: 1.5 s jobs under a jittered 1 s square read 5.8-7.3 % p90)."""
        prev, self._last_instant = self._last_instant, (t, w)
        if prev is None or not self._points() or t - prev[0] > 1.5 * (self.instant.refresh_s or 0.0):
            return w
        return 0.5 * (prev[1] + w)

    def _fields_due(self, now: float) -> list[int]:
        """The fields to ask for: field 185 only from just before its next refresh. A
        refresh-stamped mean read between its refreshes returns the value already held (it
        refreshes every ~100 ms, field 186 every 20 ms): skipping it took a power-only GPU's
        read from ~43 to ~30 us on the fake. Read-stamped or not yet judged: at every read."""
        fields = self._fields
        mean = self.mean
        if len(fields) < 2 or self._field_fails or mean.last_t is None or mean.stamps.read_stamped is not False:
            return fields
        period = mean.refresh_s
        if period is None or now >= mean.last_t + period - MEAN_EARLY_S:
            return fields
        return FIELDS_INSTANT

    def next_read_at(self) -> float | None:
        """Just after the next instant value is expected, so every value is read once."""
        period = self.instant.refresh_s
        if not self.instant_ok or period is None or self.instant.last_t is None:
            return None
        if self.instant.stamps.read_stamped:
            # Read-stamped values are dated by the read interval: read a few times per refresh.
            return (self.instant.last_read_t or 0.0) + max(MIN_FIELD_PERIOD_S, 0.25 * period)
        return self.instant.last_t + max(MIN_FIELD_PERIOD_S, period) + FIELD_READ_DELAY_S

    def read_window(self) -> tuple[float, float] | None:
        """(earliest, latest): a read in between sees the next instant value, and no value is
        missed. Refresh-stamped values hold a period, so a read up to a period after the next
        one is expected still sees it (the sensor reads several GPUs at once that way). None
        for read-stamped values: they are point samples, read at every jittered tick (read on
        a fixed beat, they aliased with a load locked to it: 1.5 s jobs 1.7 -> 7.0 %). None
        until the stamps are judged, too: that needs reads at every offset from a refresh,
        not only just after one."""
        at = self.next_read_at()
        if at is None or self.instant.stamps.read_stamped is not False:
            return None
        return at, at + max(MIN_FIELD_PERIOD_S, self.instant.refresh_s or 0.0) - 2 * FIELD_READ_DELAY_S

    @property
    def reference(self) -> PowerReference:
        instant = ""
        if self.instant_ok:
            refresh = self.instant.refresh_s
            point = ", point samples" if self._points() else ""
            instant = f"field 186 ({self.instant.stamp_kind}{point}" + \
                (f", refreshing every {refresh * 1000:.0f} ms)" if refresh else ")")
        src = "field 185" if self.average_ok else "nvmlDeviceGetPowerUsage"
        verdict = self.mean_evidence.verdict if self.instant_ok else self.self_evidence.verdict
        if verdict is None and self.average_ok:
            return PowerReference("trailing_mean", src, "field 185 is NVML's averaged power, and no load "
                                  "change has contradicted a 1 s mean yet", instant, self.instant.refresh_s)
        if verdict:
            how = "tracks the mean of field 186 over the last second" if self.instant_ok else \
                "moves like a 1 s mean (never jumps across its range)"
            return PowerReference("trailing_mean", src, f"{src} {how}", instant, self.instant.refresh_s)
        if self.instant_ok:
            why = ("no averaged reading tracks the last second's mean" if verdict is False else
                   "no load change has yet shown whether the averaged reading is a 1 s mean")
            return PowerReference("instant", "field 186", why, "", self.instant.refresh_s)
        why = ("it jumps with the load: an instantaneous value" if verdict is False else
               "no load change has yet shown whether it is a 1 s mean")
        return PowerReference("instant", src, why)
