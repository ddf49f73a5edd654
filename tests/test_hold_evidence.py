"""HoldEvidence: telling a refresh-stamped field 186 that is a box (the mean power over the period
before its stamp, an H100's 20 ms boxes) from one that is a point sample (the power at its stamp),
by which hold predicts the 1 s trailing mean; and a GPU with no counter whose 100 ms field 186 is
a point sample, metered on it."""
from __future__ import annotations

import random
from collections import deque
from dataclasses import replace

from wattmeter.clock import VirtualClock
from wattmeter.meter import Meter
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sensors.power_evidence import HoldEvidence
from wattmeter.sim.fake_nvml import FakeNVML, build_module
from wattmeter.sim.scenario import Scenario

from vdrive import VirtualDriver, jittered_square, window_jobs

REFRESH_S = 0.1


def judged(kind: str, trace, seconds: float = 30.0) -> str | None:
    """Feed HoldEvidence a 100 ms field 186 of ``kind`` ("box" or "point") and the trailing 1 s
    mean refreshed on its own grid, both dated at their refresh."""
    samples: deque[tuple[float, float]] = deque()
    ev = HoldEvidence(samples)
    step = 0.001
    grid = [round(i * step, 6) for i in range(int(seconds / step) + 1)]
    cum = [0.0]
    for a, b in zip(grid, grid[1:]):
        cum.append(cum[-1] + trace.power_w(0.5 * (a + b)) * step)

    def energy(t: float) -> float:
        return cum[min(len(cum) - 1, max(0, int(round(t / step))))]

    for k in range(int(1.0 / REFRESH_S) + 1, int(seconds / REFRESH_S)):
        r = k * REFRESH_S
        value = (energy(r) - energy(r - REFRESH_S)) / REFRESH_S if kind == "box" else trace.power_w(r)
        samples.append((r, value))
        mean_t = r - 0.037                    # the mean refreshes on its own grid
        ev.add_mean(mean_t, energy(mean_t) - energy(mean_t - 1.0), REFRESH_S)
    return ev.verdict


def test_point_samples_are_told_from_boxes_by_the_trailing_mean():
    trace = jittered_square(0.4, 40.0, seed=3)
    assert judged("point", trace) == "point"
    assert judged("box", trace) == "box"


def test_a_steady_load_leaves_the_hold_unjudged():
    class Steady:
        @staticmethod
        def power_w(t: float) -> float:
            return 300.0
    assert judged("point", Steady) is None


def test_a_gpu_without_a_counter_meters_jobs_on_its_100_ms_point_samples():
    # Field 186 a 100 ms point sample stamped at its refresh, held back as a box: every edge
    # moved 50 ms early, and 1.5 s jobs under a jittered 1 s square read ~7 % off (p90). Once
    # the evidence says point samples, each is the trapezoid's: within a few per cent.
    sensor = {"energy_counter": False, "instant_kind": "sample", "instant_refresh_s": REFRESH_S,
              "field_timestamp": "refresh"}
    scen = Scenario.from_dict({"seed": 3, "gpu": [{"model": "NVIDIA H100 80GB HBM3", "sensor": sensor}]})
    scen = replace(scen, gpus=(replace(scen.gpus[0], trace=jittered_square(1.0, 300.0, seed=5)),))
    clock = VirtualClock(start=0.0)
    fake = FakeNVML(scen, clock, t0=0.0)
    nvml = NvmlSensor(build_module(fake), GpuSelection(None), wall=clock.wall, clock=clock, seed=2)
    meter = Meter([nvml], clock=clock)
    results = window_jobs(meter, VirtualDriver(meter, clock, seed=2), fake, jobs=12, rng=random.Random(2),
                          start_s=40.0, duration_s=1.5)
    errors = sorted(abs(err) for err, _ in results)
    assert errors[int(0.9 * (len(errors) - 1) + 0.5)] < 0.04, errors
    assert "point samples" in nvml.references()["gpu0"].describe()
    meter.close()
