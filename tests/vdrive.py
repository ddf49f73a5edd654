"""Drive a Meter's sensors in virtual time the way the sampler's reader threads would.

Each sensor is read on its jittered cadence, at the times it asks for (``next_read_at``) and
fast while an edge waits or it calibrates; the clock jumps straight to the next read. Tests
of the NVML path then see the same read pattern as a live meter, deterministically.
"""
from __future__ import annotations

import random

from wattmeter.clock import VirtualClock
from wattmeter.meter import Meter
from wattmeter.sampler import FAST_PERIOD_S


class VirtualDriver:
    def __init__(self, meter: Meter, clock: VirtualClock, seed: int = 1) -> None:
        self.meter, self.clock = meter, clock
        self.rng = random.Random(seed)
        now = clock.now()
        self.state = {}
        for s in meter.sensors:
            self.state[s.name] = {"slot": now, "due": now + self.rng.random() * s.period_s, "last": -1e18}

    def _next(self, s, now: float) -> tuple[float, bool]:
        st = self.state[s.name]
        fast = self.meter.sampler.wants_fast(s, now)
        target = min(st["due"], st["last"] + FAST_PERIOD_S * (0.5 + self.rng.random())) if fast else st["due"]
        wish = self.meter.sampler.cadence(s).next_read_at(now)
        if wish is not None and wish < target:
            target = max(wish, st["last"] + 0.001)
        return max(target, now), fast

    def run_until(self, t_end: float) -> None:
        sampler = self.meter.sampler
        while True:
            now = self.clock.now()
            plans = [(self._next(s, now), s) for s in self.meter.sensors]
            (target, fast), s = min(plans, key=lambda p: p[0][0])
            if target > t_end:
                self.clock.advance(max(0.0, t_end - now))
                return
            self.clock.advance(target - now)
            now = self.clock.now()
            st = self.state[s.name]
            st["last"] = now
            sampler.read_sensor(s, now, fast)
            if now >= st["due"]:
                st["slot"] += s.period_s
                st["due"] = st["slot"] + self.rng.random() * s.period_s
                if st["due"] < now:
                    st["slot"] = now
                    st["due"] = now + self.rng.random() * s.period_s



def window_jobs(meter: Meter, drive: VirtualDriver, fake, *, jobs: int, rng: random.Random,
                start_s: float = 6.0, duration_s: float = 1.5, gpu: int = 0) -> list[tuple[float, bool]]:
    """After ``start_s`` of reads, ``jobs`` windows of ``duration_s`` at random gaps (0.5-2.5 s),
    each read on until its end edge is covered (at most 5 s, as ``result()`` waits on a live
    meter): (relative GPU error over the true window, flagged approximate)."""
    clock = drive.clock
    drive.run_until(start_s)
    out = []
    for _ in range(jobs):
        drive.run_until(clock.now() + rng.uniform(0.5, 2.5))
        t0 = clock.now()
        w = meter.window("job")
        drive.run_until(t0 + duration_s)
        t1 = clock.now()
        w.end()
        while meter.ledger.pending_marks() and clock.now() < t1 + 5.0:
            drive.run_until(clock.now() + 0.1)
        r = w.result()
        out.append((r.component_energy_j("gpu") / fake.true_energy_j(gpu, t0, t1) - 1.0, bool(r.approximate)))
    return out


def jittered_square(period_s: float, t_end: float, seed: int):
    """A 650/90 W square wave, each half period jittered +-20 % (a training step's compute and
    data phases), as the fake's StepsTrace."""
    from wattmeter.sim.traces import StepsTrace

    rng = random.Random(seed)
    steps, t, high = [], 0.0, True
    while t < t_end:
        steps.append((t, 650.0 if high else 90.0))
        t += 0.5 * period_s * rng.uniform(0.8, 1.2)
        high = not high
    return StepsTrace(steps)
