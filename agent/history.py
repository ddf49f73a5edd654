"""One device's energy history: E(t) as a monotonic piecewise-linear function of time.

Points (t, cumulative energy, power) sit in a fixed ring; older peaks survive in coarse blocks.
Counter devices also keep instant-power samples, which shape energy inside a counter span and
bridge spans the counter cannot vouch for (a reset, a lost GPU, a stall).
"""
from __future__ import annotations

import math
from array import array
from collections import deque

from .model import Device, Source
from .shaping import TAIL_GAP_S, TAIL_MAX_S, InstantSamples, step_interpolate

RING_POINTS = 4096        # fine history per device (~7 min at 10 Hz)
BLOCK_POINTS = 64         # fine points per coarse peak-power block
SHAPE_SAMPLES = 512       # instant-power samples kept per counter device (~25 s at 20 Hz)
POWER_SPAN_S = 1.0        # counter power is the slope over at least this long (refresh-time noise)
RING_BLOCKS = 4096        # coarse history per device (~7 h at 10 Hz)
HOLD_MAX_S = 5.0          # E(t) past the last sample holds the last power this long at most
BACKDATE_EXACT_S = 0.5    # an edge measured back this far from a device's first point is not flagged
MEANS_KEPT = 1200          # trailing-mean samples kept (~2 min at 10 Hz)
ANCHOR_SPACING_S = 1.0    # counter points kept as anchors of the live tail at most this often...
ANCHORS_KEPT = 12         # ...and this many (the tail's offset to the mean averages over them)
SPANS_KEPT = 64           # approximate (bridged) spans remembered per device


class DeviceHistory:
    __slots__ = ("device", "t", "e", "p", "n", "total_j", "last_counter", "last_power", "last_t",
                 "resets", "errors", "cursor", "blk_t0", "blk_t1", "blk_max", "blk_n", "cur_max",
                 "cur_t0", "cur_count", "anchor_t", "anchor_e", "samples", "last_read_t", "bridges",
                 "approx_spans", "floor_j", "floor_t", "means", "mean_window_s", "mean_base", "mean_active", "mean_from_t", "mean_cache", "mean_memo", "owed_j", "owed_t", "anchors", "anchor_era", "fit_memo")

    def __init__(self, device: Device, cursor: int) -> None:
        self.device = device
        self.t = array("d", bytes(8 * RING_POINTS))
        self.e = array("d", bytes(8 * RING_POINTS))
        self.p = array("d", bytes(8 * RING_POINTS))
        self.n = 0                      # points ever appended
        self.total_j = 0.0
        self.last_counter: float | None = None
        self.last_power: float | None = None
        self.last_t: float | None = None
        self.resets = 0
        self.errors = 0
        self.cursor = cursor            # next mark seq this device has not resolved
        self.blk_t0 = array("d", bytes(8 * RING_BLOCKS))
        self.blk_t1 = array("d", bytes(8 * RING_BLOCKS))
        self.blk_max = array("d", bytes(8 * RING_BLOCKS))
        self.blk_n = 0
        self.cur_max = -math.inf
        self.cur_t0 = 0.0
        self.cur_count = 0
        self.anchor_t: float | None = None
        self.anchor_e = 0.0
        self.samples = InstantSamples(SHAPE_SAMPLES)   # counters: shape spans, bridge faults
        self.last_read_t: float | None = None   # when the last counter value was read
        self.bridges = 0                # counter spans filled in from power (reset, lost, stall)
        self.approx_spans: deque[tuple[float, float]] = deque(maxlen=SPANS_KEPT)
        self.owed_j = 0.0               # energy power filled in for a stall, owed back if the
        self.owed_t = 0.0               # counter catches up (when it was filled in)
        # Trailing-mean reference (no counter): (t, mean power over (t - window, t], cumulative
        # integral of that mean since the first one). Energy is base + I(t + w/2) - kernel(t).
        self.means: deque[tuple[float, float, float]] = deque(maxlen=MEANS_KEPT)
        self.mean_window_s = 1.0
        self.mean_base = 0.0
        self.mean_active = False
        self.mean_cache: tuple[float, float] | None = None   # (t, mean_energy(t)) once settled
        self.mean_memo: dict[tuple, float | None] = {}
        self.mean_from_t = math.inf      # the anchor: E is on the mean reference from here on
        self.floor_t = -math.inf        # ...from this instant on (when it was shown)
        self.floor_j = 0.0              # the exported total never goes below this again
        # Counter points [t, E, reference at t once settled]: the live tail is the reference
        # fitted to several of them, not re-anchored on each (``tail_fit``).
        self.anchors: deque[list] = deque(maxlen=ANCHORS_KEPT)
        self.anchor_era = (0, 0)         # (resets, bridges) the anchors belong to
        self.fit_memo: tuple[tuple, tuple[float, float] | None] | None = None

    # -- history -------------------------------------------------------------
    def point(self, k: int) -> tuple[float, float, float]:
        i = k % RING_POINTS
        return self.t[i], self.e[i], self.p[i]

    def oldest(self) -> int:
        return max(0, self.n - RING_POINTS)

    def value_at(self, t: float) -> tuple[float, float, bool] | None:
        """(energy, slope, extrapolated) at t from history; None if t is after the last point."""
        if self.n == 0 or t > self.last_t:  # type: ignore[operator]
            return None
        lo, hi = self.oldest(), self.n - 1
        t_lo = self.point(lo)[0]
        if t <= t_lo:
            _, e_lo, p_lo = self.point(lo)
            if t < t_lo and lo == 0:
                back = self.back_energy(t)
                if back is not None:
                    return e_lo - back, p_lo, t_lo - t > BACKDATE_EXACT_S
            return e_lo, p_lo, t < t_lo
        while hi - lo > 1:   # binary search over the ring's logical indices
            mid = (lo + hi) // 2
            if self.point(mid)[0] < t:
                lo = mid
            else:
                hi = mid
        t0, e0, _ = self.point(lo)
        t1, e1, p1 = self.point(hi)
        if self.device.source == Source.COUNTER:
            value = self.counter_value(lo, t, allow_step=True)
            if value is not None:
                return value, p1, False
        elif self.mean_active and t0 >= self.mean_from_t:
            exact = self.mean_energy(t)     # the reference's own value, shaped inside the segment
            if exact is not None:
                return min(max(self.mean_base + exact, e0), e1), p1, False
        frac = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        return e0 + (e1 - e0) * frac, p1, False

    def peak_w(self, t0: float, t1: float) -> float | None:
        """Highest power seen between t0 and t1: fine points when still held, else coarse blocks."""
        best = -math.inf
        oldest = self.oldest()
        if self.n and self.point(oldest)[0] <= t0:
            for k in range(self.n - 1, oldest, -1):
                tk, _, pk = self.point(k)
                t_prev = self.point(k - 1)[0]
                if t_prev < t1 and tk > t0:   # segment (t_prev, tk] overlaps the window
                    best = max(best, pk)
                if t_prev <= t0:
                    break
        else:
            for b in range(max(0, self.blk_n - RING_BLOCKS), self.blk_n):
                i = b % RING_BLOCKS
                if self.blk_t1[i] >= t0 and self.blk_t0[i] <= t1:
                    best = max(best, self.blk_max[i])
            for k in range(max(oldest, self.n - self.cur_count), self.n):
                tk, _, pk = self.point(k)
                if t0 <= tk <= t1:
                    best = max(best, pk)
        return None if best == -math.inf else best

    def counter_value(self, k: int, t: float, allow_step: bool) -> float | None:
        """Energy at t inside the counter segment from point k to k+1: shaped by instant power
        when it covers the segment, else (``allow_step``) on a step between the neighbouring
        slopes; None when neither is possible yet."""
        t0, e0, _ = self.point(k)
        t1, e1, _ = self.point(k + 1)
        if t1 <= t0:
            return e1
        if self.samples.coarse:
            return self._step_value(k, t, allow_step)
        # The sampler reads instant power every few ms after an edge and schedules a counter
        # read at the next refresh: the dense tail [d0, t1] before it is measured directly, and
        # the counter's remaining energy is spread over [t0, d0] in proportion to the instant
        # power there. Continuous at d0 and monotonic on both sides.
        d0 = self.samples.dense_from(t0, t1)
        tail_d0 = self.samples.energy(d0, t1, TAIL_GAP_S) if d0 is not None else None
        if tail_d0 is not None and d0 is not None:
            tail_d0 = min(tail_d0, e1 - e0)
            if t >= d0:
                tail = self.samples.energy(t, t1, TAIL_GAP_S)
                if tail is not None:
                    return min(max(e1 - min(tail, tail_d0), e0), e1)
            t1, e1 = d0, e1 - tail_d0          # shape the rest of the segment below
            if t >= t1:
                return e1
        # Shaped by instant power: the counter's energy spread in proportion to what instant
        # power shows. Dense samples (every value read) cover the segment strictly; jittered
        # 10 Hz reads, with gaps up to ~0.2 s, leniently.
        whole = self.samples.energy(t0, t1)
        strict = whole is not None
        if whole is None:
            whole = self.samples.bridge(t0, t1)
        if whole is not None and whole > 0:
            part = (self.samples.energy(t0, t) if strict else self.samples.bridge(t0, t)) or 0.0
            return e0 + (e1 - e0) * min(1.0, max(0.0, part / whole))
        return self._step_value(k, t, allow_step)

    def _step_value(self, k: int, t: float, allow_step: bool) -> float | None:
        """Energy at t inside counter segment k on a step between its neighbours' slopes (None
        unless ``allow_step``: the next segment's slope is not known yet)."""
        if not allow_step:
            return None
        t0, e0, _ = self.point(k)
        t1, e1, _ = self.point(k + 1)
        low = high = None
        if k > self.oldest():
            tb, eb, _ = self.point(k - 1)
            low = (e0 - eb) / (t0 - tb) if t0 > tb else None
        if k + 2 < self.n:
            ta, ea, _ = self.point(k + 2)
            high = (ea - e1) / (ta - t1) if ta > t1 else None
        return step_interpolate(t0, e0, t1, e1, t, low, high)

    def back_energy(self, t: float) -> float | None:
        """Energy from t to the device's first point (t before it: a window opened while the
        meter was still starting), measured back from the first readings: instant power for a
        counter, else the first counter span's slope, else the first power reading."""
        t_first, e_first, p_first = self.point(0)
        if self.device.source != Source.COUNTER:
            return p_first * (t_first - t)
        dense = self.samples.energy(t, t_first, TAIL_GAP_S) if t_first - t <= TAIL_MAX_S else None
        if dense is not None:
            return dense
        bridged = self.samples.bridge(t, t_first)
        if bridged is not None:
            return bridged
        if self.n >= 2:
            t_next, e_next, _ = self.point(1)
            return (e_next - e_first) / (t_next - t_first) * (t_first - t) if t_next > t_first else 0.0
        return None

    def estimate_at(self, t: float) -> tuple[float, bool]:
        """E(t), and whether t lies past the last point (an estimate the next point may correct).
        Past it, instant power carries the total forward (counters are read every few seconds),
        else the last power is held, for HOLD_MAX_S at most."""
        found = self.value_at(t)
        if found is not None:
            return found[0], found[2]
        if self.last_t is None:
            return 0.0, True
        t_from = self.last_t
        if self.device.source == Source.COUNTER and self.means:
            fit = self.tail_fit()
            t_ref = min(t, self.means[-1][0])
            ref_t = self.reference_at(t_ref) if fit is not None and t_ref > t_from else None
            if fit is not None and ref_t is not None:
                return max(self.total_j, fit[0] + fit[1] * ref_t) + self._recent_energy(t_ref, t), True
            ref = self.reference_energy(t_from, t)
            if ref is not None:
                return self.total_j + ref, True
        if self.mean_active and self.means:
            t_ref = min(t, self.means[-1][0])
            ref = self.reference_at(t_ref) if t_ref > t_from else None
            if ref is not None:
                return max(self.total_j, self.mean_base + ref) + self._recent_energy(t_ref, t), True
        if self.samples and (self.device.source == Source.COUNTER or self.mean_active):
            # From the counter's (dated) refresh: the value holds the energy up to it.
            t_shape = min(t, self.samples.last[0])
            bridged = self.samples.bridge(t_from, t_shape) if t_shape > t_from else None
            if bridged is not None:
                w = self.samples.last[1]
                return self.total_j + bridged + w * min(max(0.0, t - t_shape), HOLD_MAX_S), True
        return self.total_j + (self.last_power or 0.0) * min(max(0.0, t - t_from), HOLD_MAX_S), True

    # -- trailing-mean reference ---------------------------------------------------------
    def add_mean(self, t: float, mean_w: float, window_s: float) -> None:
        if self.means and t <= self.means[-1][0]:
            return
        self.mean_window_s = window_s
        if self.means:
            t0, m0, i0 = self.means[-1]
            self.means.append((t, mean_w, i0 + 0.5 * (m0 + mean_w) * (t - t0)))
        else:
            self.means.append((t, mean_w, 0.0))

    def mean_integral(self, x: float) -> float | None:
        """The integral of the trailing mean from its first sample to x (None: not covered)."""
        m = self.means
        if not m or x < m[0][0] or x > m[-1][0]:
            return None
        lo, hi = 0, len(m) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if m[mid][0] <= x:
                lo = mid
            else:
                hi = mid
        t0, w0, i0 = m[lo]
        if x <= t0 or hi == lo:
            return i0
        t1, w1, _ = m[hi]
        wx = w0 + (w1 - w0) * (x - t0) / (t1 - t0)
        return i0 + 0.5 * (w0 + wx) * (x - t0)

    def mean_energy(self, t: float) -> float | None:
        """``_mean_energy(t)``, memoised on what it depends on: the first instant sample and
        the first mean past t + w/2 (the live tail asks for the same t on every sample)."""
        half = 0.5 * self.mean_window_s
        x = t + half
        nxt_sample = next((ts for ts, _ in self.samples.between(x, x + 0.5)), None)
        nxt_mean = self.means[-1][0] if self.means else None
        key = (t, nxt_sample, nxt_mean if nxt_mean is None or nxt_mean <= x else -1.0,
               len(self.samples) if nxt_sample is None else 0)
        memo = self.mean_memo
        if key in memo:
            return memo[key]
        value = self._mean_energy(t)
        if len(memo) >= 16:
            memo.clear()
        memo[key] = value
        return value

    def _mean_energy(self, t: float) -> float | None:
        """E(t) on the trailing-mean reference, less its base: the integral of the mean up to
        t + w/2, less the edge kernel that turns a w-wide ramp into a step at t (zero for
        constant power), shaped by the instant samples within w/2 of t."""
        half = 0.5 * self.mean_window_s
        ref = self.mean_integral(t + half)
        if ref is None:
            return None
        return ref - self._edge_kernel(t, half)

    def _edge_kernel(self, t: float, half: float) -> float:
        """The integral of P(s) k(s - t), k = -(h + x)/w on (-h, 0] and (h - x)/w on (0, h],
        with P piecewise constant from the instant samples (each the mean since the one
        before; the ends held)."""
        w = 2.0 * half
        # Samples before t - h add nothing (the first one inside covers the time since the
        # kernel's start); the first one past t + h covers the end. Only with none inside is
        # the last one before held across the whole kernel. (Asked per reading: ~3x cheaper
        # than scanning a second either side.)
        pts = self.samples.between(t - half, t + half + 1.0) or self.samples.between(t - half - 1.0, t + half + 1.0)
        if not pts:
            return 0.0

        def prim(x: float) -> float:          # the kernel's antiderivative, from x = -h
            if x <= 0.0:
                return -(half * (x + half) + 0.5 * (x * x - half * half)) / w
            return -(half * half * 0.5) / w + (half * x - 0.5 * x * x) / w

        total, lo = 0.0, -half
        prev_t = None
        for ts, v in pts:
            hi = min(ts - t, half)
            start = lo if prev_t is None else max(lo, prev_t - t)
            if hi > start:
                total += v * (prim(hi) - prim(start))
                lo = hi
            prev_t = ts
            if ts - t >= half:
                break
        if lo < half:
            total += pts[-1][1] * (prim(half) - prim(lo))
        return total

    def energy(self, t: float) -> float:
        """E(t), the one value every figure reads. Inside the history it is settled. Past the
        last point (the live tail a scrape sees) it is the best estimate (the trailing mean
        fitted to recent counter points, ``tail_fit``), and never below what was shown before
        a reading corrected the estimate downwards: the total holds until the estimate catches
        up, so it never goes backwards. Upward corrections are not spread over the following
        seconds: a spread tail lags the estimate, and measured worse against the truth (5 s
        differences of /metrics, p90 4.4 % held, 5.3 % spread over 0.3 s, 9.3 % over 1 s;
        ``bench/bench_exported.py``)."""
        value, _ = self.estimate_at(t)
        if self.last_t is None or t < self.last_t:
            return max(0.0, value)
        return max(0.0, self.floor_j if t >= self.floor_t else 0.0, value)

    def hold(self, t: float) -> None:
        """What E(t) shows now stays the floor of the exported total from t on: a later reading
        that corrects the estimate downwards holds it instead of taking it back."""
        shown = self.energy(t)
        if shown > self.floor_j:
            self.floor_j, self.floor_t = shown, t

    def peak_power(self, t0: float, t1: float) -> float | None:
        """The largest power over [t0, t1]: history points and instant samples, never below the
        span's average (a counter's mean is a power the device reached)."""
        best = self.peak_w(t0, t1)
        sample = self.samples.max_w(t0, t1)
        if sample is not None:
            best = sample if best is None else max(best, sample)
        if t1 > t0 and self.last_t is not None:
            avg = (self.energy(t1) - self.energy(t0)) / (t1 - t0)
            best = avg if best is None else max(best, avg)
        return best

    def timeline(self, t0: float, t1: float, step_s: float) -> list[tuple[float, float, float]]:
        """[(start, end, mean power_w)] tiling [t0, t1]: each step's power is its energy from
        E(t), so the timeline integrates to E(t1) - E(t0) exactly."""
        out = []
        a, e_a = t0, self.energy(t0)
        while a < t1 - 1e-9:
            b = min(t1, a + step_s)
            e_b = self.energy(b)
            out.append((a, b, max(0.0, e_b - e_a) / (b - a)))
            a, e_a = b, e_b
        return out

    def reference_energy(self, a: float, b: float) -> float | None:
        """Energy from a to b on the 1 s trailing mean where one was read with instant power
        (a counter GPU's field 185): over seconds it beats sparse instant samples of a bursty
        load by several %. Up to the newest mean it is ``reference_at``; instant power covers
        only the moments since. None where the means do not cover a."""
        if not self.means or b <= a:
            return None
        t_ref = min(b, self.means[-1][0])
        if t_ref <= a:
            return None
        e_a, e_ref = self._settled_mean_energy(a), self.reference_at(t_ref)
        if e_a is None:
            e_a = self.reference_at(a)     # a counter read within the newest half window
        if e_a is None or e_ref is None:
            return None
        return max(0.0, e_ref - e_a) + self._recent_energy(t_ref, b)

    def add_anchor(self, t: float, e: float) -> None:
        """A counter point (t, E) for ``tail_fit``; a reset or a bridged fault starts afresh."""
        era = (self.resets, self.bridges)
        if era != self.anchor_era:
            self.anchors.clear()
            self.anchor_era = era
        if not self.anchors or t - self.anchors[-1][0] >= ANCHOR_SPACING_S:
            self.anchors.append([t, e, None])

    def tail_fit(self) -> tuple[float, float] | None:
        """(a, s) with E = a + s * reference over the recent counter points whose reference has
        settled. Re-anchoring the live tail on the newest counter point alone put the edge
        kernel's error at that one instant (sparse instant samples of a bursty load: tens of
        joules) into every scrape until the next read; over several anchors it averages out.
        The scale s absorbs a mean that reads a little off the counter (0.1-1 % on an H100),
        which a fixed offset would carry as a drift; it is 1 until ~4 s of anchors exist."""
        if (self.resets, self.bridges) != self.anchor_era or not self.means or not self.samples:
            return None
        half = 0.5 * self.mean_window_s
        ready_t = min(self.means[-1][0] - half - 0.2, self.samples.last[0] - half - 1.0)
        for a in self.anchors:
            if a[2] is None and a[0] < ready_t:
                a[2] = self.mean_energy(a[0])
        pts = [(a[1], a[2]) for a in self.anchors if a[2] is not None]
        key = (len(pts), self.anchors[-1][0] if self.anchors else None)
        if self.fit_memo is not None and self.fit_memo[0] == key:
            return self.fit_memo[1]
        fit: tuple[float, float] | None = None
        if pts:
            scale = 1.0
            r_mean = sum(r for _, r in pts) / len(pts)
            e_mean = sum(e for e, _ in pts) / len(pts)
            var = sum((r - r_mean) ** 2 for _, r in pts)
            if len(pts) >= 3 and pts[-1][1] - pts[0][1] > 0.0 and var > 0.0:
                s_fit = sum((r - r_mean) * (e - e_mean) for e, r in pts) / var
                if 0.95 <= s_fit <= 1.05:
                    scale = s_fit
            fit = (e_mean - scale * r_mean, scale)
        self.fit_memo = (key, fit)
        return fit

    def reference_at(self, x: float) -> float | None:
        """E(x) on the trailing-mean reference, less its base, as far as the means reach. Up to
        half a window before the newest mean it is ``mean_energy``. In that last half window
        the integral is not there yet, and the identity E(x) = E(x - w) + w M(x) carries it
        (M, the mean over (x - w, x], read at x): it costs only the edge kernel's error one
        window back, where sparse instant samples of a bursty load over that half second were
        off by tens of joules (the live tail a scrape reads)."""
        m = self.means
        if not m or x > m[-1][0]:
            return None
        w = self.mean_window_s
        if x <= m[-1][0] - 0.5 * w:
            return self.mean_energy(x)
        back = self.mean_energy(x - w)
        mean_x = self.mean_w_at(x)
        if back is None or mean_x is None:
            return None
        return back + w * mean_x

    def mean_w_at(self, x: float) -> float | None:
        """The trailing mean at x, linear between its reads (None outside them)."""
        m = self.means
        if not m or x < m[0][0] or x > m[-1][0]:
            return None
        lo, hi = 0, len(m) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if m[mid][0] <= x:
                lo = mid
            else:
                hi = mid
        t0, w0, _ = m[lo]
        t1, w1, _ = m[hi]
        if t1 <= t0 or x <= t0:
            return w0
        return w0 + (w1 - w0) * (x - t0) / (t1 - t0)

    def _settled_mean_energy(self, t: float) -> float | None:
        """``mean_energy(t)``, cached once its inputs can no longer change (the means and the
        instant samples reach well past t): the live tail asks for the same t (the last counter
        point) on every sample."""
        cached = self.mean_cache
        if cached is not None and cached[0] == t:
            return cached[1]
        value = self.mean_energy(t)
        half = 0.5 * self.mean_window_s
        settled = (self.means and self.means[-1][0] > t + half + 0.2 and self.samples
                   and self.samples.last[0] > t + half + 1.0)
        if value is not None and settled:
            self.mean_cache = (t, value)
        return value

    def _recent_energy(self, a: float, b: float) -> float:
        """Energy of the last moments [a, b] (half a second), which no trailing mean covers
        yet: from instant power, else the newest power held. (The newest 1 s mean instead was
        worse on bursty loads: it describes a second that ended half a second ago.)"""
        if b <= a:
            return 0.0
        bridged = self.samples.bridge(a, b)
        if bridged is not None:
            return bridged
        w = self.samples.last[1] if self.samples else (self.last_power or 0.0)
        return w * min(b - a, HOLD_MAX_S)

    def approximate_between(self, t0: float, t1: float) -> bool:
        """Whether any bridged span overlaps [t0, t1]."""
        return any(a < t1 and b > t0 for a, b in self.approx_spans)

    def push(self, t: float, e: float, p: float) -> None:
        i = self.n % RING_POINTS
        self.t[i], self.e[i], self.p[i] = t, e, p
        self.n += 1
        if self.cur_count == 0:
            self.cur_t0 = t
        self.cur_count += 1
        if p > self.cur_max:
            self.cur_max = p
        if self.cur_count == BLOCK_POINTS:
            j = self.blk_n % RING_BLOCKS
            self.blk_t0[j], self.blk_t1[j], self.blk_max[j] = self.cur_t0, t, self.cur_max
            self.blk_n += 1
            self.cur_count, self.cur_max = 0, -math.inf

