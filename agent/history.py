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
from .shaping import HOLD_MAX_S, TAIL_GAP_S, TAIL_MAX_S, InstantSamples, step_interpolate
from .trailing_mean import CounterFit, TrailingMean

RING_POINTS = 4096        # fine history per device (~7 min at 10 Hz)
BLOCK_POINTS = 64         # fine points per coarse peak-power block
SHAPE_SAMPLES = 512       # instant-power samples kept per counter device (~25 s at 20 Hz)
POWER_SPAN_S = 1.0        # counter power is the slope over at least this long (refresh-time noise)
RING_BLOCKS = 4096        # coarse history per device (~7 h at 10 Hz)
BACKDATE_EXACT_S = 0.5    # an edge measured back this far from a device's first point is not flagged
SPANS_KEPT = 64           # approximate (bridged) spans remembered per device
MEAN_CHECK_REACH_S = 0.25 # a mean read this close before t + w checks E near t (mean_check_j)


class DeviceHistory:
    __slots__ = ("device", "t", "e", "p", "n", "total_j", "last_counter", "last_power", "last_t",
                 "resets", "errors", "cursor", "blk_t0", "blk_t1", "blk_max", "blk_n", "cur_max",
                 "cur_t0", "cur_count", "anchor_t", "anchor_e", "samples", "last_read_t", "bridges",
                 "approx_spans", "floor_j", "floor_t", "mean", "mean_base", "mean_active", "mean_from_t",
                 "counter_fit", "owed_j", "owed_t", "seen_t")

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
        # The trailing mean: a counter-less GPU's energy reference (E = base + its energy from
        # mean_from_t on, once ``mean_active``), and a counter GPU's live tail (``counter_fit``).
        self.mean = TrailingMean(self.samples)
        self.mean_base = 0.0
        self.mean_active = False
        self.mean_from_t = math.inf      # the anchor: E is on the mean reference from here on
        self.counter_fit = CounterFit(self.mean)
        self.floor_t = -math.inf        # ...from this instant on (when it was shown)
        self.floor_j = 0.0              # the exported total never goes below this again
        self.seen_t = 0.0               # when its newest reading was read (may be after its date)

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
            exact = self.mean.energy(t)     # the reference's own value, shaped inside the segment
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
        stepped = self._step_value(k, t, allow_step)
        # Within what is left below a measured tail (e1 here), or E would step back at d0.
        return None if stepped is None else min(max(stepped, e0), e1)

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
        mean = self.mean
        if mean and (self.device.source == Source.COUNTER or self.mean_active):
            # On the trailing mean up to its newest read: fitted to the counter's recent points,
            # or from the reference's own base; instant power for the moments since.
            fit = self.counter_fit.fit(self.fit_era()) if self.device.source == Source.COUNTER else \
                (self.mean_base, 1.0)
            t_ref = min(t, mean.newest_t)
            ref_t = mean.at(t_ref) if fit is not None and t_ref > t_from else None
            if fit is not None and ref_t is not None:
                return max(self.total_j, fit[0] + fit[1] * ref_t) + mean.recent(t_ref, t), True
            ref = mean.between(t_from, t) if self.device.source == Source.COUNTER else None
            if ref is not None:
                return self.total_j + ref, True
        if self.samples and (self.device.source == Source.COUNTER or self.mean_active):
            # From the counter's (dated) refresh: the value holds the energy up to it.
            t_shape = min(t, self.samples.last[0])
            bridged = self.samples.bridge(t_from, t_shape) if t_shape > t_from else None
            if bridged is not None:
                w = self.samples.last[1]
                return self.total_j + bridged + w * min(max(0.0, t - t_shape), HOLD_MAX_S), True
        return self.total_j + (self.last_power or 0.0) * min(max(0.0, t - t_from), HOLD_MAX_S), True

    def energy(self, t: float) -> float:
        """E(t), the one value every figure reads. Inside the history it is settled. Past the
        last point (the live tail a scrape sees) it is the best estimate (the trailing mean
        fitted to recent counter points, ``CounterFit``), and never below what was shown before
        a reading corrected the estimate downwards: the total holds until the estimate catches
        up, so it never goes backwards. Upward corrections are not spread over the following
        seconds: a spread tail lags the estimate, and measured worse against the truth (5 s
        differences of /metrics, p90 4.4 % held, 5.3 % spread over 0.3 s, 9.3 % over 1 s;
        ``bench/bench_exported.py``)."""
        value, _ = self.estimate_at(t)
        if self.last_t is None:
            return 0.0
        if t < self.point(self.oldest())[0]:
            # Before the first point E is measured back from the first readings, below its
            # zero there (a window begun before the meter started): kept, so a difference from
            # such a t holds that energy. (Clamped to 0, a `run` record's timeline lost it
            # from its first second and spread it over the others: a steady 300 W read 309 W.)
            return value
        if t < self.last_t:
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

    def newest_t(self) -> float:
        """The newest reading's time: a counter point or an instant sample, or when it was
        read where that is later (a value dated at its refresh; 0 before any). A floor is
        held up to the read (``Recorder``), so a total shown there never falls."""
        return max(self.last_t or 0.0, self.samples.last[0] if self.samples else 0.0, self.seen_t)

    def fit_era(self) -> tuple[int, int]:
        """Counter points fit one reference until a reset or a bridged fault."""
        return (self.resets, self.bridges)

    def settle_lag_s(self) -> float:
        """How long after an instant E is settled there in normal reading: a counter-less GPU
        on its trailing mean waits for the mean that covers half a window on (0: its next
        reading settles it)."""
        if self.mean_active and self.device.source != Source.COUNTER and self.mean:
            return self.mean.settle_lag_s()
        return 0.0

    def mean_check_j(self, t: float) -> float | None:
        """How far E, where it rests on instant power near t (before a counter-less GPU's
        trailing-mean reference starts), is from what the mean says: over one window to a read
        of the mean at r (the newest at or before t + w, within a refresh or two of it),
        E(r) - E(r - w) = w M(r), with E(r) on the reference. (At r itself, not at t + w: the
        mean interpolated between its reads misses a bursty load's swings by tens of joules.)
        None until r is settled on the reference."""
        mean = self.mean
        if not (self.mean_active and mean):
            return None
        w = mean.window_s
        read = mean.read_before(t + w)
        if read is None or read[0] < max(self.mean_from_t, t + w - MEAN_CHECK_REACH_S):
            return None
        r, m_r = read
        e_r, e_s = self.value_at(r), self.value_at(r - w)
        if e_r is None or e_s is None:
            return None
        return (e_r[0] - e_s[0]) - w * m_r

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

