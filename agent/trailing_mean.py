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
tail. ``mean_reference.anchor_on_means`` switches a counter-less device onto the reference.
"""
from __future__ import annotations

from collections import deque

from .mean_boxes import BoxPattern
from .shaping import HOLD_MAX_S, InstantSamples

MEANS_KEPT = 1200          # trailing-mean reads kept (~2 min at 10 Hz)
ANCHOR_SPACING_S = 1.0     # counter points kept as anchors of the live tail at most this often...
ANCHORS_KEPT = 12          # ...and this many (the tail's offset to the mean averages over them)
SCALE_LIMIT = 0.05         # a fitted scale further than this from 1 is not believed


class TrailingMean:
    """The reads (t, mean power over (t - w, t], integral of the mean since the first read) and
    the reference E(t) they give, with the kernel shaped by the device's instant samples."""

    __slots__ = ("samples", "means", "window_s", "cache", "memo", "boxes", "back_memo")

    def __init__(self, samples: InstantSamples) -> None:
        self.samples = samples
        self.means: deque[tuple[float, float, float]] = deque(maxlen=MEANS_KEPT)
        self.window_s = 1.0
        self.cache: tuple[float, float] | None = None     # (t, energy(t)) once settled
        self.memo: dict[tuple, float | None] = {}
        self.boxes = BoxPattern(samples)     # shapes the kernel where samples are coarse
        self.back_memo: tuple[float, float | None] | None = None   # (r, energy(r - w)) for ``at``

    def __bool__(self) -> bool:
        return bool(self.means)

    @property
    def first_t(self) -> float:
        return self.means[0][0]

    @property
    def newest_t(self) -> float:
        return self.means[-1][0]

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
        lo = self._index(x)
        t0, w0, _ = m[lo]
        if lo == len(m) - 1 or x <= t0:
            return lo, w0
        t1, w1, _ = m[lo + 1]
        return lo, w0 + (w1 - w0) * (x - t0) / (t1 - t0)

    def _index(self, x: float) -> int:
        """The last read at or before x (x within the reads)."""
        m = self.means
        lo, hi = 0, len(m) - 1
        if m[hi][0] <= x:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if m[mid][0] <= x:
                lo = mid
            else:
                hi = mid
        return lo

    def energy(self, t: float) -> float | None:
        """E(t) on the reference, less its base: the integral up to t + w/2 less the edge kernel.
        Memoised on what it depends on (the first instant sample and the first mean past
        t + w/2, and the boxes closed): the live tail asks for the same t on every sample."""
        half = 0.5 * self.window_s
        x = t + half
        nxt_sample = next((ts for ts, _ in self.samples.between(x, x + 0.5)), None)
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
        """Energy of the last moments [a, b], which no mean covers yet: from instant power, else
        the newest sample held. (The newest mean instead was worse on bursty loads: it
        describes a second that ended half a second ago.)"""
        if b <= a:
            return 0.0
        bridged = self.samples.bridge(a, b)
        if bridged is not None:
            return bridged
        return (self.samples.last[1] if self.samples else 0.0) * min(b - a, HOLD_MAX_S)

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
        for a in self.anchors:
            if a[2] is None and mean.settled(a[0]):
                a[2] = mean.energy(a[0])
        pts = [(a[1], a[2]) for a in self.anchors if a[2] is not None]
        key = (len(pts), self.anchors[-1][0] if self.anchors else None)
        if self.memo is not None and self.memo[0] == key:
            return self.memo[1]
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
