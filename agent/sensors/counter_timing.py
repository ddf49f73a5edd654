"""When to read a GPU's energy counter, and when its values were taken.

Reading the energy counter cost 3.5 ms of CPU per call on an H100 (field 186: 10 us), so where
instant power shapes the spans between counter reads, the counter is read every few seconds as
a *pair* of reads straddling a predicted refresh (sensors/refresh.py dates each change to a
few ms). Calibration bursts of fast reads lock the refresh phase; pairs keep it locked. A
counter that holds one value while the GPU draws power has stalled, and one that fails is
faulted: instant power then bridges its gaps (the ledger does the bridging).

On counters refreshing every 0.5 s or faster a pair is split: reads 8 ms apart across the
predicted refresh's allowed phases (16-48 ms), up to the first that sees it, so its bracket is
narrower than the allowed phases and keeps them narrow. (Two reads 16 ms apart only confirmed
the prediction: on the H100's measured clock, 99.97 ms +-2.5 ms, with cheap calls, the phases
widened at every pair until the lock was lost, and a 0.5 s calibration burst re-locked it
every ~20 s: ~8 counter reads a second per GPU.) Steady pairs that hit stretch the gap between
them from 4 to 8 s (16 s on a fitted period, where the lock allows); a pair that misses resets
it and is read again a period on (<= 5 reads) instead of a burst, so the lock can be looser,
and a locked counter sits bursts out. Where the call is dear (measured around each call),
pairs are centred on the calls' middles, and a counter too coarse to shape is read in pairs
too, except just after an edge (see CounterTiming).
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from .refresh import RefreshTracker

CALIBRATE_S = 0.5             # a burst of fast reads that dates counter refreshes to a few ms...
RECALIBRATE_S = 10.0          # ...repeated while the phase of some counter is still uncertain
MAX_RECALIBRATE_S = 300.0
PHASE_LOCKED_S = 0.025        # phases known to this: pairs 16 ms apart straddle the refresh
CHASED_LOCK_S = 0.05          # ...or this, a share CHASED_LOCK_SHARE of the period, where a
CHASED_LOCK_SHARE = 0.4       # pair that misses is read again a period on (split pairs)
COUNTER_PERIOD_S = 4.0        # steady pairs this far apart at first...
MAX_PAIR_GAP_S = 8.0          # ...stretched up to this while every pair straddles its refresh
FITTED_MAX_PAIR_GAP_S = 16.0  # ...or this, once the period is fitted (_max_pair_gap_s)
PAIR_HITS_TO_STRETCH = 3      # pairs in a row that straddled their refresh before the gap doubles
SPLIT_MAX_PERIOD_S = 0.5      # counters refreshing at least this often get judged, split pairs
CHASE_MAX_S = 0.1             # a pair that missed its refresh is read again this far on, at most
DENSE_START_S = 0.3           # back-to-back reads at start, at most this long (a stuck counter)
PAIR_HALF_GAP_S = 0.008
PAIR_MAX_HALF_S = 0.024       # a split pair reads at most this far either side of the prediction
PAIR_SHIFT_S = 0.004
PAIR_MARGIN_S = 0.003         # a pair started on a cadence read keeps the refresh this far inside
PIGGYBACK_S = 3.0             # how long a steady pair waits for such a read before its own wake-up
STALL_S = 1.0                 # a counter unchanged this long while the GPU draws power has stalled
STALL_MIN_W = 1.0
MEASURE_S = 10.0              # after a value outlived the period: read at the cadence this long
DEAR_CALL_S = 0.0005          # a counter call this slow (the fastest of the last few) is dear...
DETAIL_S = 30.0               # ...and read sparsely even where unshaped, except this long after an edge
CALL_COSTS_KEPT = 8


class Calibration:
    """Sensor-wide bursts of fast reads: CALIBRATE_S at start, then every RECALIBRATE_S while
    some counter's refresh phase is unknown to within PHASE_LOCKED_S, backing off."""

    def __init__(self) -> None:
        self.burst_start: float | None = None
        self.recalibrate_s = RECALIBRATE_S

    def calibrating(self, now: float) -> bool:
        return self.burst_start is not None and now - self.burst_start < CALIBRATE_S

    def wants_fast(self, now: float, unlocked: bool) -> bool:
        if self.calibrating(now):
            return True
        start = self.burst_start
        if not unlocked:
            self.recalibrate_s = RECALIBRATE_S
        elif start is None or now - start >= self.recalibrate_s:
            # Each burst costs ~100 counter reads (~0.35 s of CPU on an H100): back off while
            # a counter will not lock (an irregular refresh), up to once every 5 minutes.
            if start is not None:
                self.recalibrate_s = min(MAX_RECALIBRATE_S, 2 * self.recalibrate_s)
            self.burst_start = now
            return True
        return False


@dataclass
class CounterTiming:
    """One GPU's counter: when to read it next, and the dating of what it returns."""

    shaped: bool                      # instant power shapes its spans (else read every time, unless dear)
    rng: random.Random = field(default_factory=random.Random)
    tracker: RefreshTracker = field(default_factory=lambda: RefreshTracker(period_s=0.1))
    next_counter_at: float = 0.0      # when the counter is next read (locked phase)
    pair_second: float | None = None  # the second read of a pending pair
    pair_due: float = math.inf        # from when a steady pair may start on a cadence read
    fault: bool = False               # failed or stalled since its last good change
    changed_t: float | None = None    # read time of its last change
    stall_reported: bool = False
    last_value: float | None = None   # the raw value last read
    # Steady pairs every pair_gap_s. The counter call is dear on an H100 (3.5 ms of CPU: 8 GPUs
    # paired every 4 s are ~1.1 % of a core), and a clock whose phase holds needs pairs less
    # often. Whether it holds is judged from the pairs themselves: a pair "hits" when a later
    # read saw a refresh its first had not, and no bracket since its first read fell outside
    # the allowed phases. Steady pairs that hit in a row stretch the gap; a miss takes it back.
    pair_gap_s: float = COUNTER_PERIOD_S
    pair_hits: int = 0
    _pair_read: int = 0               # the read under way is its pair's k-th (0: no pair's)
    _pair_next: int = 0               # the pair's next read, planned at pair_second, is its k-th
    _pair_start: float = 0.0          # when the pair's first read was planned
    _pair_conflicts: int = 0          # the tracker's conflicts before the pair's first read
    _pair_steady: bool = False        # the pair was planned between edges (only those stretch)
    _chase_until: float = 0.0         # after a miss, reads go on until a change or this time
    _chasing: bool = False            # the pair missed: read again a period on, until _chase_until
    _chase_at: float = 0.0            # the chase's last planned read
    _pair_span_s: float = 2 * PAIR_HALF_GAP_S   # from the pair's first read to its last
    _planned_span_s: float = 2 * PAIR_HALF_GAP_S   # ...and the next planned pair's
    # An unshaped counter is read at every tick, its own ~100 ms spans being all the shape its
    # energy gets. Where the call is dear (3.5 ms of CPU on an H100: 8 GPUs at 10 Hz are ~30 %
    # of a core) it is read in pairs instead, as a shaped one is, except for DETAIL_S after a
    # window edge: a window that short needs every span around its end, and one that ends
    # later is long enough for a coarser end to matter little.
    _call_s: deque[float] = field(default_factory=lambda: deque(maxlen=CALL_COSTS_KEPT))
    _detail_until: float = -math.inf
    _sparse: bool = True              # read in pairs (as of the last due())
    _edge_reads: int = 0              # reads in a row while an edge waits
    _was_calibrating: bool = False    # a calibration burst ran at the last due()
    _in_burst: bool = True            # this counter takes part in the running burst
    _never_locked: bool = True        # its phase has not been locked outside a burst yet

    @property
    def lock_limit_s(self) -> float:
        """How far apart the allowed phases may lie for the counter to count as locked."""
        period = self.tracker.period_s
        if not self.slow_period and self._sparse:
            # A split pair that misses its refresh is read again a period on (a few reads), so
            # it needs no tighter lock than most pairs hitting (a counter read at every tick
            # has no pairs, and keeps the tight lock): with a 3.5 ms call widening each bracket
            # (an H100's), 25 ms was lost every ~20 s on the H100 clock, and each 0.5 s burst
            # to regain it cost ~100 counter reads.
            return min(CHASED_LOCK_S, CHASED_LOCK_SHARE * period)
        return min(PHASE_LOCKED_S, 0.25 * period)

    @property
    def unlocked(self) -> bool:
        tracker = self.tracker
        return tracker.doubted or tracker.uncertainty_s > self.lock_limit_s

    def _max_pair_gap_s(self) -> float:
        """How far apart steady pairs may stretch: FITTED_MAX_PAIR_GAP_S once the period is
        fitted and the drift allowed over that gap widens the phases by under a tenth of the
        lock (an H100's 40 ms lock: 1.6 ms), else MAX_PAIR_GAP_S. (A 20 ms counter's 8 ms lock,
        which its split pairs hold with little to spare, was lost every ~80 s on 16 s pairs.)"""
        tracker = self.tracker
        if tracker.fitted and 2.0 * tracker.drift_per_period * FITTED_MAX_PAIR_GAP_S <= 0.1 * self.lock_limit_s:
            return FITTED_MAX_PAIR_GAP_S
        return MAX_PAIR_GAP_S

    @property
    def slow_period(self) -> bool:
        """The counter refreshes every SPLIT_MAX_PERIOD_S or more (as far as the reads show):
        its pairs are not split, nor judged."""
        return self.tracker.period_s >= SPLIT_MAX_PERIOD_S

    @property
    def slow(self) -> bool:
        """The counter is measured to refresh every SPLIT_MAX_PERIOD_S or more, and its fit
        holds the period to under MEASURED_DRIFT a period (until then the reads at the cadence
        are what measure it)."""
        return self.tracker.fitted and self.slow_period

    def wish(self) -> float | None:
        """When the next counter read is due (counters read in pairs only)."""
        if not self._sparse:
            return None
        return self.pair_second if self.pair_second is not None else self.next_counter_at

    def observe(self, now: float, value_j: float, end_t: float) -> list[tuple[float, float]]:
        """A value read between ``now`` and ``end_t``: the (refresh time, value) pairs dated by
        this read, oldest first: a value left pending by the read before, then this one if it
        is new and dated. (The tracker leaves a first value, or one seen through a wide
        bracket, undated: that is a change all the same, not a stall.)"""
        t = self.tracker.observe(now, value_j, end_t)
        changed = value_j != self.last_value
        self._judge_pair(changed)
        if changed:
            self.last_value = value_j
            self.fault = self.stall_reported = False
            self.changed_t = now
        out = self.tracker.take_resolved()
        if t is not None:
            out.append((t, value_j))
        return out

    def _judge_pair(self, changed: bool) -> None:
        """Follow a pair through its reads, 8 ms apart across the predicted refresh's allowed
        phases. A later read that saw a value the first had not is a hit, which may stretch
        the steady gap. None is a miss: the gap is reset and the refresh chased (below)."""
        k, self._pair_read = self._pair_read, 0
        if k == 0:
            return
        start = self._pair_start
        if changed and k > 1:
            if self._chasing:
                return                    # a chase found the refresh
            if self.tracker.conflicts == self._pair_conflicts:
                self.pair_hits += self._pair_steady
                if self.pair_hits >= PAIR_HITS_TO_STRETCH:
                    self.pair_gap_s, self.pair_hits = min(self._max_pair_gap_s(), 2.0 * self.pair_gap_s), 0
            else:
                self._reset_gap()
            return
        if k == 1 and (self.slow_period or (not self._pair_steady and self.dear)):
            # Two reads 16 ms apart, neither judged:
            # - on a slow counter (a refresh every 0.5 s or more): split pairs and chases cost
            #   its 8 s jobs on a bursty load 0.4 -> 2 % p90, and its calibration is not what
            #   costs CPU;
            # - for an edge on a dear counter: a slow call's value may be from any instant
            #   inside it, so the first read's value is often left for the next read to date,
            #   and a middle read at the predicted refresh comes too early to. The value before
            #   the edge went undated, and the edge was measured from the pair before (H100
            #   clock, 3.5 ms calls, 100 ms square, 1.5 s jobs: p90 0.6 -> 1.7 %). On a cheap
            #   counter split edge pairs date best (a clock jittering +-7.5 ms: 8 s jobs within
            #   0.13 %, against 1.1 % unsplit).
            self.pair_second, self._pair_next = start + 2 * PAIR_HALF_GAP_S, 0
            return
        at = start + k * PAIR_HALF_GAP_S
        end = start + self._pair_span_s
        if self._chasing:
            at = self._chase_at + PAIR_HALF_GAP_S
        elif at > end + 1e-6:
            # No refresh where one was due: the phase moved, the read came late (a busy
            # reader, other GPUs' 3.5 ms calls first), or the counter stalled. The pair is read
            # again a period on, one read wider at each end: a change in a narrow bracket
            # re-locks the phase (a 0.5 s burst is ~100 reads), and a stall is seen ending
            # (else the span after it held too little). (Reads every 8 ms through the period
            # in between cost ~12 reads a miss.)
            self._reset_gap()
            period = min(self.tracker.period_s, CHASE_MAX_S)
            self._chasing = True
            at = start + period - PAIR_HALF_GAP_S
            self._chase_until = end + period + PAIR_HALF_GAP_S
        if at <= (self._chase_until if self._chasing else end) + 1e-6:
            self.pair_second, self._pair_next = at, k + 1
            self._chase_at = at

    def _pair_half_s(self, refresh: float) -> float:
        """Half the span a split pair reads across around a refresh predicted at ``refresh``:
        the phases allowed then, plus a refresh's jitter (PAIR_HALF_GAP_S at least, 24 ms at
        most). A fixed 16 ms missed ~1 pair in 3 in real time on the H100 clock, where late
        wake-ups and 3.5 ms calls add to the drift between pairs, and each miss was chased."""
        if self.slow_period:
            return PAIR_HALF_GAP_S
        tracker = self.tracker
        return min(PAIR_MAX_HALF_S, max(PAIR_HALF_GAP_S, 0.5 * tracker.uncertainty_at(refresh) + tracker.jitter_s))

    def called(self, seconds: float) -> None:
        """How long a counter call took (the meter's clock around it)."""
        self._call_s.append(seconds)

    @property
    def call_s(self) -> float:
        """How long a counter call takes (the fastest of the last few; 0 before any)."""
        return min(self._call_s) if self._call_s else 0.0

    @property
    def dear(self) -> bool:
        """The counter call is dear: the fastest of the last few took DEAR_CALL_S or more."""
        return len(self._call_s) >= CALL_COSTS_KEPT // 2 and self.call_s >= DEAR_CALL_S

    def _reset_gap(self) -> None:
        """Steady pairs every COUNTER_PERIOD_S again, with no hits counted towards a longer gap."""
        self.pair_gap_s, self.pair_hits = COUNTER_PERIOD_S, 0

    def failed(self) -> None:
        self.fault = True
        self._reset_gap()
        self._pair_read = self._pair_next = 0

    def stalled(self, now: float, power_w: float | None) -> bool:
        """A counter that holds one value for over ``stall_after_s`` while instant power shows
        the GPU busy has stalled (it moves by >= 1 mJ at every refresh at any real power).
        True once per stall."""
        if self.changed_t is None:
            self.changed_t = now
            return False
        if self.stall_reported or now - self.changed_t <= self.stall_after_s() or power_w is None or \
                power_w < STALL_MIN_W:
            return False
        self.stall_reported = self.fault = True
        return True

    def stall_after_s(self) -> float:
        """How long an unchanged value means a stall: STALL_S, or two refreshes of a counter
        that the reads show refreshing more slowly (a 1 s counter holds each value ~1 s)."""
        tracker = self.tracker
        provisional = tracker.periods.latest_s
        return max(STALL_S, 2.0 * tracker.period_s, 2.0 * provisional if provisional is not None else 0.0)

    def due(self, now: float, cadence: bool, calibrating: bool, edges_pending: bool) -> bool:
        """Whether to pay for a counter read now. Unshaped counters are read every time; shaped
        ones while calibrating, else as a pair around a predicted refresh."""
        read, stage = self._decide(now, cadence, calibrating, edges_pending)
        if read:
            # Which read of a pair this is, judged once its value is seen (_judge_pair). Any
            # other read in between breaks the pair off.
            self._pair_read = 1 if stage == 1 else self._pair_next if stage == 2 else 0
            self._pair_next = 0
            if stage == 1:
                self._chasing = False
                self._pair_conflicts = self.tracker.conflicts
                self._pair_steady = self.pair_due != math.inf
        return read

    def _decide(self, now: float, cadence: bool, calibrating: bool, edges_pending: bool) -> tuple[bool, int]:
        """(read now, 1 for a pair's first read, 2 for a later one, 0 for any other)."""
        # An edge waits over several fast reads; one fast read just after a calibration burst
        # (planned while it ran) is no edge.
        self._edge_reads = self._edge_reads + 1 if edges_pending and not calibrating else 0
        if self._edge_reads >= 2:
            self._detail_until = now + DETAIL_S
        self._sparse = self.shaped or (self.dear and now >= self._detail_until)
        if not self._sparse:
            return True, 0
        tracker = self.tracker
        if not tracker.dated:
            return True, 0         # until the first change is seen, the ledger has no counter point
        if tracker.doubted and now - tracker.doubted_t < MEASURE_S:
            # The period is being measured: a slow counter's changes need reads at the
            # cadence to bracket them (a burst's fast reads bracket a fast one's).
            self.pair_second = None
            self.next_counter_at = max(self.next_counter_at, now + COUNTER_PERIOD_S)   # no wake-ups of its own
            return True, 0
        unlocked = self.unlocked
        if calibrating and not self._was_calibrating:
            # A burst is sensor-wide (every GPU is read fast while it runs); a counter whose
            # phase is locked sits it out. (With 8 GPUs, any one losing its lock had all 8
            # read ~100 times: most of the counter calls on the H100 clock in real time.)
            self._in_burst = unlocked or not tracker.dated or self._never_locked
        self._was_calibrating = calibrating
        if calibrating and self._in_burst:
            # The whole burst, not just up to the first dated change: one 5 ms bracket leaves
            # the phase off by up to 2.5 ms; several at random offsets pin it to a fraction.
            self.pair_second = None
            return True, 0
        if not unlocked:
            self._never_locked = False
        if calibrating:
            edges_pending = False     # a burst's fast reads, which this counter sits out
        if unlocked and (edges_pending or self.pair_second is None):
            # (A pair under way reads on: its first read, seconds after the pair before, widens
            # the phases by the drift allowed since, and only its later reads narrow them
            # again. Broken off there, a measured 50 ms period was never re-locked by its
            # pairs, only by a 0.5 s burst every ~10 s.)
            self.pair_second = None
            self._reset_gap()          # the phase was lost: pair often again
            if edges_pending:
                # An edge waits: every fast read, which also re-locks. (And no wish left in the
                # past: the sampler would read again at once, 1 ms apart, for half a second.)
                self.next_counter_at = max(self.next_counter_at, now + COUNTER_PERIOD_S)
                return True, 0
            if now >= self.next_counter_at:      # unlocked between bursts: a plain read
                self.next_counter_at = now + COUNTER_PERIOD_S
                return True, 0
            # A counter slower than a burst is long shows a burst one change at most: its
            # phase is locked from the changes that reads at the cadence bracket.
            return cadence and tracker.period_s > CALIBRATE_S, 0
        if self.pair_second is not None:
            if now + 0.001 < self.pair_second:
                return False, 0
            self.pair_second = None
            if self._pair_next > 2:
                return True, 2            # a pair's third read, or a chase's: the next pair is planned
            if edges_pending:
                self.plan_pair(now)
            else:
                self.plan_pair(now + self.pair_gap_s, steady=True)
            return True, 2
        if edges_pending and self.next_counter_at - now > 0.15:
            self.plan_pair(now)
        elif cadence and now >= self.pair_due:
            # Between edges a pair may start on a cadence read that falls just before a
            # predicted refresh: then only its second read needs a wake-up of its own.
            refresh = tracker.next_refresh_after(now)
            lead = None if refresh is None else refresh - now - 0.5 * self.call_s
            if lead is not None and PAIR_MARGIN_S <= lead <= 2 * PAIR_HALF_GAP_S - PAIR_MARGIN_S:
                self._pair_start, self._pair_span_s = now, 2 * PAIR_HALF_GAP_S
                self.pair_second = now + PAIR_HALF_GAP_S
                return True, 1
        if now + 0.001 < self.next_counter_at:
            return False, 0
        self._pair_start, self._pair_span_s = self.next_counter_at, self._planned_span_s
        self.pair_second = self.next_counter_at + PAIR_HALF_GAP_S
        return True, 1

    def plan_pair(self, after: float, steady: bool = False) -> None:
        """Schedule the next pair after ``after``; a steady one may start on a cadence read
        from then on, and is scheduled on its own PIGGYBACK_S later if none came."""
        self.pair_due = after if steady else math.inf
        after += PIGGYBACK_S if steady else 0.0
        refresh = self.tracker.next_refresh_after(after + PAIR_HALF_GAP_S)
        if refresh is None:
            self.next_counter_at = after + COUNTER_PERIOD_S - PAIR_HALF_GAP_S
            return
        # Centred on the prediction, pairs only confirm it; shifted at random, their ends cut the
        # allowed phases from either side, so the estimate keeps up with a wandering clock. A
        # slow call takes its value somewhere inside the call: centred on the calls' middles.
        half = self._pair_half_s(refresh)
        self._planned_span_s = 2 * half
        self.next_counter_at = refresh - half - 0.5 * self.call_s + self.rng.uniform(-PAIR_SHIFT_S, PAIR_SHIFT_S)
