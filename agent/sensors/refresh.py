"""Timing a polled counter that refreshes on its own schedule (NVML energy: every 100 ms).

A read at time r returns the value as of the counter's last refresh, not as of r. Stamping the
value with r would lag the true curve by up to one refresh period and bias every window edge.
Each observed change brackets one refresh instant inside (previous read, this read]. Refreshes
are periodic (measured 99.97 ms on an H100), so each bracket is also a set of possible phases
modulo the period. The tracker keeps the phases every recent bracket allows (at most two arcs
of the circle), widened a little per period for drift; an empty set (an irregular counter, a
period far off the nominal one) restarts it from the new bracket.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .refresh_period import FIT_SIGMAS, JITTER_S as PERIOD_JITTER_S, PeriodEstimate, PhaseFit

Arc = tuple[float, float]   # (start phase in [0, period), length in [0, period])
RESYNC_SLACK_S = 0.008      # after a conflict, phases this far beyond the allowances stay possible
FIRST_BRACKET_S = 0.02      # the first dated change needs a bracket this narrow...
MAX_WIDE_SKIPS = 3          # ...unless this many changes have come in wider ones
LATE_UNSURE_SHARE = 0.25    # a phase known no better than this share of a period dates no value pending
AMBIGUOUS_MARGIN_S = 0.003  # a refresh may come this much earlier than its allowed phases say
PERIOD_CHANGE = 0.05        # a measured period this far from the one in use replaces it,
ROUGH_CHANGE = 0.25         # (within this far, only once fitted over many periods)...
PERIOD_REFINE = 0.001       # ...and once one has, a finer one this far off (and past its own
                            # precision) refines it
MEASURED_DRIFT = 0.003      # drift allowed per period on a measured period (its precision)...
MAX_MEASURED_DRIFT = 0.1    # (the allowance a measured period's own precision may ask for)
FIT_BRACKET = 0.25          # ...until brackets this narrow (a share of the period), a count of
                            # periods apart, measure it closer (PhaseFit)
FIT_BRACKET_MAX_S = 0.05    # (and no wider: a 1 s counter's reads at the cadence, 100 ms apart,
                            # fitted its period 2 sd off)
NOMINAL_SIGMAS = 4.0        # a nominal period is left for the fit's only this many sd off it,
NOMINAL_MIN_OFF = 0.0001    # and this share of a period (under 1 ms over pairs 8 s apart: an
                            # exact clock's fit crossed 3 sd by chance after ~2 min, 0.003 % off),
NOMINAL_MIN_POINTS = 12     # over this many brackets (six, a burst's and one 17 s on, claimed
                            # 0.04 % off an exact clock: a lone far bracket sets the slope)
FIT_MIN_POINTS = 6          # brackets fitted before the fit's period is used
DOUBT_PERIODS = 1.5         # one value read over this many periods apart doubts the period
CURRENT_MAX_S = 0.010       # a counter shown to refresh at least this often is dated at its reads
AMBIGUOUS_SHARE = 0.1       # this share of the allowed phases dating a change a period apart leaves it undated
MAX_JITTER_SHARE = 0.45     # the jitter allowance follows what the reads show, up to this share of a period
UNCONFIRMED_JITTER_SHARE = 0.1   # (this share on a nominal period the reads have not confirmed)
JITTER_MIN_PINNED = 8       # refreshes pinned by narrow brackets before their spread is believed
JITTER_PINNED_KEPT = 16     # (the newest this many)
JITTER_MARGIN_S = 0.001     # the allowance is the spread they show plus this
CONFIRM_SPREAD = 0.25       # pinned refreshes this close to the period's grid confirm it


def _pieces(arcs: list[Arc], period: float) -> list[tuple[float, float]]:
    """Arcs as sorted, merged intervals of [0, period]."""
    out = []
    for s, n in arcs:
        if n >= period:
            return [(0.0, period)]
        if s + n <= period:
            out.append((s, s + n))
        else:
            out += [(s, period), (0.0, s + n - period)]
    out.sort()
    merged: list[tuple[float, float]] = []
    for lo, hi in out:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _arcs(pieces: list[tuple[float, float]], period: float) -> list[Arc]:
    """Merged intervals back to arcs, joining the pieces that meet across 0."""
    if not pieces:
        return []
    if len(pieces) > 1 and pieces[0][0] <= 0.0 and pieces[-1][1] >= period:
        first, last = pieces[0], pieces[-1]
        pieces = [(last[0], period + first[1])] + pieces[1:-1]
    return [(lo % period, hi - lo) for lo, hi in pieces]


def _intersect(arcs: list[Arc], bracket: Arc, period: float) -> list[Arc]:
    out = []
    b = _pieces([bracket], period)
    for lo, hi in _pieces(arcs, period):
        for b_lo, b_hi in b:
            x_lo, x_hi = max(lo, b_lo), min(hi, b_hi)
            if x_lo <= x_hi:
                out.append((x_lo, x_hi))
    return _arcs(_pieces([(lo, hi - lo) for lo, hi in out], period), period)


@dataclass
class RefreshTracker:
    period_s: float = 0.1
    drift_per_period: float = 0.0005   # fraction of a period the phase may wander per period
    jitter_s: float = 0.003            # one refresh may come this early or late (H100: +-2.5 ms; more
                                       # where the refreshes the reads pin show more: _measure_jitter)
    min_jitter_s: float = 0.0003       # ...but assume only this until reads disagree (see observe)
    min_drift_per_period: float = 0.00005  # likewise for drift
    _last_value: float | None = None
    _prev_read: float | None = None    # last read that still saw the old value
    _arcs: list[Arc] = field(default_factory=list)
    _arcs_t: float = 0.0               # when the arcs were last narrowed
    _fast_changes: int = 0             # consecutive fast reads that all saw a change
    # Two consecutive changes put two refreshes inside a span (``PeriodEstimate.within_s``):
    # the counter refreshes at least that often. Where reads show that it does within
    # CURRENT_MAX_S, every value is current to within this (None: no such evidence, or a later
    # value held longer than that).
    current_within_s: float | None = None
    dated: bool = False                # some value has been dated (the first change was seen)
    _uncertainty: float = 0.1          # cached: read on every sampler wake-up
    _wide_skips: int = 0               # first changes left undated for a wide bracket
    # A change seen where the next refresh may have just landed: (value, date if it is the
    # refresh before, date if it is that one, the read, end of the window), settled next read.
    _pending: tuple[float, float, float, float, float] | None = None
    resolved: list[tuple[float, float]] = field(default_factory=list)
    periods: PeriodEstimate = field(default_factory=PeriodEstimate)   # the period the reads show
    measured: bool = False             # period_s was measured from the reads (not nominal)
    doubted: bool = False              # a value outlived the period; none measured since
    _precision_s: float = float("inf")  # how far off the measured period_s may be
    doubted_t: float = 0.0             # the read that doubted it
    conflicts: int = 0                 # brackets that fell outside the allowed phases, so far
    _changed_read: float | None = None  # the end of the call that first saw the current value
    # The period fitted to brackets a count of periods apart (see _fit_period).
    fit: PhaseFit | None = None
    _fit_conflicts: int = 0            # conflicts when the newest bracket was fitted
    # (drift_per_period, the drift in use, _precision_s) from before the fit took over
    _unfitted: tuple[float, float, float] = (MEASURED_DRIFT, MEASURED_DRIFT, float("inf"))
    _fit_used: bool = False            # the period in use is (or was) the fit's
    _jitter: float = field(init=False)  # the allowances in use (grow to jitter_s and
    _drift: float = field(init=False)   # drift_per_period when brackets conflict)
    _jitter_start: float = field(init=False)   # jitter_s as built (_measure_jitter moves it from there)
    _pinned: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=JITTER_PINNED_KEPT))

    def __post_init__(self) -> None:
        # A full allowance on a counter that keeps time leaves the centre of the allowed phases
        # off by up to half a read gap, so start small (see observe).
        self._jitter = min(self.min_jitter_s, self.jitter_s)
        self._drift = min(self.min_drift_per_period, self.drift_per_period)
        self._jitter_start = self.jitter_s

    def observe(self, read_t: float, value: float, end_t: float | None = None) -> float | None:
        """Feed one read, taken between ``read_t`` and ``end_t`` (when the call returned).
        Returns the estimated time of ``value`` if it is new, else None."""
        if self._pending is not None:
            self._settle(read_t, value)
        if self._last_value is None:
            # The first value is as of an unknown refresh up to a period ago: dating it at the
            # read would charge a new meter for energy burned before it started. Wait for a change.
            self._last_value, self._prev_read = value, read_t
            return None
        if value == self._last_value:
            self._prev_read = read_t
            self._fast_changes = 0
            within = self.current_within_s
            if within is not None and self._changed_read is not None and \
                    read_t - self._changed_read > 2.0 * within + AMBIGUOUS_MARGIN_S:
                # Held longer than a counter that fast would: it is not (or no longer) that fast.
                self.current_within_s = None
                self._measure()
            if not self.doubted and self._changed_read is not None and \
                    read_t - self._changed_read > DOUBT_PERIODS * self.period_s + self.jitter_s:
                self._doubt(read_t)
            return None
        prev = self._prev_read if self._prev_read is not None else read_t - self.period_s
        self._last_value, self._prev_read = value, read_t
        call_t = read_t
        read_t = max(read_t, end_t if end_t is not None else read_t)
        # From the end of the call that saw the change: a slow call (a starved reader) may
        # have taken the value well after it began, and the span until a later read that
        # still sees it is then no evidence of a slow counter.
        self._changed_read = read_t
        self._check_period(prev, read_t)
        p = self.period_s
        # A counter that refreshes every few ms (or is computed at each call) contradicts any
        # refresh grid a period apart: dated on one, steady 1.5 s jobs read 5-6 % off. Where
        # two consecutive changes show two refreshes within CURRENT_MAX_S, every change from
        # then on is dated inside that span before its read.
        bound = self.periods.within_s        # this change and the one before (_check_period)
        if bound is not None and 0.0 < bound < min(0.25 * p, CURRENT_MAX_S):
            within = self.current_within_s
            self.current_within_s = bound if within is None else min(within, bound)
        within = self.current_within_s
        if within is not None:
            self.dated = True
            self._arcs, self._pending = [], None
            self._measure()
            return 0.5 * (max(prev, read_t - within) + read_t)
        if not self._arcs and read_t - prev > FIRST_BRACKET_S and self._wide_skips < MAX_WIDE_SKIPS:
            # No phase known yet and a wide bracket (a reader held up past a refresh right
            # after start): dating this value is a guess anywhere in the last period, up to
            # 100 ms off. Leave it undated, as the very first value; the next change is seen
            # by reads a few ms apart.
            self._wide_skips += 1
            return None
        self.dated = True
        # Several changes in a row on reads much closer than a period: the counter refreshes
        # at least as often as we read it, so the value is current.
        self._fast_changes = self._fast_changes + 1 if read_t - prev < 0.5 * p else 0
        if self._fast_changes >= 3:
            self._arcs = []
            self._measure()
            return read_t
        lo, hi = max(prev, read_t - p), read_t
        # Every bracket is widened by the jitter allowance in use: small at first, the full
        # allowance once brackets conflict (a jittery refresh, as on an H100), and the full
        # allowance follows the spread that pinned refreshes show (_measure_jitter).
        if 0.0 <= hi - lo <= min(FIT_BRACKET * p, FIT_BRACKET_MAX_S):
            self._measure_jitter(lo, hi)
        j = self._jitter
        bracket: Arc = ((lo - j) % p, min(p, hi - lo + 2 * j))
        arcs = self._widened(read_t)
        narrowed = _intersect(arcs, bracket, p) if arcs else []
        if arcs and not narrowed:
            # A conflict: this clock jitters or drifts. Take the full allowances from now on,
            # and re-sync near the old estimate (it lagged a drifting clock by a few ms)
            # rather than from this bracket alone, which may be a whole period wide.
            self.conflicts += 1
            self._jitter, self._drift = self.jitter_s, self.drift_per_period
            j = self._jitter
            bracket = ((lo - j) % p, min(p, hi - lo + 2 * j))
            narrowed = _intersect(self._widened(read_t, extra=j + RESYNC_SLACK_S), bracket, p)
        # Lost the lock (arcs but no overlap even so): the old estimate still dates this value best.
        dating = self._arcs if arcs and not narrowed else narrowed or [bracket]
        self._arcs = narrowed or [bracket]
        self._arcs_t = read_t
        if hi - lo <= min(FIT_BRACKET * p, FIT_BRACKET_MAX_S):
            # The count since the newest fitted bracket is plain where the phases kept since
            # then (no conflict) were narrower than half a period here.
            plain = bool(arcs) and bool(narrowed) and self.conflicts == self._fit_conflicts and \
                self._spread(arcs) < 0.5 * p
            self._fit_period(lo, hi, plain)
        self._measure()
        start, length = max(dating, key=lambda a: a[1])
        t = self._instance(start, length, lo, hi, j)
        far = sum(n for s, n in dating if abs(self._instance(s, n, lo, hi, j) - t) > 0.5 * p)
        if far >= AMBIGUOUS_SHARE * sum(n for _, n in dating):
            # The phases left split at the two ends of a bracket about a period wide: the
            # refresh came just after the read before or just before this one, a period apart
            # (a clock jittering past its allowance), and neither is much likelier. Dated at
            # either, a steady job was off by a whole period of energy (1.1 %); left undated,
            # its energy comes with the next value.
            return None
        # The next predicted refresh after t, and how early it may land: the allowed phases
        # plus a full jitter allowance (a narrow lock can still be a few ms off).
        nxt = t + p
        early = nxt - (0.5 * length + self.jitter_s + AMBIGUOUS_MARGIN_S)
        if hi - lo >= 0.9 * p and hi >= early:
            # The read falls where the next refresh may already have landed: the value is that
            # refresh (it came early) or the one before. A pair's first read is in this spot
            # by design; the next read tells which (see _settle).
            self._pending = (value, t, 0.5 * (max(early, lo) + hi), hi, nxt)
            return None
        unsure = 0.5 * length + j
        if t - p > lo - unsure and (
                (end_t is not None and t > call_t) or (t > call_t - unsure and unsure < LATE_UNSURE_SHARE * p)):
            # The refresh at t may have landed while the call ran (a read held up, a slow
            # call), or, the phase being known only to +-unsure, just after the read began:
            # after the moment the value was taken, then the value is the refresh before, a
            # whole period earlier. The next read tells which (see _settle).
            self._pending = (value, t - p, t, hi, t)
            return None
        return t

    def _measure_jitter(self, lo: float, hi: float) -> None:
        """Take the jitter allowance from the refreshes the reads pin (a bracket narrower than
        a quarter period): the least spread about the line through the recent ones, scaled
        for the few seen (a uniform jitter's extremes). A clock that keeps time keeps the
        allowance it was built with; one jittering +-20 ms on a 100 ms counter had values
        dated a period off with 3 ms (steady 1.5 s jobs 4.7 % off)."""
        pinned = self._pinned
        pinned.append((lo, hi))
        n = len(pinned)
        if n < JITTER_MIN_PINNED:
            return
        # Each refresh counted from the newest on the period in use, and the line through them
        # taken out (a period a little off, 99.97 ms read as 100, drifts 18 ms a minute).
        p = self.period_s
        ref = 0.5 * (pinned[-1][0] + pinned[-1][1])
        pts = [(round((0.5 * (a + b) - ref) / p), 0.5 * (a + b) - ref, 0.5 * (b - a)) for a, b in pinned]
        k_mean = sum(k for k, _, _ in pts) / n
        x_mean = sum(x for _, x, _ in pts) / n
        kk = sum((k - k_mean) ** 2 for k, _, _ in pts)
        slope = sum((k - k_mean) * (x - x_mean) for k, x, _ in pts) / kk if kk > 0.0 else p
        res = [(x - slope * k, half) for k, x, half in pts]
        low = max(r - h for r, h in res)      # the latest start and the earliest end
        high = min(r + h for r, h in res)
        spread = max(0.0, 0.5 * (low - high)) * (n + 1) / (n - 1)
        # Refreshes that keep to the period in use within a quarter of it confirm that period,
        # as the period's own brackets do (those, blurred by a jitter this large, may not).
        # (Unconfirmed, the spread may be a wrong period's: a 50 ms counter's on the nominal
        # 100 ms, allowed 29 ms, hid the period from its measurement. Less is allowed there.)
        confirmed = self._confirmed() or (abs(slope - p) <= PERIOD_CHANGE * p and spread <= CONFIRM_SPREAD * p)
        cap = (MAX_JITTER_SHARE if confirmed else UNCONFIRMED_JITTER_SHARE) * p
        jitter = min(cap, max(self._jitter_start, spread + JITTER_MARGIN_S))
        if jitter != self.jitter_s:
            grew = jitter > self.jitter_s
            self.jitter_s = jitter
            if grew or self._jitter > jitter:
                self._jitter = jitter
            self.periods.jitter_s = self._period_jitter_s()

    def _confirmed(self) -> bool:
        """The reads measured the period in use, or agree with it."""
        p, agreed = self.period_s, self.periods.period_s
        return self.measured or (agreed is not None and abs(agreed - p) <= PERIOD_CHANGE * p)

    def _period_jitter_s(self) -> float:
        """The jitter the period's brackets allow: theirs, plus what this allowance has grown by."""
        return PERIOD_JITTER_S + self.jitter_s - self._jitter_start

    def _instance(self, start: float, length: float, lo: float, hi: float, j: float) -> float:
        """The refresh of the phase arc (start, length) that a change seen in [lo, hi] came
        from: the latest instance at or before ``hi`` (a bracket a whole period wide holds the
        phase twice), unless that one lies well before ``lo``, when the refresh came a little
        earlier than the next instance."""
        p = self.period_s
        phase = start + 0.5 * length
        t = hi - ((hi - phase) % p)
        if t < lo - (0.5 * length + j):
            t += p
        return min(max(t, lo), hi)

    def _check_period(self, before_t: float, seen_t: float) -> None:
        """Measure the period from this change and the one before; a period the reads
        contradict is replaced, and the phases known on it are dropped (they were on the wrong
        circle)."""
        self.periods.change(before_t, seen_t)
        measured = self.periods.period_s
        if measured is None:
            return
        self.doubted = False
        # Off the nominal period by a few per cent is a clock's spread, which the drift
        # allowance covers. A measured period is refined only by a finer measurement (the
        # deepest overlap of the brackets wanders by a few per cent as they come and go).
        if self.measured:
            if self.periods.precision_s >= self._precision_s or \
                    abs(measured - self.period_s) <= max(PERIOD_REFINE * self.period_s, self.periods.precision_s):
                return
        elif abs(measured - self.period_s) <= max(PERIOD_CHANGE * self.period_s, self.periods.precision_s):
            # (Within the measurement's own precision the period in use is not contradicted: a
            # 100 ms counter read at the cadence, ~100 ms apart, gave brackets that overlapped
            # most deeply at 94-207 ms, and was taken for a 155 ms one.)
            return
        elif abs(measured - self.period_s) <= ROUGH_CHANGE * self.period_s and not self.periods.fitted:
            # A few per cent off from a handful of brackets, before the fit over many periods
            # agrees: a clock that jitters by +-7.5 ms shows that by chance (a 100 ms counter
            # taken for 105 ms, every value then dated tens of ms off). A 20 or 200 ms counter
            # is far enough off to be believed at once.
            return
        old_p = self.period_s
        refined = self.measured and abs(measured - old_p) <= PERIOD_CHANGE * old_p
        self.period_s, self.measured = measured, True
        self._drop_fit()
        self._precision_s = self.periods.precision_s
        # A measured period is good to a few parts in a thousand, or to its own precision where
        # that says less (a 1 s counter's first estimate, 2 % off and allowed 0.3 %, looked
        # locked while its phases moved ~20 ms a period: values dated half a period off, single
        # 1.5 s jobs -22 %). Allow that much drift until the fit over brackets far apart narrows
        # it (_fit_period).
        self.drift_per_period = self._drift = max(MEASURED_DRIFT, min(MAX_MEASURED_DRIFT, self._precision_s / measured))
        if refined:
            # A measured period refined by a finer measurement: the phases as of their newest
            # narrowing carry over onto it (dropped, a 1 s counter refined from 981 to 1002 ms
            # had the value seen right then dated in the middle of its 1 s bracket, half a
            # second off: +4-6 % on bursty 8 s jobs).
            t = self._arcs_t
            self._arcs = [((t - ((t - s) % old_p)) % measured, min(n, measured)) for s, n in self._arcs]
            self._measure()
            return
        # Brackets that conflicted on the old period said nothing of this clock's jitter.
        self.jitter_s = self._jitter_start
        self._pinned.clear()
        self.periods.jitter_s = self._period_jitter_s()
        self._jitter = min(self.min_jitter_s, self.jitter_s)
        self._arcs, self._pending, self._fast_changes = [], None, 0
        self._measure()

    def _fit_period(self, lo: float, hi: float, plain: bool) -> None:
        """Fit one refresh bracket (a change seen by reads a small share of a period apart) to
        the counter's clock, and once the fit knows the period better than the estimate (or
        the nominal period's drift allowance) did, use its period and allow only the drift its
        precision leaves.

        ``MEASURED_DRIFT`` (0.3 % a period) is what a handful of brackets measure a period to:
        it widened a 50 ms or 200 ms counter's phases past the lock between pairs, so they were
        re-locked by a 0.5 s burst of reads every ~10 s (~11 and ~17 counter reads a second).
        The fit (``PhaseFit``) measures the period to the brackets' scatter over the count
        between them, so the allowance narrows as the run grows.

        A nominal 100 ms period is left for the fit's only where the fit contradicts it (over
        NOMINAL_MIN_POINTS brackets, NOMINAL_SIGMAS sd and NOMINAL_MIN_OFF off it): an H100's
        99.97 ms clock leaves the nominal grid by 0.3 ms a second, so pairs a few seconds apart
        were planned ~5 ms late on average, their first read often saw the refresh already,
        and each such miss was chased (real time, 8 GPUs, 3.5 ms calls: ~7.6 counter reads a
        second, ~5 with the fit). An exact clock keeps its nominal period (a fit 0.015 % off
        it, within its 4 sd, dated steady 1.5 s jobs 0.1 % off).

        A bracket that contradicts the fit (a clock that drifts or jumps) starts it again, on
        the allowances from before the fit took over."""
        p = self.period_s
        fit = self.fit
        self._fit_conflicts = self.conflicts
        added = None
        if fit is not None:
            steps = round((0.5 * (lo + hi) - fit.last_centre_s) / p) if plain else None
            added = fit.add(lo, hi, steps)
            if added is False:
                if self._fit_used:
                    # Back to the allowances (and the precision) from before the fit took over.
                    self.drift_per_period, self._drift, self._precision_s = self._unfitted
                    self._fit_used = False
                fit = None
        if fit is None:
            sd = min(max(MEASURED_DRIFT * p, self._precision_s), PERIOD_CHANGE * p)
            self.fit = PhaseFit(0.5 * (lo + hi), p, sd, hi - lo)
            return
        if not added or fit.points < FIT_MIN_POINTS:
            return
        period, sd = fit.estimate()
        drift = FIT_SIGMAS * sd / p
        if drift >= self.drift_per_period or FIT_SIGMAS * sd >= self._precision_s:
            return
        agrees = fit.points < NOMINAL_MIN_POINTS or abs(period - p) <= max(NOMINAL_SIGMAS * sd, NOMINAL_MIN_OFF * p)
        if not self.measured and not self._fit_used and agrees:
            return       # the fit does not contradict the nominal period: no reason to move off it
        if not self._fit_used:
            # (A measured period's first allowance is for its first estimate's precision: the
            # fit has measured it since.)
            self._unfitted = (MEASURED_DRIFT, MEASURED_DRIFT, self._precision_s) if self.measured else \
                (self.drift_per_period, self._drift, self._precision_s)
        if period != p:
            # The phases as of their newest narrowing, on the finer period.
            t = self._arcs_t
            self._arcs = [((t - ((t - s) % p)) % period, min(n, period)) for s, n in self._arcs]
            self.period_s = period
        self._precision_s = FIT_SIGMAS * sd
        self.drift_per_period = self._drift = max(self.min_drift_per_period, drift)
        self._fit_used = True

    def _drop_fit(self) -> None:
        """Forget the fit, and that its period was in use (a new period, or doubt about it)."""
        self.fit, self._fit_used = None, False

    @property
    def fitted(self) -> bool:
        """The period in use comes from the fit over brackets a count of periods apart."""
        return self.fit is not None and self._fit_used and self.drift_per_period < MEASURED_DRIFT

    def _doubt(self, read_t: float) -> None:
        """One value held longer than the period allows: the counter refreshes more slowly
        than assumed (or it stalled). The phases on the assumed period are dropped, so the
        sensor reads densely again, and the period is measured afresh."""
        self.doubted, self.doubted_t = True, read_t
        self.periods, self._precision_s = PeriodEstimate(self._period_jitter_s()), float("inf")
        self._drop_fit()
        self._arcs, self._pending = [], None
        self._measure()

    def _settle(self, read_t: float, value: float) -> None:
        """Date a value left pending (see observe) by the read after it. An unchanged value
        means the refresh had come before that first read: it is dated inside the part of the
        allowed window before it. A change means the first read saw the refresh before; this
        read's change is then dated as usual by observe. Where the other reading keeps
        AMBIGUOUS_SHARE of the refresh's allowed window (the phase known to a few ms, the
        allowed phases plus the jitter), the value is left undated (its energy comes with the
        next dated value) rather than dated a whole period off: an unchanged value read while
        the predicted refresh may still be to come, or a change seen by a read late enough for
        the refresh after the predicted one to have come as well. (A counter clock jittering
        past its allowance, +-7.5 ms: steady 8 s jobs were off by a whole period, 1.1 %.)"""
        pending_value, early, late, _, nxt = self._pending  # type: ignore[misc]
        self._pending = None
        half = 0.5 * self._uncertainty + self.jitter_s       # the refresh lands within nxt +- half
        # (On a measured period the prediction is also off by its precision, times the periods
        # since the phase was seen: the whole window stays ambiguous. On a 1 s counter, a
        # narrower one dated 1.5 s jobs a period off: +-57 %.)
        slack = half if self.measured else (1.0 - 2.0 * AMBIGUOUS_SHARE) * half
        # Where the phase is not known to half a period, no read could tell: take the likelier.
        guess = not self.measured and self._uncertainty >= 0.5 * self.period_s
        if value != pending_value:
            if guess or read_t < nxt + self.period_s - slack:
                self.resolved.append((early, pending_value))
        elif guess or read_t > nxt + slack:
            self.resolved.append((late, pending_value))

    def take_resolved(self) -> list[tuple[float, float]]:
        """(time, value) of values left pending and dated since the last call, oldest first."""
        out, self.resolved = self.resolved, []
        return out

    def next_refresh_after(self, t: float) -> float | None:
        """The first refresh expected after t, from the best-supported phase (None: unknown)."""
        if self.current_within_s is not None:
            return t + 0.5 * self.current_within_s     # a counter this fast refreshes any moment
        if not self._arcs:
            return None
        p = self.period_s
        start, length = max(_arcs(_pieces(self._arcs, p), p), key=lambda a: a[1])
        phase = (start + 0.5 * length) % p
        return t + ((phase - t) % p)

    def uncertainty_at(self, t: float) -> float:
        """How far apart the phases a refresh at ``t`` may take lie: the allowed phases widened
        for the drift allowed since they were narrowed (a period when nothing is known)."""
        if self.current_within_s is not None:
            return self.current_within_s
        if not self._arcs:
            return self.period_s
        return self._spread(self._widened(t))

    @property
    def uncertainty_s(self) -> float:
        """How far apart the refresh phases still allowed lie (a period when nothing is known)."""
        return self._uncertainty

    def _measure(self) -> None:
        if self.current_within_s is not None:
            self._uncertainty = self.current_within_s
            return
        if not self._arcs:
            self._uncertainty = self.period_s
            return
        self._uncertainty = self._spread(_arcs(_pieces(self._arcs, self.period_s), self.period_s))

    def _spread(self, arcs: list[Arc]) -> float:
        """How far apart merged ``arcs`` lie: their lengths, and half a period for each gap."""
        return min(self.period_s, sum(n for _, n in arcs) + (len(arcs) - 1) * self.period_s / 2)

    def _widened(self, now: float, extra: float = 0.0) -> list[Arc]:
        p = self.period_s
        periods = max(1.0, (now - self._arcs_t) / p)
        grow = min(0.5 * p, self._drift * p * periods + extra)
        return _arcs(_pieces([((s - grow) % p, min(p, n + 2 * grow)) for s, n in self._arcs], p), p)
