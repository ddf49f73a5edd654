"""When a GPU's power holds still, it is read less often.

At the default cadence a GPU is read about ten times a second (every 20 ms field-186 value, where
it has no counter), so the live tail of E(t) and the edges of windows follow a bursty load. A GPU
whose power holds still gains nothing from that: an idle GPU, or one under a steady load, shows
the same energy read every few hundred milliseconds, for a fraction of the CPU (8 GPUs read at
every field value cost ~4 % of a core). Whether it holds still is judged from the data alone:

- every instant sample for QUIET_SPAN_S lay within a band (QUIET_BAND_W, or QUIET_BAND_SHARE of
  the level, whichever is wider: a real GPU's power wobbles by a few watts when idle), and
- every reference value meanwhile (the 1 s trailing mean, or a counter span's average power)
  lay in that band too. Sparse samples of a square load can all land on one level; its mean
  never does, so a bursty load is never taken for a quiet one.

A quiet GPU is read every QUIET_PERIOD_S, jittered (0.5-1.5 x), until one sample or reference
leaves the band; edges waiting on windows are read fast as before. A GPU whose energy rests on
a trailing mean (no counter) is read every QUIET_MEAN_PERIOD_S instead: E(t) is rebuilt from
each refresh of the mean (~100 ms), and read every 0.3 s, each job start and end on an idling
GPU left 5-8 J that never came back (bench_exported's idle_jobs load), and only where the
mean's timestamps are refresh times: a read-stamped mean is dated at the read, and the sparse,
irregular dates of quiet reads threw its refresh grid off for the next job (5 s differences
off by up to 350 J, where every value read kept them within 75 J). What a change costs the
live tail while quiet: it is seen up to 1.5 periods late. Quiet reads do not teach the refresh
period learners (``learning``): their spacing is the quiet period, not the sensor's.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

QUIET_SPAN_S = 5.0          # power held within the band this long...
QUIET_PERIOD_S = 0.3        # ...then the GPU is read about this often (jittered 0.5-1.5 x)
QUIET_MEAN_PERIOD_S = 0.1   # ...or this often where its energy rests on a trailing mean
QUIET_BAND_W = 10.0         # the band: this many watts wide...
QUIET_BAND_SHARE = 0.05     # ...or this share of the level, whichever is wider
REFERENCE_SPAN_MIN_S = 0.5  # counter spans this long or longer give a reference power
QUIET_EARLY_S = 0.001       # a reader may wake this much before a quiet read is due
LEARN_GAP_S = 0.02          # reads this close follow each other at the sensor's own fast cadence


@dataclass
class QuietEvidence:
    """Whether one GPU's power has held still (see the module docstring)."""

    period_s: float = QUIET_PERIOD_S  # how often it is read while quiet
    since_t: float | None = None     # every sample since then lay within [lo_w, hi_w]
    lo_w: float = 0.0
    hi_w: float = 0.0
    engaged: bool = False            # quiet at its latest read: read at the quiet schedule now
    last_read_t: float = -math.inf
    _counter: tuple[float, float] | None = None   # the counter's last point (t, J), for span powers

    def add_sample(self, t: float, power_w: float) -> None:
        """An instant sample: it widens the band, or breaks it and starts a new one."""
        if self.since_t is not None:
            lo, hi = min(self.lo_w, power_w), max(self.hi_w, power_w)
            if hi - lo <= _band_w(0.5 * (lo + hi)):
                self.lo_w, self.hi_w = lo, hi
                return
        self.since_t, self.lo_w, self.hi_w = t, power_w, power_w
        self.engaged = False

    def add_reference(self, power_w: float) -> None:
        """A reference power (a trailing mean, a counter span's average): outside the band,
        the samples did not see the load as it was."""
        if self.since_t is None:
            return
        mid = 0.5 * (self.lo_w + self.hi_w)
        if abs(power_w - mid) > _band_w(mid):
            self.since_t = None
            self.engaged = False

    def add_counter(self, t: float, energy_j: float) -> None:
        """A dated counter point: the average power since the one before is a reference."""
        last = self._counter
        if last is not None and t - last[0] < REFERENCE_SPAN_MIN_S:
            return
        if last is not None and energy_j >= last[1]:
            self.add_reference((energy_j - last[1]) / (t - last[0]))
        self._counter = (t, energy_j)

    def quiet(self, now: float) -> bool:
        return self.since_t is not None and now - self.since_t >= QUIET_SPAN_S

    def learning(self, now: float) -> bool:
        """Whether the read at ``now`` follows the one before at the sensor's own spacing, not
        the quiet schedule's, so its values may teach refresh periods (asked before the read).
        Fast reads near an edge, LEARN_GAP_S apart at most, still do on a quiet GPU."""
        return not self.engaged or now - self.last_read_t <= LEARN_GAP_S

    def read(self, now: float, allowed: bool = True) -> None:
        """After a read of this GPU at ``now`` (``allowed``: whether its reader may go quiet now)."""
        self.engaged = allowed and self.quiet(now)
        self.last_read_t = now

    def waits(self, schedule: "QuietSchedule", now: float) -> bool:
        """Quiet, and the next quiet read is not due yet."""
        return self.engaged and not schedule.due(now)


@dataclass
class QuietSchedule:
    """When a sensor's quiet GPUs are read: all together (read apart, 8 GPUs each at its own
    jittered time woke the reader as often as before), every QUIET_PERIOD_S jittered."""

    rng: random.Random = field(default_factory=random.Random)
    next_t: float = -math.inf

    @property
    def due_t(self) -> float:
        return self.next_t - QUIET_EARLY_S

    def due(self, now: float) -> bool:
        return now >= self.due_t

    def read(self, now: float, period_s: float) -> None:
        """Quiet GPUs were read at ``now``: the next quiet read is a jittered ``period_s`` on."""
        self.next_t = now + period_s * (0.5 + self.rng.random())


def _band_w(level_w: float) -> float:
    return max(QUIET_BAND_W, QUIET_BAND_SHARE * abs(level_w))
