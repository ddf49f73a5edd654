"""The refresh period a polled counter shows, learned from its reads.

NVML's energy counter refreshes about every 100 ms on the GPUs measured so far (99.97 ms on an
H100), but periods differ by GPU and driver, and a tracker that dates values on the wrong
period misdates every window edge by up to a period. So the period is measured, not assumed.

Two consecutive changes of a monotone counter, the first seen between reads p1 and r1, the
second between p2 and r2, with every read from r1 to p2 unchanged, bracket two *consecutive*
refreshes: no refresh lies in (r1, p2], whatever the read gaps (a refresh always moves the
value of a GPU that draws power). So one period lies in [p2 - r1, r2 - p1]. Reads a period
apart give an uninformative bracket (0 to two periods); the fast reads of a calibration burst
or a pair give a narrow one. The period is where most recent narrow brackets overlap.
"""
from __future__ import annotations

from collections import deque

KEPT = 16                  # recent period brackets kept
MIN_VOTES = 3              # brackets that must agree before a period is believed...
AGREEING = 0.6             # ...and this share of those kept (or two, with none against them)
SINGLE = 0.25              # a change bracket this narrow against the period holds one refresh
PLAIN = 0.2                # a gap this close to a whole number of periods counts them plainly
FIT_MIN_PERIODS = 8        # the fit is used once its centres span this many periods
FIT_MIN_CENTRES = 4        # ...and there are this many (three leave one residual to check the count by)
CENTRES_KEPT = 24          # change centres kept for the fit
SPREAD = 4.0               # a bracket whose ends differ more than this many times says little
JITTER_SHARE = 0.1         # (a jitter the tracker shows counts up to this share of a bracket's period)
JITTER_S = 0.001           # each of the two refreshes may land this early or late (a jittery
                           # clock splits the brackets; the majority still finds the period)


class PeriodEstimate:
    """Period brackets from consecutive counter changes, and the period they agree on.

    A change seen in a bracket narrower than a quarter period holds one refresh. Where such
    narrow brackets follow each other closely enough that the count of periods between them
    is plain (fast reads, pairs a few seconds apart), the slope of their centres over that
    count (least squares) measures the period finer than one bracket does."""

    __slots__ = ("brackets", "_last_change", "_period", "_centres", "precision_s", "fitted", "within_s", "jitter_s")

    def __init__(self, jitter_s: float = JITTER_S) -> None:
        # How early or late each refresh may land: JITTER_S, or more where the tracker's reads
        # showed a clock that jitters more (RefreshTracker.observe).
        self.jitter_s = jitter_s
        self.brackets: deque[tuple[float, float]] = deque(maxlen=KEPT)
        self._last_change: tuple[float, float] | None = None   # (last read before it, read that saw it)
        self._period: float | None = None
        self.precision_s = float("inf")     # how far off the agreed period may be
        self.fitted = False                 # the period comes from the fit (a long baseline)
        self.within_s: float | None = None  # the newest two changes' refreshes lie within this
        self._centres: deque[tuple[float, float]] = deque(maxlen=CENTRES_KEPT)   # (centre, width)

    def change(self, before_t: float, seen_t: float) -> None:
        """A change seen by the read at ``seen_t``; the read before it, at ``before_t``, still
        saw the old value."""
        last = self._last_change
        self._last_change = (before_t, seen_t)
        self._centres.append((0.5 * (before_t + seen_t), seen_t - before_t))
        if last is None:
            self.within_s = None
            return
        # Both refreshes lie in (last[0], seen_t]: the period is at most that span (+ jitter).
        self.within_s = seen_t - last[0]
        lo, hi = before_t - last[1], self.within_s
        # (At most a share of the period the bracket shows: a jitter grown on a period the
        # reads have not confirmed may be a wrong period's, a 20 ms counter's on the nominal
        # 100 ms, and blurred its own brackets past measuring.)
        j = min(self.jitter_s, max(JITTER_S, JITTER_SHARE * 0.5 * (lo + hi)))
        lo, hi = lo - 2 * j, hi + 2 * j
        # Reads a period apart bracket (0, two periods): every read sees a change, which says
        # only that the period is shorter than the reads' gaps. Those would crowd out the
        # fast reads' narrow brackets, so they are not kept.
        if lo > 0 and hi <= SPREAD * lo:
            self.brackets.append((lo, hi))
        if self.brackets:
            self._period = self._agreed()

    @property
    def period_s(self) -> float | None:
        """The period most brackets allow (None: too few agree yet)."""
        return self._period

    @property
    def latest_s(self) -> float | None:
        """The centre of the newest narrow bracket: a provisional period before one is agreed."""
        if not self.brackets:
            return None
        lo, hi = self.brackets[-1]
        return 0.5 * (lo + hi)

    def _agreed(self) -> float | None:
        # The deepest point of the brackets (a sweep over their ends), and the middle of the
        # stretch where that depth holds.
        ends = sorted([(lo, 1) for lo, _ in self.brackets] + [(hi, -1) for _, hi in self.brackets],
                      key=lambda e: (e[0], -e[1]))
        depth = best = 0
        start = stop = 0.0
        for i, (x, step) in enumerate(ends):
            depth += step
            if step > 0 and depth > best:
                best, start = depth, x
                stop = ends[i + 1][0] if i + 1 < len(ends) else x
        n = len(self.brackets)
        if not (best >= MIN_VOTES and best >= AGREEING * n) and not (best == n >= 2):
            return None         # (two brackets and nothing against them: a slow counter's first)
        rough = 0.5 * (start + stop)
        j = self.jitter_s
        fitted = _fit(self._centres, rough, 0.5 * (stop - start) + j, j)
        if fitted is not None and start - 2 * j <= fitted[0] <= stop + 2 * j:
            self.precision_s, self.fitted = fitted[1], True
            return fitted[0]
        self.precision_s, self.fitted = 0.5 * (stop - start) + j, False
        return rough


def _fit(centres: deque[tuple[float, float]], period: float, precision_s: float,
         jitter_s: float = JITTER_S) -> tuple[float, float] | None:
    """The period fitted to the newest single-refresh centres whose counts of periods between
    them are plain: a gap of n periods is counted only while n times the yardstick's error
    stays under PLAIN of a period (the yardstick refined as the run grows back). Returns the
    period and how far off it may be (the widest bracket's half width, plus a refresh's
    jitter, over the span); None where the centres span under FIT_MIN_PERIODS."""
    pts: list[tuple[int, float]] = []
    p, err, widest = period, precision_s, 0.0
    for c, width in reversed(centres):
        if width > SINGLE * p:
            continue                      # a wide bracket: no date, but the count goes on
        if pts:
            k_prev, c_prev = pts[-1]
            steps = (c_prev - c) / p
            n = round(steps)
            if n < 1 or abs(steps - n) > PLAIN or n * err > PLAIN * p:
                break
            pts.append((k_prev - n, c))
            widest = max(widest, width)
            span = pts[0][0] - pts[-1][0]
            if span >= 2:
                p = (pts[0][1] - c) / span
                err = min(err, widest / span)
        else:
            pts.append((0, c))
            widest = width
    span = pts[0][0] - pts[-1][0] if pts else 0
    if len(pts) < FIT_MIN_CENTRES or span < FIT_MIN_PERIODS:
        return None
    k_mean = sum(k for k, _ in pts) / len(pts)
    c_mean = sum(c for _, c in pts) / len(pts)
    slope = sum((k - k_mean) * (c - c_mean) for k, c in pts) / sum((k - k_mean) ** 2 for k, _ in pts)
    # Narrow brackets of one clock lie on the line to within their widths and its jitter. Where
    # they do not, the clock jitters more than allowed or a count was wrong, and the slope says
    # nothing the brackets' overlap does not (+-20 ms of jitter on a 100 ms counter: fitted
    # 114 ms, "to 0.3 ms", and every value dated on it).
    allowed = 0.5 * widest + max(jitter_s, RESIDUAL_JITTER_S)
    if any(abs(c - c_mean - slope * (k - k_mean)) > allowed for k, c in pts):
        return None
    return slope, (0.5 * widest + jitter_s) / span


RESIDUAL_JITTER_S = 0.004  # a fitted centre may lie off the line by its half width and this (an
                           # H100's clock: +-2.5 ms), or the jitter the tracker shows where more
FIT_SIGMAS = 4.0           # a refresh predicted this many standard deviations out is no count
FIT_FLOOR = 0.25           # a bracket's centre is off by at least this share of its width (sd)


class PhaseFit:
    """A refresh clock's period and phase from refresh brackets a count of periods apart:
    least squares of the brackets' centres on their refresh counts, with the scatter the
    centres show (an exact clock's few tenths of a ms, a jittering one's more).

    Each bracket is counted from the fit so far (a prior on the period stands in until the
    brackets have a slope): a count the fit cannot tell within FIT_SIGMAS standard deviations
    (a bracket too far on for what the fit knows) is left out, and a centre further from its
    prediction than that contradicts the fit. As brackets far apart come in, the period is
    known to their scatter over the count between them: a 20 ms counter's to a few parts in a
    million within two minutes of pairs, where the brackets alone (``PeriodEstimate``) say a
    few parts in a thousand."""

    __slots__ = ("_t0", "_p0", "_w0", "_n", "_sk", "_skk", "_sx", "_skx", "_sxx", "_sww", "_k_last", "last_centre_s")

    def __init__(self, centre_s: float, period_s: float, period_sd_s: float, width_s: float) -> None:
        self._t0 = centre_s                # times are kept from the first centre (k = 0)
        self._p0 = period_s                # the prior on the period, and its weight
        self._w0 = 1.0 / (period_sd_s * period_sd_s)
        self._n = 1
        self._sk = self._skk = self._sx = self._skx = self._sxx = 0.0
        self._sww = (FIT_FLOOR * width_s) ** 2  # the scatter the brackets' widths allow at least
        self._k_last = 0
        self.last_centre_s = centre_s      # the newest fitted bracket's centre

    def _solve(self) -> tuple[float, float, float, float, float, float]:
        """(phase, period, the variances of phase and period and their covariance, the centres'
        variance about the line)."""
        s2 = self._scatter2()
        # The prior's weight against the centres' is the scatter over the prior's variance.
        prior = self._w0 * s2
        a11, a12, a22 = float(self._n), self._sk, self._skk + prior
        det = a11 * a22 - a12 * a12
        b2 = self._skx + prior * self._p0
        return ((a22 * self._sx - a12 * b2) / det, (a11 * b2 - a12 * self._sx) / det,
                s2 * a22 / det, s2 * a11 / det, -s2 * a12 / det, s2)

    def _scatter2(self) -> float:
        """The centres' variance about the line: from the residuals once there are a few,
        never under what the brackets' widths allow."""
        n = self._n
        floor = self._sww / n
        if n < 4:
            return floor
        # Residual sum of squares about the unweighted line (the prior aside).
        kk = self._skk - self._sk * self._sk / n
        if kk <= 0.0:
            return floor
        kx = self._skx - self._sk * self._sx / n
        xx = self._sxx - self._sx * self._sx / n
        rss = max(0.0, xx - kx * kx / kk)
        return max(floor, rss / (n - 2))

    @property
    def points(self) -> int:
        """Brackets fitted so far."""
        return self._n

    @property
    def period_s(self) -> float:
        return self.estimate()[0]

    @property
    def period_sd_s(self) -> float:
        """The period's standard deviation."""
        return self.estimate()[1]

    def estimate(self) -> tuple[float, float]:
        """(period, its standard deviation) from one solve."""
        solved = self._solve()
        return solved[1], solved[3] ** 0.5

    def add(self, lo: float, hi: float, steps: int | None = None) -> bool | None:
        """Fit one refresh bracket [lo, hi], ``steps`` periods after the newest fitted one where
        the caller knows (the phases it keeps showed the count), else counted from the fit.
        True: fitted; None: left out (its count is not plain); False: its centre contradicts
        the fit (the clock is not what it says)."""
        x = 0.5 * (lo + hi) - self._t0
        phase, period, v_ph, v_p, cov, s2 = self._solve()
        k = round((x - phase) / period) if steps is None else self._k_last + steps
        width2 = (FIT_FLOOR * (hi - lo)) ** 2
        sd = (v_ph + k * k * v_p + 2 * k * cov + s2 + width2) ** 0.5
        if steps is None and FIT_SIGMAS * sd >= 0.5 * period:
            return None
        if abs(x - phase - k * period) > FIT_SIGMAS * sd + 0.5 * (hi - lo):
            return False
        if k <= self._k_last:
            return None                    # the same refresh again
        self._k_last = k
        self.last_centre_s = 0.5 * (lo + hi)
        self._n += 1
        self._sk += k
        self._skk += k * k
        self._sx += x
        self._skx += k * x
        self._sxx += x * x
        self._sww += width2
        return True
