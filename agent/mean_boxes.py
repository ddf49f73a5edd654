"""Box energies from a trailing mean and coarse point samples (GPUs with no counter whose field
186 is a ~100 ms point sample stamped with its read time).

A trailing mean refreshed on a grid r_k = phi + k T, over a window w = n T, gives the differences
of the boxes' energies one window apart:

    B_k - B_(k-n) = w (M_k - M_(k-1)),    B_k the energy in (r_(k-1), r_k].

So the boxes are known up to one n-periodic pattern. Point samples alias with a bursty load, so
one second of them cannot shape the mean's edge kernel; but their aliasing differs from second
to second on loads not locked to the grid, and the pattern is fitted to the samples of the last
``PATTERN_WINDOWS`` windows. The edge kernel is then shaped by those boxes.

Whether the data fits this model is checked, not assumed. ``kernel`` answers None, and the
samples shape the kernel as before, unless all of these hold:
- the mean is a trailing mean (``power_evidence.MeanEvidence``, before it reaches the ledger);
- a refresh grid explains when its new values appear;
- the window holds a whole number of refreshes;
- the samples' new values appear on that grid;
- 90 % of refreshes were seen;
- the fitted boxes add up to the mean within ``SUM_TOLERANCE``. Their common shortfall is the
  samples' slow aliasing, and it is spread evenly.

On a load locked to the grid, the mean does not move and no grid can be fitted; such a load
keeps the samples' kernel.
"""
from __future__ import annotations

import math
from collections import deque

from .shaping import InstantSamples

GRID_TIMES = 64            # new-value times a refresh grid is fitted to
GRID_REFIT = 16            # ...refitted after this many new values
GRID_MARGIN_S = 0.002      # a read this close after the fitted refresh instant is still its
GRID_EARLY_SHARE = 0.25    # ...or this share of the read delays' spread, whichever is more
GRID_SPREAD = 0.6          # read delays spread over more than this share of T: not one grid
COARSE_MIN_S = 0.05        # samples refreshing faster than this shape the kernel well by themselves
PATTERN_WINDOWS = 8        # windows of samples the box pattern is fitted to
COVERAGE = 0.9             # share of refreshes seen for the chain of differences to hold
SUM_TOLERANCE = 0.5        # fitted boxes off their mean by more than this share: the model does not hold
BOXES_KEPT = 256
OFF_GRID_CHECKS = 4        # samples off the grid at this many checks, and never on it: fine samples


class RefreshGrid:
    """The refresh instants ref_t + k T of a stream whose new values are first seen at their
    refresh plus a read delay (>= 0): T from a least-squares fit over recent new-value times,
    ref_t from their lower envelope (the smallest delay)."""

    __slots__ = ("times", "period_s", "ref_t", "ref_k", "spread_s", "_adds")

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=GRID_TIMES)
        self.period_s: float | None = None
        self.ref_t = 0.0                  # a refresh instant, numbered ref_k
        self.ref_k = 0
        self.spread_s = 0.0               # how late after its refresh a new value was read, at most
        self._adds = 0

    def add(self, t: float) -> None:
        self.times.append(t)
        self._adds += 1
        if self._adds >= GRID_REFIT and len(self.times) >= GRID_REFIT:
            self._adds = 0
            self.fit(list(self.times))

    def index(self, t: float) -> int | None:
        """The latest refresh at or before t (None: no grid yet)."""
        if self.period_s is None:
            return None
        return self.ref_k + math.floor((t - self.ref_t + GRID_MARGIN_S) / self.period_s)

    def at(self, k: int) -> float:
        assert self.period_s is not None
        return self.ref_t + (k - self.ref_k) * self.period_s

    def fit(self, ts: list[float]) -> None:
        """Fit the grid to new-value times, oldest first (period_s None: they fit no grid)."""
        gaps = sorted(b - a for a, b in zip(ts, ts[1:]) if b > a)
        if len(gaps) < GRID_REFIT:
            return
        # One refresh: the gaps near the lower quartile (a value that did not change skips one).
        low = gaps[len(gaps) // 4]
        near = [g for g in gaps if abs(g - low) < 0.3 * low]
        guess = sum(near) / len(near)
        ks = [0]
        for a, b in zip(ts, ts[1:]):
            step = round((b - a) / guess)       # refreshes between two new values
            if step < 1:
                self.period_s = None            # two new values within one refresh: not a grid
                return
            ks.append(ks[-1] + step)
        k_mean, t_mean = sum(ks) / len(ks), sum(ts) / len(ts)
        var = sum((k - k_mean) ** 2 for k in ks)
        if var <= 0.0:
            return
        period = sum((k - k_mean) * (t - t_mean) for k, t in zip(ks, ts)) / var
        # The phase from the newest values (the lower envelope of their read delays), so a
        # period off by a few parts in 1e5 moves no index near the present.
        k_last = ks[-1]
        recent = [t - (k - k_last) * period for k, t in zip(ks[-GRID_REFIT:], ts[-GRID_REFIT:])]
        spread = max(t - k * period for k, t in zip(ks, ts)) - min(t - k * period for k, t in zip(ks, ts))
        if period <= 0.0 or spread > GRID_SPREAD * period:
            self.period_s = None
            return
        lo = min(recent)
        # Keep the refreshes' numbering across refits: index k names the same refresh.
        ref_k = 0 if self.period_s is None else self.ref_k + round((lo - self.ref_t) / self.period_s)
        self.period_s, self.ref_t, self.ref_k, self.spread_s = period, lo, ref_k, spread


class BoxPattern:
    """The boxes B_k of one GPU's trailing mean, fitted as described above."""

    __slots__ = ("samples", "mean_grid", "samples_on_grid", "window_s", "n", "means", "chain", "rings",
                 "last_k", "last_w", "done_k", "seen", "order", "offset_j", "valid", "sampled", "cap_j",
                 "off_grid_checks")

    def __init__(self, samples: InstantSamples) -> None:
        self.samples = samples
        self.mean_grid = RefreshGrid()
        self.samples_on_grid = False
        # Grid checks that found the samples off it, all of them so far (-1: they were on it once,
        # and the chain is kept from then on).
        self.off_grid_checks = 0
        self.window_s = 1.0
        self.n = 0
        self.means: dict[int, float] = {}      # M_k by refresh index (recent)
        self.chain: dict[int, float] = {}      # D_k: B_k less its pattern value (recent)
        self.rings: list[deque[float]] = []    # per residue k mod n: B_hat_k - D_k
        self.last_k: int | None = None
        self.last_w: float | None = None
        self.done_k: int | None = None         # the newest box whose chain value is set
        self.seen: deque[int] = deque()        # indices seen over the pattern's span (coverage)
        self.order: deque[int] = deque()       # indices kept, oldest first (to forget them)
        self.offset_j = 0.0                    # spread evenly: the boxes add up to w M
        self.valid = False
        self.sampled: deque[float] = deque()   # the samples' own box energies, recent
        self.cap_j = 0.0                       # no fitted box holds more than the samples ever showed

    def add_mean(self, t: float, mean_w: float, window_s: float) -> None:
        """A read of the mean (read-stamped streams repeat a value until it refreshes)."""
        grid = self.mean_grid
        changed = mean_w != self.last_w
        self.last_w = mean_w
        if changed:
            grid.add(t)                          # a refresh: the first read of a new value
        k = grid.index(t)
        if k is None or grid.period_s is None:
            self.valid = False
            return
        n = round(window_s / grid.period_s)
        if n < 2 or abs(n * grid.period_s - window_s) > 0.02 * window_s:
            self.valid = False
            return
        if n != self.n or window_s != self.window_s:
            self._restart(n, window_s)
        if not changed and k > (self.last_k if self.last_k is not None else k - 1) and \
                t - grid.at(k) < 2.0 * GRID_MARGIN_S:
            k -= 1            # too close to refresh k to say it came and left the value alone
        if self.last_k is not None and k <= self.last_k:
            if not changed:
                return                           # the same refresh, read again
            k = self.last_k + 1                  # a new value is a new refresh, whatever the fit says
        self.last_k = k
        self.means[k] = mean_w
        self.seen.append(k)
        while self.seen and self.seen[0] <= k - PATTERN_WINDOWS * n:
            self.seen.popleft()
        if k % GRID_REFIT == 0:
            self.samples_on_grid = self._samples_on_grid(t)
            if self.samples_on_grid:
                self.off_grid_checks = -1          # seen on the grid: the chain is kept for good
            elif self.off_grid_checks >= 0:
                self.off_grid_checks += 1
        if self.off_grid_checks < OFF_GRID_CHECKS:
            # Box k - 1 is complete once the sample at r_k can have come (read with M_k or before).
            self._close(k - 1)
        else:
            # Samples never seen on the mean's grid (an H100's 20 ms boxes) cannot put the model
            # in force: no chain is kept for them until they are (it was a sixth of a counter
            # GPU's ledger work per read).
            self.valid = False
        self.order.append(k)
        while self.order[0] < k - BOXES_KEPT:
            old = self.order.popleft()
            self.means.pop(old, None)
            self.chain.pop(old, None)

    def kernel(self, t: float, half: float) -> float | None:
        """The edge kernel at t from the fitted boxes, or None where the model is not in force
        (or a box it needs is missing)."""
        grid = self.mean_grid
        if not self._in_force() or grid.period_s is None:
            return None
        period = grid.period_s
        k_lo = grid.index(t - half)
        k_hi = grid.index(t + half)
        if k_lo is None or k_hi is None:
            return None
        w = 2.0 * half
        total = 0.0
        for k in range(k_lo + 1, k_hi + 2):
            box = self.box(k)
            if box is None:
                return None
            a, b = max(-half, grid.at(k - 1) - t), min(half, grid.at(k) - t)
            if b > a:
                total += box / period * (_prim(b, half, w) - _prim(a, half, w))
        return total

    def key(self, t: float, half: float) -> tuple:
        """What ``kernel(t, half)`` depends on, for a memo: whether the model is in force, and
        how many of the boxes it needs are closed (once all are, the value is settled)."""
        if not self._in_force() or self.done_k is None:
            return (False,)
        k_need = self.mean_grid.index(t + half)
        return (True, None if k_need is None else min(self.done_k, k_need + 1))

    def refresh_before(self, t: float) -> tuple[float, float] | None:
        """(r, M) of the newest refresh at or before t whose mean was read, dated on the grid
        (a read-stamped mean is up to a refresh older than its read)."""
        k = self.mean_grid.index(t)
        if k is None or k not in self.means:
            return None
        return self.mean_grid.at(k), self.means[k]

    def box(self, k: int) -> float | None:
        if k in self.chain and self.rings[k % self.n]:
            ring = self.rings[k % self.n]
            fitted = self.chain[k] + sum(ring) / len(ring) + self.offset_j
            return min(max(fitted, 0.0), self.cap_j)    # a broken chain never invents power
        sampled = self._sampled_box(k)
        if sampled is None and self.last_k is not None and k > self.last_k and self.samples:
            assert self.mean_grid.period_s is not None
            sampled = self.mean_grid.period_s * self.samples.last[1]   # not read yet: held
        return sampled

    def _in_force(self) -> bool:
        period = self.mean_grid.period_s
        if not self.valid or self.n == 0 or period is None or period < COARSE_MIN_S or not self.samples_on_grid:
            return False
        span = self.seen[-1] - self.seen[0] + 1 if self.seen else 0
        return span >= self.n and len(self.seen) >= COVERAGE * span

    def _samples_on_grid(self, t: float) -> bool:
        """Whether the instant samples refresh on the mean's grid: every new sample value was
        first read within the read delays the mean's own new values show (a point sample of a
        bursty load may hold one value for seconds, so its own grid cannot always be fitted)."""
        grid = self.mean_grid
        if grid.period_s is None:
            return False
        changes = _change_times(self.samples.between(t - GRID_TIMES * grid.period_s, t))
        if len(changes) < 4:
            return False
        # The fitted refresh instant is itself off by up to a fraction of the read delays'
        # spread: a value read a little before it is still on the grid (2 ms alone flagged one
        # such read in 30 and took the model out of force for seconds).
        margin = max(GRID_MARGIN_S, GRID_EARLY_SHARE * grid.spread_s)
        delays = [(c - grid.ref_t + margin) % grid.period_s - margin for c in changes]  # ref_t is a refresh
        return max(delays) <= max(grid.spread_s, COARSE_MIN_S * 0.1) + margin

    def _restart(self, n: int, window_s: float) -> None:
        self.n, self.window_s = n, window_s
        self.means.clear()
        self.chain.clear()
        self.rings = [deque(maxlen=PATTERN_WINDOWS) for _ in range(n)]
        self.last_k = self.done_k = None
        self.seen.clear()
        self.order.clear()
        self.sampled.clear()
        self.offset_j = 0.0

    def _close(self, k: int) -> None:
        if self.done_k is not None and k <= self.done_k:
            return
        self.done_k = k
        ring = self.rings[k % self.n]
        if k in self.means and k - 1 in self.means and k - self.n in self.chain:
            self.chain[k] = self.chain[k - self.n] + self.window_s * (self.means[k] - self.means[k - 1])
        else:
            self.chain[k] = 0.0                 # the chain restarts: so does its pattern
            ring.clear()
        sampled = self._sampled_box(k)
        if sampled is not None:
            ring.append(sampled - self.chain[k])
            self.sampled.append(sampled)
            if len(self.sampled) > PATTERN_WINDOWS * self.n:
                self.sampled.popleft()
            if k % self.n == 0:
                self.cap_j = 1.1 * max(self.sampled)
        self._check_sum(k)

    def _check_sum(self, k: int) -> None:
        """The n boxes ending at k add up to w M_k; their shortfall is spread evenly, and a
        large one means the data does not fit the model."""
        if k not in self.means:
            return
        parts = []
        for j in range(k - self.n + 1, k + 1):
            ring = self.rings[j % self.n]
            if j not in self.chain or not ring:
                return
            parts.append(self.chain[j] + sum(ring) / len(ring))
        target = self.window_s * self.means[k]
        short = target - sum(parts)
        self.offset_j = short / self.n
        self.valid = abs(short) <= SUM_TOLERANCE * max(target, 1e-9) + 1e-6 or target <= 0.0

    def _sampled_box(self, k: int) -> float | None:
        """The box's energy from the point samples alone: each dated at the refresh it was read
        after, the two around the box's middle interpolated there."""
        grid = self.mean_grid
        if grid.period_s is None:
            return None
        period = grid.period_s
        pts = self.samples.between(grid.at(k - 2), grid.at(k + 2))
        at: dict[int, float] = {}
        for ts, v in pts:
            j = grid.index(ts)
            if j is not None and j not in at:
                at[j] = v                        # the first read after refresh j has its value
        if k - 1 not in at or k not in at:
            return None
        return period * 0.5 * (at[k - 1] + at[k])


def _change_times(pts: list[tuple[float, float]]) -> list[float]:
    """When each new value was first read (a read-stamped stream repeats its value)."""
    return [tb for (_, va), (tb, vb) in zip(pts, pts[1:]) if vb != va]


def _prim(x: float, half: float, w: float) -> float:
    """The edge kernel's antiderivative, from -half."""
    if x <= 0.0:
        return -(half * (x + half) + 0.5 * (x * x - half * half)) / w
    return -(half * half * 0.5) / w + (half * x - 0.5 * x * x) / w
