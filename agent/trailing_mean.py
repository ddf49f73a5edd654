"""A GPU's trailing-mean reads, and the energy reference they give (NVML field 185, or
GetPowerUsage where the data shows it averages).

The mean M(u) is the power averaged over (u - w, u]. Its integral I up to t + w/2 equals the
energy up to t plus an edge kernel that only depends on the power within w/2 of t and is zero
for constant power:

    E(t) = base + I(t + w/2) - integral of P(s) k(s - t) ds,
    k(x) = -(w/2 + x)/w on (-w/2, 0], (w/2 - x)/w on (0, w/2].

So the mean is the energy reference over spans of seconds, and instant power only shapes the
kernel: aliasing of a 10 Hz instant sample with a periodic load cannot bias a span by more than
its two edges' kernels. In the newest half window, which I does not cover yet, the identity
E(t) = E(t - w) + w M(t) carries it.

``TrailingMean`` holds the reads and that arithmetic (energies are relative: the caller adds
its base); ``CounterFit`` fits the reference to a counter's own points, for a counter GPU's live
tail; ``Persistence`` judges how long an instant sample keeps telling the power, for the moments
past the newest one. ``mean_reference.anchor_on_means`` switches a counter-less device onto the
reference.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from operator import itemgetter

from .mean_boxes import BoxPattern
from .shaping import HOLD_MAX_S, InstantSamples

MEANS_KEPT = 1200          # trailing-mean reads kept (~2 min at 10 Hz)
ANCHOR_SPACING_S = 1.0     # counter points kept as anchors of the live tail at most this often...
ANCHORS_KEPT = 12          # ...and this many (the tail's offset to the mean averages over them)
SCALE_LIMIT = 0.05         # a fitted scale further than this from 1 is not believed
PERSIST_S = 5.0            # a sample's persistence is judged over the last few seconds of pairs...
PERSIST_PAIR_MAX_S = 1.0   # ...of samples at most this far apart...
PERSIST_MIN_PAIRS = 6      # ...once this many are in (before: the sample is held)

_time = itemgetter(0)      # a read's time: the key the reads are searched by


class TrailingMean:
    """The reads (t, mean power over (t - w, t], integral of the mean since the first read) and
    the reference E(t) they give, with the kernel shaped by the device's instant samples."""

    __slots__ = ("samples", "means", "window_s", "cache", "memo", "boxes", "back_memo", "persistence")

    def __init__(self, samples: InstantSamples) -> None:
        self.samples = samples
        self.means: deque[tuple[float, float, float]] = deque(maxlen=MEANS_KEPT)
        self.window_s = 1.0
        self.cache: tuple[float, float] | None = None     # (t, energy(t)) once settled
        self.memo: dict[tuple, float | None] = {}
        self.boxes = BoxPattern(samples)     # shapes the kernel where samples are coarse
        self.back_memo: tuple[float, float | None] | None = None   # (r, energy(r - w)) for ``at``
        self.persistence = Persistence()

    def __bool__(self) -> bool:
        return bool(self.means)

    @property
    def first_t(self) -> float:
        return self.means[0][0]

    @property
    def newest_t(self) -> float:
        return self.means[-1][0]

    def settle_lag_s(self) -> float:
        """How long after an instant its reference point can exist: half a window (points sit
        half a window back) and one refresh of the mean, the largest of its recent spacings."""
        m = self.means
        gaps = [m[i][0] - m[i - 1][0] for i in range(max(1, len(m) - 8), len(m))]
        return 0.5 * self.window_s + min(max(gaps, default=0.1), self.window_s)

    def add_sample(self, t: float, power_w: float) -> bool:
        """An instant-power sample (``InstantSamples.add``), also judged for how long it keeps
        telling the power. False: not newer than the last one, dropped."""
        if not self.samples.add(t, power_w):
            return False
        if self.means:
            self.persistence.add(t, power_w - self.means[-1][1])
        return True

    def add(self, t: float, mean_w: float, window_s: float) -> None:
        if self.means and t <= self.means[-1][0]:
            return
        self.window_s = window_s
        if self.means:
            t0, m0, i0 = self.means[-1]
            self.means.append((t, mean_w, i0 + 0.5 * (m0 + mean_w) * (t - t0)))
        else:
            self.means.append((t, mean_w, 0.0))
        self.boxes.add_mean(t, mean_w, window_s)

    def integral(self, x: float) -> float | None:
        """The integral of the mean from its first read to x (None: not covered)."""
        found = self._locate(x)
        if found is None:
            return None
        lo, wx = found
        t0, w0, i0 = self.means[lo]
        return i0 + 0.5 * (w0 + wx) * (x - t0)

    def read_before(self, x: float) -> tuple[float, float] | None:
        """(t, M) of the newest read at or before x (None: none)."""
        m = self.means
        if not m or x < m[0][0]:
            return None
        t, w, _ = m[bisect_right(m, x, key=_time) - 1]
        return t, w

    def mean_w_at(self, x: float) -> float | None:
        """The mean at x, linear between its reads (None outside them)."""
        found = self._locate(x)
        return None if found is None else found[1]

    def _locate(self, x: float) -> tuple[int, float] | None:
        """The last read at or before x, and the mean at x, linear between reads (reads are in
        strictly increasing time); None outside them."""
        m = self.means
        if not m or x < m[0][0] or x > m[-1][0]:
            return None
        lo = bisect_right(m, x, key=_time) - 1
        t0, w0, _ = m[lo]
        if lo == len(m) - 1 or x <= t0:
            return lo, w0
        t1, w1, _ = m[lo + 1]
        return lo, w0 + (w1 - w0) * (x - t0) / (t1 - t0)

    def energy(self, t: float) -> float | None:
        """E(t) on the reference, less its base: the integral up to t + w/2 less the edge kernel.
        Memoised on what it depends on (the first instant sample and the first mean past
        t + w/2, and the boxes closed): the live tail asks for the same t on every sample."""
        half = 0.5 * self.window_s
        x = t + half
        nxt_sample = self.samples.first_in(x, x + 0.5)
        nxt_mean = self.means[-1][0] if self.means else None
        key = (t, nxt_sample, nxt_mean if nxt_mean is None or nxt_mean <= x else -1.0,
               len(self.samples) if nxt_sample is None else 0, self.boxes.key(t, half))
        memo = self.memo
        if key in memo:
            return memo[key]
        value = self._energy(t, half)
        if len(memo) >= 16:
            memo.clear()
        memo[key] = value
        return value

    def _energy(self, t: float, half: float) -> float | None:
        ref = self.integral(t + half)
        return None if ref is None else ref - self._edge_kernel(t, half)

    def settled_energy(self, t: float) -> float | None:
        """``energy(t)``, cached once its inputs can no longer change (the means and the instant
        samples reach well past t): the live tail asks for the same t on every sample."""
        cached = self.cache
        if cached is not None and cached[0] == t:
            return cached[1]
        value = self.energy(t)
        if value is not None and self.settled(t):
            self.cache = (t, value)
        return value

    def settled(self, t: float) -> bool:
        half = 0.5 * self.window_s
        return bool(self.means and self.means[-1][0] > t + half + 0.2 and self.samples
                    and self.samples.last[0] > t + half + 1.0)

    def at(self, x: float) -> float | None:
        """E(x) on the reference, less its base, as far as the means reach. Up to half a window
        before the newest mean it is ``energy``. In that last half window the integral is not
        there yet, and E(x) = E(x - w) + w M(x) carries it: it costs only the edge kernel's
        error one window back, where sparse instant samples of a bursty load over that half
        second were off by tens of joules (the live tail a scrape reads)."""
        m = self.means
        if not m or x > m[-1][0]:
            return None
        w = self.window_s
        if x <= m[-1][0] - 0.5 * w:
            return self.energy(x)
        dated = self.boxes.refresh_before(x)
        if dated is not None:
            # On the mean's refresh grid: M is the mean over (r - w, r], r up to a refresh
            # before its read; the moments since r come from instant power.
            r, mean_r = dated
            # Asked on every batch until the next mean comes; E one window before r is
            # settled by then (instant samples reach r), so it is worked out once per mean.
            if self.back_memo is not None and self.back_memo[0] == r:
                back = self.back_memo[1]
            else:
                back = self._energy(r - w, 0.5 * w)
                self.back_memo = (r, back)
            if back is not None:
                return back + w * mean_r + self.recent(r, x)
        back = self.energy(x - w)
        mean_x = self.mean_w_at(x)
        if back is None or mean_x is None:
            return None
        return back + w * mean_x

    def between(self, a: float, b: float) -> float | None:
        """Energy from a to b: on the reference up to the newest mean, then instant power (only
        the moments since). None where the means do not cover a."""
        if not self.means or b <= a:
            return None
        t_ref = min(b, self.means[-1][0])
        if t_ref <= a:
            return None
        e_a, e_ref = self.settled_energy(a), self.at(t_ref)
        if e_a is None:
            e_a = self.at(a)          # a within the newest half window
        if e_a is None or e_ref is None:
            return None
        return max(0.0, e_ref - e_a) + self.recent(t_ref, b)

    def recent(self, a: float, b: float) -> float:
        """Energy of the last moments [a, b], which no mean covers yet: from instant power, and
        past the newest sample the power ``Persistence`` predicts from it and the newest mean.
        (Holding the sample there was 5 % off on 5 s /metrics differences of a 100 ms square
        wave read at 10 Hz; the mean alone was worse on slow loads: it describes a second
        that ended half a second ago.)"""
        if b <= a:
            return 0.0
        samples = self.samples
        bridged = samples.bridge(a, b)
        if bridged is None:
            return self._beyond_reach(a, b)
        t_last, w_last = samples.last
        cut = max(a, t_last)
        if cut >= b or not self.means:
            return bridged
        # The bridge held the newest sample over (cut, b]: predict that stretch instead, as
        # M + s (P - M) integrated (it never falls below zero, so E only grows with b).
        return bridged + self._toward_mean(t_last, w_last, cut, b)

    def _beyond_reach(self, a: float, b: float) -> float:
        """``recent(a, b)`` where no sample lies within reach of b (reads over a second apart,
        as at ``--interval 0.5``): the samples up to the newest, then the same prediction past
        it. (Holding the newest sample from a instead fell back at the reach: the exported
        total of a GPU read at 0.5 s dropped by ~120 J between scrapes 30 ms apart.)"""
        samples = self.samples
        if not samples:
            return 0.0
        t_last, w_last = samples.last
        before = samples.bridge(a, t_last) if a < t_last else 0.0
        if before is None:
            return w_last * min(b - a, HOLD_MAX_S)     # no sample near a either: held
        cut = max(a, t_last)
        span = max(0.0, min(b, cut + HOLD_MAX_S) - cut)
        if not self.means:
            return before + w_last * span
        return before + w_last * span + self._toward_mean(t_last, w_last, cut, cut + span)

    def _toward_mean(self, t_last: float, w_last: float, a: float, b: float) -> float:
        """Over [a, b], past the newest sample (t_last, w_last): the prediction M + s (P - M)
        less the sample held, s the share ``Persistence`` gives it at each lag."""
        held = self.persistence.held_s(a - t_last, b - t_last)
        return (self.means[-1][1] - w_last) * (b - a - held)

    def _edge_kernel(self, t: float, half: float) -> float:
        """The integral of P(s) k(s - t): from the fitted boxes where the samples are coarse
        point samples (``mean_boxes``), else with P piecewise constant from the instant samples
        (each the mean since the one before; the ends held), from their running integrals
        (``InstantSamples.edge_kernel``: asked once per batch and device, a loop over the
        samples was a third of a floor hold's cost)."""
        boxed = self.boxes.kernel(t, half)
        if boxed is not None:
            return boxed
        return self.samples.edge_kernel(t, half)


class Persistence:
    """How long an instant sample keeps telling the power, judged from the samples themselves:
    the regression of each sample's deviation from the trailing mean on the one before's (rho,
    at the reads' own spacing g), over the last PERSIST_S or so. Past the newest sample P the
    power is predicted as M + s (P - M), s falling from 1 at P through rho at g: held on a
    slow load or where every value is read, nearer the mean on a load that moves faster than
    the reads (a 100 ms square wave read at 10 Hz). A periodic load read on its own beat can
    look persistent when it is not: it is then held, as before."""

    __slots__ = ("prev", "num", "den", "gap", "pairs")

    def __init__(self) -> None:
        self.prev: tuple[float, float] | None = None    # (t, deviation from the mean)
        self.num = self.den = self.gap = self.pairs = 0.0   # decaying sums over sample pairs

    def add(self, t: float, deviation_w: float) -> None:
        prev, self.prev = self.prev, (t, deviation_w)
        if prev is None:
            return
        dt = t - prev[0]
        if not 0.0 < dt <= PERSIST_PAIR_MAX_S:
            return                     # a hole says nothing of how the reads are spaced
        decay = math.exp(-dt / PERSIST_S)
        self.num = decay * self.num + prev[1] * deviation_w
        self.den = decay * self.den + prev[1] * prev[1]
        self.gap = decay * self.gap + dt
        self.pairs = decay * self.pairs + 1.0

    def held_s(self, lag0_s: float, lag1_s: float) -> float:
        """The integral of the newest sample's share over lags [lag0, lag1] after it (the
        share falls linearly from 1 to 0 at g / (1 - rho)): lag1 - lag0 where it is held."""
        whole = lag1_s - lag0_s
        if self.pairs < PERSIST_MIN_PAIRS or self.den <= 0.0:
            return whole
        rho = max(-1.0, min(1.0, self.num / self.den))
        fall = (1.0 - rho) * self.pairs / self.gap        # share lost per second of lag
        if fall <= 0.0:
            return whole
        end = 1.0 / fall

        def integral(x: float) -> float:
            x = min(x, end)
            return x - 0.5 * fall * x * x
        return integral(lag1_s) - integral(lag0_s)


class CounterFit:
    """E = a + s * reference, fitted to a counter GPU's recent points whose reference has
    settled: the live tail between counter reads. Re-anchoring the tail on the newest counter
    point alone put the edge kernel's error at that one instant (sparse instant samples of a
    bursty load: tens of joules) into every scrape until the next read; over several anchors it
    averages out. The scale s absorbs a mean that reads a little off the counter (0.1-1 % on an
    H100), which a fixed offset would carry as a drift; it is 1 until three anchors exist. A
    counter reset or a bridged fault (a new ``era``) starts afresh."""

    __slots__ = ("mean", "anchors", "era", "memo")

    def __init__(self, mean: TrailingMean) -> None:
        self.mean = mean
        self.anchors: deque[list] = deque(maxlen=ANCHORS_KEPT)   # [t, E, reference at t or None]
        self.era: tuple = ()
        self.memo: tuple[tuple, tuple[float, float] | None] | None = None

    def add(self, t: float, e: float, era: tuple) -> None:
        if era != self.era:
            self.anchors.clear()
            self.era = era
        if not self.anchors or t - self.anchors[-1][0] >= ANCHOR_SPACING_S:
            self.anchors.append([t, e, None])

    def fit(self, era: tuple) -> tuple[float, float] | None:
        """(a, s), or None before any anchor has settled in this era."""
        mean = self.mean
        if era != self.era or not mean or not mean.samples:
            return None
        anchors = self.anchors
        # Anchors settle oldest first (``settled`` only moves forward): the unsettled ones are
        # the newest few, and the fit is asked at every read of every GPU.
        settled = 0
        for a in anchors:
            if a[2] is None:
                if not mean.settled(a[0]):
                    break
                a[2] = mean.energy(a[0])
            settled += 1
        key = (settled, anchors[-1][0] if anchors else None)
        if self.memo is not None and self.memo[0] == key:
            return self.memo[1]
        pts = [(a[1], a[2]) for a in anchors if a[2] is not None]
        fit: tuple[float, float] | None = None
        if pts:
            scale = 1.0
            r_mean = sum(r for _, r in pts) / len(pts)
            e_mean = sum(e for e, _ in pts) / len(pts)
            var = sum((r - r_mean) ** 2 for _, r in pts)
            if len(pts) >= 3 and var > 0.0:
                s_fit = sum((r - r_mean) * (e - e_mean) for e, r in pts) / var
                if abs(s_fit - 1.0) <= SCALE_LIMIT:
                    scale = s_fit
            fit = (e_mean - scale * r_mean, scale)
        self.memo = (key, fit)
        return fit
