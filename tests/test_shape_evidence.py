"""ShapeEvidence: a counter GPU's shaping reading must follow the counter's own short spans."""
from __future__ import annotations

import random

import pytest

from wattmeter.clock import VirtualClock
from wattmeter.meter import Meter
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sensors.power_evidence import ShapeEvidence
from wattmeter.sim.fake_nvml import FakeNVML, build_module
from wattmeter.sim.scenario import Scenario

H100 = "NVIDIA H100 80GB HBM3"


def square_w(t: float) -> float:
    return 650.0 if (t % 0.2) < 0.1 else 90.0


def feed(ev: ShapeEvidence, reading, t_end: float, read_gap_s: float = 0.005) -> None:
    """Counter points every 100 ms (a 200 ms square's halves), samples every ``read_gap_s``."""
    t, energy, next_point = 0.0, 0.0, 0.1
    while t < t_end:
        t_next = t + read_gap_s
        energy += square_w(t) * read_gap_s
        t = t_next
        ev.add_sample(t, reading(t))
        if t >= next_point - 1e-9:
            ev.add_counter(t, energy)
            next_point += 0.1


def test_a_reading_that_never_moves_while_the_counter_swings_is_contradicted():
    ev = ShapeEvidence()
    feed(ev, lambda t: 370.0, 5.0)          # a 1 s mean of the square: flat
    assert ev.verdict is False and ev.contradicted


def test_a_reading_that_tracks_the_power_follows_the_counter():
    ev = ShapeEvidence()
    feed(ev, lambda t: square_w(t - 0.005), 5.0)   # each value the power since the read before
    assert ev.verdict is True and not ev.contradicted


def test_sparse_reads_teach_nothing_either_way():
    # A 20 ms box read at 10 Hz stands for 100 ms: it cannot judge a 100 ms span.
    ev = ShapeEvidence()
    feed(ev, lambda t: 370.0, 5.0, read_gap_s=0.1)
    assert ev.verdict is None and ev.spans == 0


def test_a_steady_load_teaches_nothing():
    ev = ShapeEvidence()
    t, energy = 0.0, 0.0
    for _ in range(100):
        t += 0.1
        energy += 400.0 * 0.1
        for k in range(20):
            ev.add_sample(t - 0.1 + 0.005 * (k + 1), 123.0)   # even a wrong value
        ev.add_counter(t, energy)
    assert ev.verdict is None


def test_a_counter_gpu_whose_get_power_usage_is_a_1s_mean_is_read_on_its_own_steps():
    # No field 186; GetPowerUsage is a 1 s trailing mean (Ampere and newer), so on a 200 ms
    # square it reads ~370 W flat. Trusted to shape the counter's spans (read sparsely, pairs
    # every few seconds), it put 1.5 s jobs ~5 % off; judged against the counter's own spans
    # it shapes nothing, the counter is read at every tick and each job is within 0.5 %.
    from vdrive import VirtualDriver

    clock = VirtualClock(start=0.0)
    fake = FakeNVML(Scenario.from_dict({"gpu": [{
        "model": H100,
        "trace": {"kind": "square", "high_w": 650.0, "low_w": 90.0, "high_s": 0.1, "low_s": 0.1, "phase_s": 0.013},
        "sensor": {"energy_counter": True, "instant_field": False, "counter_phase_s": 0.013}}]}), clock, t0=0.0)
    sensor = NvmlSensor(build_module(fake), GpuSelection(None), wall=clock.wall, clock=clock, seed=1)
    meter = Meter([sensor], clock=clock)
    drive = VirtualDriver(meter, clock, seed=1)
    drive.run_until(6.0)
    rng = random.Random(5)
    for _ in range(6):
        drive.run_until(clock.now() + rng.uniform(0.5, 2.5))
        t0 = clock.now()
        w = meter.window("job")
        drive.run_until(t0 + 1.5)
        t1 = clock.now()
        w.end()
        drive.run_until(t1 + 1.0)
        got = w.result().component_energy_j("gpu")
        assert got == pytest.approx(fake.true_energy_j(0, t0, t1), rel=0.005)
    ref = sensor.references()["gpu0"]
    assert ref.reference == "counter" and "does not follow the counter" in ref.instant
    meter.close()
