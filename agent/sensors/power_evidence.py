"""Which power reading a GPU without an energy counter should trust, decided from its data.

NVML exposes up to three power readings, and what each one *is* varies by GPU and driver:
field 186 may be a 20 ms box mean or a 100 ms point sample, its timestamp may be the refresh
time or merely the read time, and ``nvmlDeviceGetPowerUsage`` / field 185 may be a 1 s trailing
mean or an instantaneous value. Model names and architectures do not settle it (GA100 differs
from other Ampere parts; drivers change). So the sensor keeps a small evidence record per GPU:

- ``StampEvidence``: are field timestamps refresh times (their age spreads over a refresh
  period) or read times (always ~0 old)? And how often does the value really change?
- ``MeanEvidence``: does a candidate track the mean of the instant samples over the last
  second (a trailing mean) or the latest instant sample?

``PowerReference`` is the verdict, printable by ``doctor``: the reference used and why.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

MEAN_WINDOW_S = 1.0          # the trailing window NVML documents for averaged power
READ_STAMP_MAX_AGE_S = 0.0015   # a read-stamped value is never older than one call
STAMP_SAMPLES = 20           # reads before the timestamps are judged
MEAN_SAMPLES = 12            # varying candidate samples before a verdict
VARYING_SHARE = 0.03         # instant power varies by this share of its mean: a usable sample
RECHECK_EVERY = 10           # once decided, candidates checked
VERDICT_RATIO = 0.5          # the better model must fit with half the other's error
DISCRIMINATING_SHARE = 0.1   # a value is evidence only where the latest sample is this far from the mean
JUMP_LOOK_S = 0.15           # a jump of the instant value and the candidate's move, over this long
JUMP_SHARE = 0.25            # ...counted where the instant value moved by this share of its level
JUMP_VERDICT = 4             # a mean, once it stayed put at this many jumps (and 4x more than it followed)
COARSE_REFRESH_S = 0.05      # a read-stamped sample refreshing slower than this cannot place an edge
TIGHT_READ_GAP_S = 0.01      # reads this close date a value change to within a hundredth of a second
PERIOD_SPAN_S = 0.01         # spans between two changes timed this closely are multiples of the period
PERIOD_SPANS_MIN = 3         # ...and this many decide it
PERIOD_MIN_S = 0.005         # no refresh period shorter than this is considered
PERIOD_SLACK_S = 0.001       # a multiple of the period may miss a span by this much (refresh jitter)
PERIOD_MISS_SHARE = 0.25     # ...or by this share of it at most (a jittering refresh; a whole multiple
                             # of the true period misses some span by half of itself)
HOLD_EVIDENCE_MAX_S = 0.25   # a value held longer says the load was steady (an idle GPU's quantised
                             # power), not that the sensor refreshes slowly
STEP_SHARE = 0.3             # a load step this large (share of the mean power) tells a mean from a sample
STEP_SPAN_S = 1.5            # ...when a trailing mean walks it within about its window
MIN_STEP_MOVES = 4           # ...over this many reads at least
JUMP_GAP_S = 0.5             # a jump between reads further apart than this proves nothing
JUMP_SPAN_S = 0.5            # ...and a jump is the whole change this long either side of it
SELF_KEEP_S = 3.0            # values kept to judge a power stream by its own motion
SHAPE_SPAN_MAX_S = 0.25      # counter spans this short tell the power inside them
SHAPE_LEVEL_S = 2.0          # the level a short span is judged against: the counter over this long before it (flat power)
SHAPE_SWING_MIN_W = 20.0     # a span tells something where its power is this far from the level...
SHAPE_SWING_SHARE = 0.1      # ...or this share of it
SHAPE_DECAY = 0.95           # per informative span (a verdict follows the last ~20)
SHAPE_SAMPLE_GAP_S = 0.03    # a span is judged where samples lie this close to its end...
SHAPE_DENSE_GAP_S = 0.03     # ...and to each other
SHAPE_SPANS_MIN = 6          # informative spans before a verdict
SHAPE_SHARE_MIN = 0.3        # the samples must explain this share of the counter's swings


@dataclass(frozen=True)
class PowerReference:
    """What a GPU's energy is measured from, and why (``doctor`` prints it)."""

    reference: str           # "counter" | "trailing_mean" | "instant"
    source: str              # "energy counter", "field 185", "nvmlDeviceGetPowerUsage", "field 186"
    reason: str
    instant: str = ""        # what shapes edges: "field 186 (refresh-stamped)", ... or ""
    instant_refresh_s: float | None = None

    def describe(self) -> str:
        shape = f"; edges shaped by {self.instant}" if self.instant else ""
        return f"{self.reference} from {self.source}: {self.reason}{shape}"


class StampEvidence:
    """Judges field-186 timestamps and the value's real refresh period from the reads."""

    def __init__(self) -> None:
        self.ages: list[float] = []
        self.read_stamped: bool | None = None      # None: not judged yet
        self.changes: deque[float] = deque(maxlen=32)   # intervals between value changes
        self.tight_changes: deque[float] = deque(maxlen=32)   # ...seen by reads close together
        self._last_value: float | None = None
        self._last_change_t: float | None = None
        self._last_change_gap = math.inf
        self._last_read_t: float | None = None
        # Bounds from the reads around consecutive changes, seen at r1 then r2 (p: the read
        # before each): the value held at least p2 - r1, and changed again within r2 - p1.
        self.fast_seen = False       # two changes within COARSE_REFRESH_S (tight reads saw them)
        self.refresh_max_s: float | None = None   # min(r2 - p1): the refresh period is no longer
        self.spans: deque[tuple[float, float]] = deque(maxlen=24)   # [p2 - r1, r2 - p1], timed closely
        self._period: tuple[int, float | None] | None = None     # (spans seen, period_s) cached
        self._spans_seen = 0
        self.holds: deque[float] = deque(maxlen=8)   # held at least this long (> COARSE_REFRESH_S)

    def observe(self, age_s: float | None, value: float, read_t: float, learn: bool = True) -> bool:
        """Feed one read (``age_s``: how old its timestamp says it is, None: no stamp).
        Returns whether the value changed since the previous read. ``learn`` False: the read
        came a quiet period after the one before (sensors/quiet.py), so the interval between
        changes it shows is the reads' spacing, not the value's refresh."""
        if age_s is not None and self.read_stamped is None:
            self.ages.append(age_s)
            if len(self.ages) >= STAMP_SAMPLES:
                # Refresh-stamped values read at random phases are up to a refresh period old;
                # read-stamped ones are never older than the call itself.
                self.read_stamped = max(self.ages) <= READ_STAMP_MAX_AGE_S
        elif age_s is not None and self.read_stamped and age_s > READ_STAMP_MAX_AGE_S:
            # Reads that happened to land on refreshes made refresh stamps look like read times;
            # one old stamp settles it (a read-stamped value is never old).
            self.read_stamped = False
        gap = read_t - self._last_read_t if self._last_read_t is not None else math.inf
        self._last_read_t = read_t
        changed = value != self._last_value
        if changed:
            if self._last_change_t is not None and learn:
                interval = read_t - self._last_change_t
                self.changes.append(interval)
                if max(gap, self._last_change_gap) <= TIGHT_READ_GAP_S:
                    self.tight_changes.append(interval)
                held = read_t - gap - self._last_change_t
                if COARSE_REFRESH_S < held <= HOLD_EVIDENCE_MAX_S:
                    self.holds.append(held)
                bound = read_t - (self._last_change_t - self._last_change_gap)   # r2 - p1
                if bound < (self.refresh_max_s or math.inf):    # (inf: no read before p1)
                    self.refresh_max_s = bound
                if bound - held <= PERIOD_SPAN_S:
                    self.spans.append((held, bound))
                    self._spans_seen += 1
                if bound <= COARSE_REFRESH_S:
                    self.fast_seen = True
            self._last_value, self._last_change_t, self._last_change_gap = value, read_t, gap
        return changed

    @property
    def period_s(self) -> float | None:
        """The refresh period the changes show (None: no evidence of one). A value need not
        change at every refresh (a point sample of a square load changes at every second or
        third), so the shortest span between two changes (``refresh_max_s``) may be a multiple
        of the period: it is the longest period a whole number of which fits every closely
        timed span between changes (within a quarter period: refreshes jitter), given as the
        tightest upper bound those counts allow (each span's end over its count); None until
        PERIOD_SPANS_MIN such spans have come."""
        cached = self._period
        if cached is not None and cached[0] == self._spans_seen:
            return cached[1]
        period = self._fit_period()
        self._period = (self._spans_seen, period)
        return period

    def _fit_period(self) -> float | None:
        upper = self.refresh_max_s
        spans = self.spans
        if upper is None or len(spans) < PERIOD_SPANS_MIN:
            return None
        lo0, hi0 = min(spans, key=lambda s: s[1] - s[0])
        centre, half = 0.5 * (lo0 + hi0), 0.5 * (hi0 - lo0)
        m = max(1, math.ceil(centre / (upper + half + PERIOD_SLACK_S)))
        while centre / m >= PERIOD_MIN_S:
            period, err = centre / m, half / m
            misses = [_multiple_miss(lo, hi, period, err) for lo, hi in spans]
            if max(misses) <= PERIOD_MISS_SHARE * period:
                # The tightest bound the counts give (k periods end by hi) over the spans that
                # fit outright: a period read short would have a held value re-dated before
                # its next refresh came.
                return min([hi / max(1, round(0.5 * (lo + hi) / period))
                            for (lo, hi), miss in zip(spans, misses) if miss == 0.0] or [period])
            m += 1
        return None

    @property
    def refresh_s(self) -> float | None:
        """The value's refresh period, from the shortest recent interval between changes."""
        return min(self.changes) if len(self.changes) >= 4 else None

    @property
    def tight_refresh_s(self) -> float | None:
        """The refresh period from changes whose reads came at most TIGHT_READ_GAP_S apart
        (calibration bursts, edges): a change seen late by a sparse read, then the next one
        early, makes a 100 ms refresh look like 20 ms. None until two such intervals."""
        return min(self.tight_changes) if len(self.tight_changes) >= 2 else None

    @property
    def coarse(self) -> bool:
        """Read-stamped and not shown to change faster than COARSE_REFRESH_S: a point sample
        that cannot place an edge inside a counter span. Unknown counts as coarse: dense reads
        of a value that refreshes every 100 ms all return the sample taken before the edge,
        and measured as power they put a whole counter span on the wrong side of it (1.5 s
        jobs 6 % p90 on a bursty load, while values held 50-250 ms twice were what made the
        verdict). Fast is shown by two changes seen within COARSE_REFRESH_S, or tight reads
        timing one."""
        if not self.read_stamped or self.fast_seen:
            return False
        refresh = self.tight_refresh_s
        return refresh is None or refresh > COARSE_REFRESH_S

    @property
    def held_s(self) -> float | None:
        """How long a value was seen to hold at least: the refresh period's lower bound."""
        return self.tight_refresh_s or (max(self.holds) if self.holds else None)


def _multiple_miss(lo: float, hi: float, period: float, err: float) -> float:
    """How far the nearest k >= 1 periods (each known to +-err) fall outside [lo, hi], give or
    take the slack (0: inside)."""
    k = max(1, round(0.5 * (lo + hi) / period))
    return max(0.0, lo - k * err - PERIOD_SLACK_S - k * period, k * period - hi - k * err - PERIOD_SLACK_S)


class MeanEvidence:
    """Does a candidate power reading behave like a trailing mean of the instant samples?"""

    def __init__(self, window_s: float = MEAN_WINDOW_S) -> None:
        self.window_s = window_s
        self.instant: deque[tuple[float, float]] = deque(maxlen=400)
        self.err_mean = 0.0
        self.err_inst = 0.0
        self.n = 0
        self.verdict: bool | None = None     # True: trailing mean; False: instant; None: unknown
        self._seen = 0
        # Jumps: where the instant value jumped, did the candidate jump with it?
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=32)   # (t, instant, candidate)
        self.jump_votes = [0, 0]             # [a mean's, an instant's]

    def add_instant(self, t: float, w: float) -> None:
        if not self.instant or t > self.instant[-1][0]:
            self.instant.append((t, w))

    def _vote_on_jumps(self, t: float, w: float) -> None:
        """A trailing mean moves by a fraction of a load step within a refresh or two; an
        instant value jumps with it. Compared over JUMP_LOOK_S (one refresh of lag between the
        two readings is allowed), only where the instant value jumped by JUMP_SHARE of its level."""
        if not self.instant:
            return
        inst = self.instant[-1][1]
        self.recent.append((t, inst, w))
        old = None
        for entry in self.recent:
            if entry[0] <= t - JUMP_LOOK_S:
                old = entry
        if old is None:
            return
        d_inst, d_cand = inst - old[1], w - old[2]
        level = max(abs(inst), abs(old[1]), 1e-9)
        if abs(d_inst) < JUMP_SHARE * level:
            return
        ratio = d_cand / d_inst
        if ratio < 0.4:
            self.jump_votes[0] += 1
        elif ratio > 0.8:
            self.jump_votes[1] += 1

    def add_candidate(self, t: float, w: float) -> bool | None:
        """Feed one candidate value dated t; returns the verdict so far. Once decided, only
        every RECHECK_EVERY-th value is checked (the verdict can still flip, at a tenth the cost)."""
        self._seen += 1
        self._vote_on_jumps(t, w)
        mean_votes, inst_votes = self.jump_votes
        if mean_votes >= JUMP_VERDICT and mean_votes >= 4 * inst_votes:
            self.verdict = True                  # it stayed put where the load jumped, again and again
        if self.verdict is not None and self._seen % RECHECK_EVERY:
            return self.verdict
        pts = []
        for ts, v in reversed(self.instant):     # newest first: stop once past the window
            if ts < t - self.window_s - 0.1:
                break
            if ts <= t:
                pts.append((ts, v))
        pts.reverse()
        if len(pts) < 5 or pts[0][0] > t - self.window_s + 0.15:
            return self.verdict          # the last second is not covered yet
        vals = [v for ts, v in pts if ts > t - self.window_s]
        mean = sum(vals) / len(vals)
        spread = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        if mean <= 0 or spread < VARYING_SHARE * mean:
            return self.verdict          # steady: both models fit, nothing learnt
        if abs(pts[-1][1] - mean) < DISCRIMINATING_SHARE * mean:
            # The two models predict about the same value: nothing to learn, and the noise of
            # a slow ramp (a mean of it is close to its latest value; a sample that caught a
            # spike inflates the samples' mean) would otherwise pile up against the mean.
            return self.verdict
        self.err_mean += (w - mean) ** 2
        self.err_inst += (w - pts[-1][1]) ** 2
        self.n += 1
        if self.n >= MEAN_SAMPLES:
            if self.err_mean < VERDICT_RATIO * self.err_inst:
                self.verdict = True
            elif self.err_inst < VERDICT_RATIO * self.err_mean and self.jump_votes[1] > self.jump_votes[0]:
                # Not on the errors alone: where a spike was caught, the samples' own mean is
                # off and a mean of a slow ramp is close to its latest value. Only if the jumps
                # agree (the candidate jumped with the instant value at least as often as not).
                self.verdict = False
            self.n, self.err_mean, self.err_inst = 0, 0.0, 0.0   # keep checking, in fresh rounds
        return self.verdict


HOLD_MIN_REFRESH_S = 0.04   # instant values refreshing at least this slowly are judged box or point
HOLD_VOTES = 12             # discriminating mean reads before a verdict (then fresh rounds)
HOLD_DIFF_MIN_W = 1.0       # a mean read discriminates where the two holds predict it this far apart...
HOLD_DIFF_SHARE = 0.01      # ...or this share of it, whichever is more


class HoldEvidence:
    """Is a refresh-stamped instant value a *box*, the mean power over the refresh period up to
    its stamp (an H100's 20 ms field 186), or a *point sample*, the power at its stamp? A box
    holds for the period before its stamp; a point sample stands for the period around it.
    Taken for boxes, 100 ms point samples moved every edge 50 ms early: a GPU with no counter
    read 5.8-7.3 % p90 on 1.5 s jobs under a jittered 1 s square. Which hold predicts the 1 s
    trailing mean better, where the two differ, decides; until then values are boxes (as
    before). A load periodic in the mean's window leaves both predicting the same mean."""

    def __init__(self, samples: deque[tuple[float, float]], window_s: float = MEAN_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples = samples               # the instant values (t, w), oldest first (MeanEvidence's)
        self.pending: deque[tuple[float, float]] = deque(maxlen=8)   # mean reads awaiting later samples
        self.err_box = self.err_point = 0.0
        self.n = 0
        self.verdict: str | None = None      # "box" | "point" | None (not judged: a box)
        self._seen = 0

    def add_mean(self, t: float, m: float, refresh_s: float | None) -> None:
        """A trailing mean's value dated ``t`` (its window ends there); ``refresh_s``: the
        instant values' refresh period. Judged once the samples reach half a period past it."""
        if refresh_s is None or refresh_s < HOLD_MIN_REFRESH_S:
            return
        self._seen += 1
        if self.verdict is not None and self._seen % RECHECK_EVERY:
            return                           # decided: one mean read in RECHECK_EVERY re-checks it
        self.pending.append((t, m))
        samples, pending = self.samples, self.pending
        while pending and samples and samples[-1][0] >= pending[0][0] + 0.5 * refresh_s:
            self._judge(*pending.popleft(), refresh_s)

    def _judge(self, t: float, m: float, period: float) -> None:
        a = t - self.window_s
        if self.samples[0][0] > a - period:
            return                           # the window is not covered yet
        box = self._held(a, t, 0.0) / self.window_s
        point = self._held(a, t, 0.5 * period) / self.window_s
        if abs(box - point) < max(HOLD_DIFF_MIN_W, HOLD_DIFF_SHARE * abs(m)):
            return                           # the holds agree (a steady load): nothing learnt
        self.err_box += (box - m) ** 2
        self.err_point += (point - m) ** 2
        self.n += 1
        if self.n >= HOLD_VOTES:
            if self.err_point < VERDICT_RATIO * self.err_box:
                self.verdict = "point"
            elif self.err_box < VERDICT_RATIO * self.err_point:
                self.verdict = "box"
            self.n, self.err_box, self.err_point = 0, 0.0, 0.0

    def _held(self, a: float, b: float, shift: float) -> float:
        """The integral over (a, b] of the values held back from their stamps, moved on by
        ``shift``: each covers (previous stamp + shift, its stamp + shift]."""
        total, later = 0.0, None
        for ts, w in reversed(self.samples):  # newest first: stop once past the window
            if later is not None:
                lo, hi = max(a, ts + shift), min(b, later[0] + shift)
                if hi > lo:
                    total += later[1] * (hi - lo)
            if ts + shift <= a:
                break
            later = (ts, w)
        return total


class SelfEvidence:
    """With no instant reading to compare against, judge a power stream by its own motion.

    - A point sample jumps: one move between two reads is a large share of the mean power and
      the whole of the change around it (within half a second either way). A 1 s trailing mean
      read every 100 ms walks a load step in about ten moves, and a short spike moves it by a
      few %. One jump settles it: instant, for good (no mean can fake one).
    - A mean shows itself by a load step it walks across within about a second, in small moves.
      A slow drift over many seconds (a ramp) fits both models and teaches nothing: an instant
      sample of a slow ramp must not pass for a mean, or each spike it catches would be spread
      over a second by the mean's edge kernel.
    """

    def __init__(self) -> None:
        self.values: deque[tuple[float, float]] = deque()
        self.verdict: bool | None = None
        self._judged = 0          # moves judged so far, counted from the oldest value kept
        self._sum_w = 0.0

    def add(self, t: float, w: float) -> bool | None:
        vals = self.values
        vals.append((t, w))
        self._sum_w += w
        while t - vals[0][0] > SELF_KEEP_S:
            self._sum_w -= vals.popleft()[1]
            self._judged = max(0, self._judged - 1)
        if self.verdict is False:
            return False
        mean = self._sum_w / len(vals)
        if mean <= 0:
            return self.verdict
        # Moves whose half second after has been read are judged once each.
        while self._judged + 1 < len(vals) and vals[self._judged + 1][0] <= t - JUMP_SPAN_S:
            if self._is_jump(self._judged, mean):
                self.verdict = False
                return False
            self._judged += 1
        if self.verdict is None and self._walked_step(mean):
            self.verdict = True
        return self.verdict

    def _is_jump(self, i: int, mean: float) -> bool:
        vals = self.values
        (ta, wa), (tb, wb) = vals[i], vals[i + 1]
        move = abs(wb - wa)
        if tb - ta > JUMP_GAP_S or move < STEP_SHARE * mean:
            return False
        around = [w for t, w in vals if ta - JUMP_SPAN_S <= t <= tb + JUMP_SPAN_S]
        return max(around) - min(around) < 1.5 * move

    def _walked_step(self, mean: float) -> bool:
        """The newest value ends a change of STEP_SHARE of the mean made within STEP_SPAN_S,
        in at least MIN_STEP_MOVES reads of under a quarter of it each."""
        vals = self.values
        t_new, w_new = vals[-1]
        biggest = 0.0
        for k in range(len(vals) - 2, -1, -1):
            t, w = vals[k]
            if t_new - t > STEP_SPAN_S:
                break
            biggest = max(biggest, abs(vals[k + 1][1] - w))
            change = abs(w_new - w)
            if len(vals) - 1 - k >= MIN_STEP_MOVES and change > STEP_SHARE * mean and biggest < 0.25 * change:
                return True
        return False


class ShapeEvidence:
    """Does a counter GPU's shaping reading follow the counter itself?

    Instant power may split a counter span only if it tells how the power moved inside it.
    Short counter spans (pairs straddling a refresh, reads at every tick: ~100 ms) give the
    power exactly; the samples dated inside a span should average to it. A 1 s trailing mean
    that passes for instant power (``GetPowerUsage`` on Ampere and newer, with no field 186)
    does not: on a load whose period divides its second it never moves while the counter's
    short spans swing between the load's levels, and it was trusted to shape spans of seconds
    (1.5 s jobs 4-5 % off p90). Judged on short spans whose power is away from the counter's
    level over the two seconds or more before them (what flat power would put there), as the share
    1 - sum (P_c - S)^2 / sum (P_c - L)^2; contradicted below SHAPE_SHARE_MIN once
    SHAPE_SPANS_MIN such spans are in. A reading with no timestamp of its own (``GetPowerUsage``)
    must show it follows first; field 186 is trusted until the spans contradict it."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=64)
        self.points: deque[tuple[float, float]] = deque(maxlen=64)   # dated counter points
        self.miss_sq = self.swing_sq = 0.0                # decaying over informative spans
        self.spans = 0                                    # informative spans seen
        self.verdict: bool | None = None                  # follows the counter; None: not judged yet

    def add_sample(self, t: float, w: float) -> None:
        if not self.samples or t > self.samples[-1][0]:
            self.samples.append((t, w))

    def add_counter(self, t: float, energy_j: float) -> None:
        points = self.points
        if points and (t <= points[-1][0] or energy_j < points[-1][1]):
            points.clear()            # a reset or a re-dated counter: start afresh
        points.append((t, energy_j))
        if len(points) < 3:
            return
        t0, e0 = points[-2]
        if t - t0 > SHAPE_SPAN_MAX_S:
            return
        level = None
        for tb, eb in reversed(points):
            if t0 - tb >= SHAPE_LEVEL_S:
                level = (e0 - eb) / (t0 - tb)
                break
        if level is None:
            return
        power = (energy_j - e0) / (t - t0)
        swing = power - level
        if abs(swing) < max(SHAPE_SWING_MIN_W, SHAPE_SWING_SHARE * abs(level)):
            return             # flat power fits this span: nothing learnt
        shaped = self._mean_over(t0, t)
        if shaped is None:
            return
        miss = power - shaped
        self.miss_sq = SHAPE_DECAY * self.miss_sq + miss * miss
        self.swing_sq = SHAPE_DECAY * self.swing_sq + swing * swing
        self.spans += 1
        if self.spans >= SHAPE_SPANS_MIN:
            self.verdict = 1.0 - self.miss_sq / self.swing_sq >= SHAPE_SHARE_MIN

    @property
    def contradicted(self) -> bool:
        return self.verdict is False

    def _mean_over(self, a: float, b: float) -> float | None:
        """The samples' mean power over (a, b], each value the power since the one before (as
        the ledger shapes with them: a counter dated a millisecond off moves this by a
        millisecond's worth, not by a whole box). None unless samples bracket the span, read
        densely (the fast reads around an edge, where shaping matters): a 20 ms box read at
        10 Hz stands for 100 ms and misses a 100 ms square's halves, though every box read
        near an edge shapes it to 0.2 %."""
        samples = self.samples
        if not samples or samples[0][0] > a or samples[-1][0] < b - SHAPE_SAMPLE_GAP_S:
            return None
        energy, prev_t = 0.0, None
        for ts, w in samples:
            if prev_t is not None and ts > a:
                if ts - prev_t > SHAPE_DENSE_GAP_S:
                    return None        # sparse reads stand a value for ~100 ms: not what shapes an edge
                lo, hi = max(prev_t, a), min(ts, b)
                if hi > lo:
                    energy += w * (hi - lo)
            if ts >= b:
                return energy / (b - a)
            prev_t = ts
        return (energy + samples[-1][1] * (b - max(prev_t, a))) / (b - a)
