"""Shaping energy between coarse points with instant-power samples.

A counter tells how much energy a span held; instant power tells how it was spread inside
the span. ``InstantSamples`` keeps a device's recent samples and integrates them (strictly,
across holes, or as the dense tail read near an edge); the pure functions below place an edge
inside a span on a power step, split a field's refresh box at an edge, and integrate a run of
samples.
"""
from __future__ import annotations

import itertools
import math
from bisect import bisect_left, bisect_right
from collections import deque
from operator import itemgetter

MIN_BOX_S, MAX_BOX_S = 0.005, 0.05   # a short-window power field's refresh box (H100: 20 ms)
HOLD_MAX_S = 5.0          # E past the last sample holds the last power this long at most
HOLE_S = 0.3                         # a hole this wide between samples is filled...
HOLE_CONTEXT_S = 1.0                 # ...from the samples this close to it
SHAPE_GAP_S = 0.15        # samples this dense (20 Hz, jittered) shape a counter segment
TAIL_MAX_S = 0.5          # an edge this close to the next counter read uses the measured tail
TAIL_GAP_S = 0.06         # ...when instant power was read at least this often
SAME_VALUE_S = 0.0005     # samples closer than this are one value read twice
BRIDGE_REACH_S = 1.0      # a bridge needs instant power this close to both of its ends
REBASE_S = 600.0          # the integrals' time origin moves up this often

_time = itemgetter(0)     # a sample's time: the key the ring is searched by


class InstantSamples:
    """A device's recent instant-power samples (t, power_w), oldest first. ``coarse``: the
    sensor says they cannot split a counter span (read-stamped ~100 ms point samples); they
    still bridge its faults.

    Each value counts as the power since the sample before it (the last one held on). Beside
    each sample, ``cum`` keeps that power's integrals up to it, F = integral of P and
    G = integral of (u - base) P: any weighted integral with a piecewise-linear weight (the
    trailing mean's edge kernel) is then a few lookups, not a loop over the samples."""

    __slots__ = ("pts", "coarse", "cum", "base")

    def __init__(self, maxlen: int) -> None:
        self.pts: deque[tuple[float, float]] = deque(maxlen=maxlen)
        self.coarse = False
        self.cum: deque[tuple[float, float]] = deque(maxlen=maxlen)   # (F, G) at each sample
        self.base = 0.0

    def __bool__(self) -> bool:
        return bool(self.pts)

    def __len__(self) -> int:
        return len(self.pts)

    @property
    def last(self) -> tuple[float, float]:
        return self.pts[-1]

    def add(self, t: float, w: float) -> bool:
        """Keep a sample newer than the last one; False (dropped) otherwise."""
        pts = self.pts
        if not pts:
            self.base = t
            self.cum.append((0.0, 0.0))
        else:
            t0 = pts[-1][0]
            if t <= t0:
                return False
            if t - self.base > REBASE_S:        # keeps G's terms small (float precision)
                self._rebase(t0)
            f0, g0 = self.cum[-1]
            b = self.base
            self.cum.append((f0 + w * (t - t0), g0 + 0.5 * w * ((t - b) ** 2 - (t0 - b) ** 2)))
        pts.append((t, w))
        return True

    def _rebase(self, base: float) -> None:
        shift = base - self.base
        self.cum = deque(((f, g - shift * f) for f, g in self.cum), maxlen=self.cum.maxlen)
        self.base = base

    def _integrals_at(self, x: float, reach: float, i: int | None = None) -> tuple[float, float]:
        """(F(x), G(x)), where P is the value of the next sample up to ``reach``, else the last
        one before held on (a sample past ``reach`` says nothing of the power at x). ``i``: the
        first sample at or after x, where the caller has it."""
        pts, cum, b = self.pts, self.cum, self.base
        if i is None:
            i = bisect_left(pts, x, key=_time)
        if i < len(pts) and pts[i][0] <= reach:
            (ti, v), (f, g) = pts[i], cum[i]
            return f - v * (ti - x), g - 0.5 * v * ((ti - b) ** 2 - (x - b) ** 2)
        (t1, v), (f, g) = pts[i - 1], cum[i - 1]
        return f + v * (x - t1), g + 0.5 * v * ((x - b) ** 2 - (t1 - b) ** 2)

    def edge_kernel(self, t: float, half: float) -> float:
        """The integral of P(s) k(s - t), k the trailing mean's edge kernel (``trailing_mean``):
        -(half + x)/w on (-half, 0], (half - x)/w on (0, half], w = 2 half. P: each sample's
        value since the one before, the last one before t + half + 1 s held on; with no sample
        from t - half to there, P is flat and the kernel zero (it vanishes on constant power)."""
        pts, reach = self.pts, t + half + 1.0
        i = bisect_left(pts, t - half, key=_time)
        if i == len(pts) or pts[i][0] > reach:
            return 0.0
        f_a, g_a = self._integrals_at(t - half, reach, i)
        f_t, g_t = self._integrals_at(t, reach)
        f_b, g_b = self._integrals_at(t + half, reach)
        tb = t - self.base
        before = (half - tb) * (f_t - f_a) + (g_t - g_a)     # integral of P(s) (half + s - t)
        after = (half + tb) * (f_b - f_t) - (g_b - g_t)      # integral of P(s) (half - s + t)
        return (after - before) / (2.0 * half)

    def between(self, a: float, b: float) -> list[tuple[float, float]]:
        """Instant samples dated in [a, b], oldest first. Scans back from the newest (queries
        are near the present), so a read costs the samples in the span, not the whole ring."""
        out = []
        for t, w in reversed(self.pts):
            if t < a:
                break
            if t <= b:
                out.append((t, w))
        out.reverse()
        return out

    def first_in(self, a: float, b: float) -> float | None:
        """The time of the oldest sample dated in [a, b], or None."""
        pts = self.pts
        i = bisect_left(pts, a, key=_time)
        return pts[i][0] if i < len(pts) and pts[i][0] <= b else None

    def dense_from(self, t0: float, t1: float) -> float | None:
        """Where the run of instant samples read at most TAIL_GAP_S apart that reaches t1
        begins, within the last TAIL_MAX_S of the segment (None: no such run)."""
        pts = self.between(max(t0, t1 - TAIL_MAX_S), t1 + TAIL_GAP_S)
        if not pts or pts[-1][0] < t1 - TAIL_GAP_S:
            return None
        start = pts[-1][0]
        for (ta, _), (tb, _) in zip(reversed(pts[:-1]), reversed(pts)):
            if tb - ta > TAIL_GAP_S:
                break
            start = ta
        return start if start < t1 else None

    def energy(self, a: float, b: float, gap: float = 0.0) -> float | None:
        """Energy from a to b from instant-power samples, or None unless the samples cover
        [a, b] with no hole wider than ``gap``. Each value counts as the mean power since the
        previous sample's time (NVML dates field values when they were taken): exact for a
        short-window average read at every refresh, half a read interval off for a truly
        instantaneous value. The last value is held forward."""
        gap = gap or SHAPE_GAP_S
        pts: list[tuple[float, float]] = []
        for t, w in self.between(a - gap, b + gap):
            if a - gap <= t <= b + gap and not (pts and t - pts[-1][0] < SAME_VALUE_S):
                pts.append((t, w))       # one value read twice is dated twice, a hair apart
        if not pts or pts[0][0] > a + gap or pts[-1][0] < b - gap:
            return None
        if any(t1 - t0 > gap for (t0, _), (t1, _) in zip(pts, pts[1:])):
            return None
        energy, t_prev = 0.0, a
        for t, w in pts:
            if t > t_prev:
                energy += w * (min(t, b) - t_prev)
                t_prev = min(t, b)
            if t >= b:
                break
        if t_prev < b:
            energy += pts[-1][1] * (b - t_prev)
        return energy + partial_box_correction(pts, a, b)

    def bridge(self, a: float, b: float) -> float | None:
        """Energy from a to b from instant power across holes (a reset, a lost GPU, a stalled
        counter), or None when no sample lies within BRIDGE_REACH_S of both ends."""
        pts = self.pts
        reach = BRIDGE_REACH_S
        if b < a:     # nothing to integrate: None only where no sample is near either end
            return 0.0 if _search(pts, b + reach, right=True) > _search(pts, a - reach) else None
        i = _search(pts, a, right=True)              # the first sample that counts for (a, b]
        j = _search(pts, b + reach, right=True)      # the samples within reach end at pts[j - 1]
        if not ((i > 0 and pts[i - 1][0] >= a - reach) or (i < len(pts) and pts[i][0] <= a + reach)) \
                or j == 0 or pts[j - 1][0] < b - reach:
            return None
        if b == a:
            return 0.0
        # With no hole to fill, the running integral is the same sum without a loop (the live
        # tail asks for its last moments at every read of every GPU).
        while i < j:
            t, t_prev = pts[i][0], pts[i - 1][0] if i > 0 else -math.inf
            if t_prev >= a - reach and t - t_prev > HOLE_S:
                lo = bisect_left(pts, a - reach, key=_time)
                return integrate_samples(list(itertools.islice(pts, lo, j)), a, b)
            if t >= b:
                break
            i += 1
        return self._integrals_at(b, b + reach)[0] - self._integrals_at(a, b + reach)[0]

    def max_w(self, t0: float, t1: float) -> float | None:
        """The largest instant-power sample dated inside [t0, t1]."""
        vals = [w for _, w in self.between(t0, t1)]
        return max(vals) if vals else None



def _search(pts: deque[tuple[float, float]], x: float, right: bool = False) -> int:
    """``bisect_left`` (``right``: ``bisect_right``) by time, trying the newest few samples
    first: for the last moments (the live tail's) it is a compare or two. (For points a second
    back it costs more than a bisect: ``_integrals_at`` bisects.)"""
    i = len(pts)
    for _ in range(4):
        if i == 0:
            return 0
        t = pts[i - 1][0]
        if t < x or (right and t == x):
            return i
        i -= 1
    return (bisect_right if right else bisect_left)(pts, x, 0, i, key=_time)


def integrate_samples(pts: list[tuple[float, float]], a: float, b: float) -> float:
    """Energy from a to b from time-ordered (t, power_w) samples, tolerating holes: each value
    counts as the mean since the previous sample, a hole wider than HOLE_S (a lost GPU, a
    held-up reader) is filled with the mean of the samples within HOLE_CONTEXT_S of it (a
    bursty load's two neighbouring values say little about its level), and the ends are held
    out to a and b."""
    if not pts or b <= a:
        return 0.0
    energy, lo = 0.0, a
    ts_prev, w_prev = None, pts[0][1]
    for i, (t, w) in enumerate(pts):
        if t > lo:
            hi = min(t, b)
            if ts_prev is not None and t - ts_prev > HOLE_S:
                around = [v for tv, v in pts if ts_prev - HOLE_CONTEXT_S <= tv <= t + HOLE_CONTEXT_S]
                energy += (hi - lo) * sum(around) / len(around)
            else:
                energy += w * (hi - lo)
            lo = hi
        ts_prev, w_prev = t, w
        if t >= b:
            break
    if lo < b:
        energy += w_prev * (b - lo)
    return energy


def partial_box_correction(pts: list[tuple[float, float]], a: float, b: float) -> float:
    """What the step model changes at the two ends of ``InstantSamples.energy``'s sum.

    Each field value is the mean over one refresh box. An edge inside a box gets a share of
    that box: pro rata assumes the power was flat across it, which is exactly wrong where a
    kernel starts or stops inside the box (the usual case at a job's edges). Where both
    neighbouring boxes were read, the box is modelled as one step between their powers
    (``step_interpolate``), placed so the box's energy is kept."""
    gaps = [t1 - t0 for (t0, _), (t1, _) in zip(pts, pts[1:])]
    box = min(gaps, default=0.0)
    if not MIN_BOX_S <= box <= MAX_BOX_S or sum(abs(g - box) < 0.1 * box for g in gaps) < 2:
        return 0.0

    def step_share(k: int, x: float) -> float | None:
        """Energy of box k from its start to x (None: neighbours missing or not adjacent)."""
        if not 0 < k < len(pts) - 1:
            return None
        (t_lo, w_lo), (t_k, w_k), (t_hi, w_hi) = pts[k - 1], pts[k], pts[k + 1]
        if abs(t_k - t_lo - box) > 0.1 * box or abs(t_hi - t_k - box) > 0.1 * box:
            return None
        return step_interpolate(t_k - box, 0.0, t_k, w_k * box, x, w_lo, w_hi)

    fix = 0.0
    k = next((i for i, (t, _) in enumerate(pts) if t > a), None)
    m = next((i for i, (t, _) in enumerate(pts) if t >= b), None)
    if k is None or m is None or k == m:
        return 0.0          # both ends in one box: nothing to split
    t_k, w_k = pts[k]
    if a > t_k - box and (e := step_share(k, a)) is not None:
        fix += (w_k * box - e) - w_k * (t_k - a)
    t_m, w_m = pts[m]
    if b > t_m - box and (e := step_share(m, b)) is not None:
        fix += e - w_m * (b - (t_m - box))
    return fix


def step_interpolate(t0: float, e0: float, t1: float, e1: float, t: float,
                     low: float | None, high: float | None) -> float:
    """Cumulative energy at t inside the counter segment (t0, e0) -> (t1, e1).

    GPU power mostly moves in steps (kernels start and stop). When the segment's mean power
    lies strictly between the slopes of its neighbours, model it as one step from the
    previous slope to the next, placed so the segment's energy is exact; else interpolate
    linearly. For a job that starts or stops inside a refresh interval this puts the edge
    on the right side of the step, where a straight line splits the difference.
    """
    dt = t1 - t0
    if dt <= 0:
        return e1
    x = min(max(t - t0, 0.0), dt)
    de = e1 - e0
    linear = e0 + de * x / dt
    if low is None or high is None:
        return linear
    mean = de / dt
    lo_w, hi_w = min(low, high), max(low, high)
    if hi_w - lo_w < 0.05 * hi_w or not (lo_w < mean < hi_w):
        return linear
    s = (high * dt - de) / (high - low)          # step position from t0
    return e0 + (low * x if x <= s else low * s + high * (x - s))

