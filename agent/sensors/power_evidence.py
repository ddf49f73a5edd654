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
HOLD_EVIDENCE_MAX_S = 0.25   # a value held longer says the load was steady (an idle GPU's quantised
                             # power), not that the sensor refreshes slowly
STEP_SHARE = 0.3             # a load step this large (share of the mean power) tells a mean from a sample
STEP_SPAN_S = 1.5            # ...when a trailing mean walks it within about its window
MIN_STEP_MOVES = 4           # ...over this many reads at least
JUMP_GAP_S = 0.5             # a jump between reads further apart than this proves nothing
JUMP_SPAN_S = 0.5            # ...and a jump is the whole change this long either side of it
SELF_KEEP_S = 3.0            # values kept to judge a power stream by its own motion


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
        self.holds: deque[float] = deque(maxlen=8)   # held at least this long (> COARSE_REFRESH_S)

    def observe(self, age_s: float | None, value: float, read_t: float) -> bool:
        """Feed one read (``age_s``: how old its timestamp says it is, None: no stamp).
        Returns whether the value changed since the previous read."""
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
            if self._last_change_t is not None:
                interval = read_t - self._last_change_t
                self.changes.append(interval)
                if max(gap, self._last_change_gap) <= TIGHT_READ_GAP_S:
                    self.tight_changes.append(interval)
                held = read_t - gap - self._last_change_t
                if COARSE_REFRESH_S < held <= HOLD_EVIDENCE_MAX_S:
                    self.holds.append(held)
                if read_t - (self._last_change_t - self._last_change_gap) <= COARSE_REFRESH_S:
                    self.fast_seen = True      # r2 - p1 (an infinite gap: no read before p1)
            self._last_value, self._last_change_t, self._last_change_gap = value, read_t, gap
        return changed

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
        """Read-stamped and changing no faster than COARSE_REFRESH_S: a point sample that
        cannot place an edge inside a counter span. Evidence: tight reads timed two changes
        apart, or (the edges' short bursts of fast reads rarely see two changes) each value
        held longer than that, twice, and no two changes were ever seen closer."""
        if not self.read_stamped or self.fast_seen:
            return False
        refresh = self.tight_refresh_s
        return refresh > COARSE_REFRESH_S if refresh is not None else len(self.holds) >= 2

    @property
    def held_s(self) -> float | None:
        """How long a value was seen to hold at least: the refresh period's lower bound."""
        return self.tight_refresh_s or (max(self.holds) if self.holds else None)


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
