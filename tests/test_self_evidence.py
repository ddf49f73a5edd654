"""SelfEvidence: telling a 1 s trailing mean from an instant sample by a power stream's own motion
(a GPU with neither an energy counter nor power fields, e.g. A100: GetPowerUsage only)."""
from __future__ import annotations

import random

import pytest

from wattmeter.sensors.power_evidence import SelfEvidence

PERIOD_S = 0.1


def step_w(t: float) -> float:
    return 100.0 if t < 5.0 else 500.0


def trailing_mean_w(power, t: float, n: int = 100) -> float:
    return sum(power(t - (i + 0.5) / n) for i in range(n)) / n


def feed(ev: SelfEvidence, power, t0: float, t1: float):
    t, verdicts = t0, []
    while t < t1:
        verdicts.append(ev.add(t, power(t)))
        t += PERIOD_S
    return verdicts


def test_a_mean_walks_a_load_step_in_about_a_second():
    ev = SelfEvidence()
    verdicts = feed(ev, lambda t: trailing_mean_w(step_w, t), 2.0, 8.0)
    assert verdicts[-1] is True
    # Decided during the step's second, not before it.
    assert verdicts[int((5.0 - 2.0) / PERIOD_S)] is None


def test_an_instant_sample_jumps_the_step():
    ev = SelfEvidence()
    assert feed(ev, step_w, 2.0, 8.0)[-1] is False


def test_a_slow_ramp_fits_both_models_and_teaches_nothing():
    # An instant sample of a 20 s ramp 150 -> 650 W moves 2.5 W per read: it must not pass for
    # a mean (the sensor would then spread each caught spike over a second).
    ev = SelfEvidence()
    verdicts = feed(ev, lambda t: 150.0 + 25.0 * t, 0.0, 19.0)
    assert set(verdicts) == {None}


def test_one_caught_spike_settles_instant_for_good():
    ev = SelfEvidence()
    ramp = lambda t: 150.0 + 25.0 * t
    feed(ev, ramp, 0.0, 3.0)
    ev.add(3.0, 950.0)                            # a 30 ms spike to 950 W, caught by one read
    verdicts = feed(ev, ramp, 3.1, 19.0)
    assert verdicts[5] is False                   # judged once half a second of reads follows it
    assert set(verdicts[5:]) == {False}


def test_a_mean_of_short_spikes_is_no_jump():
    # A 30 ms spike to 950 W moves a 1 s mean by ~24 W for a second: a few % of the mean.
    def spiky(t: float) -> float:
        return 950.0 if (t % 0.8) < 0.03 else 150.0 + 25.0 * t
    ev = SelfEvidence()
    mean = lambda t: trailing_mean_w(spiky, t, n=1000)
    assert False not in feed(ev, mean, 1.0, 15.0)
    assert set(feed(ev, lambda t: mean(t) + (0.0 if t < 16.0 else 300.0 * min(1.0, t - 16.0)), 15.0, 19.0)) <= {None, True}
    assert ev.verdict is True                     # a 300 W step walked over a second


def test_a_mean_verdict_is_overturned_by_a_jump():
    ev = SelfEvidence()
    feed(ev, lambda t: trailing_mean_w(step_w, t), 2.0, 8.0)
    assert ev.verdict is True
    verdicts = feed(ev, lambda t: 100.0, 8.0, 9.0)   # 500 -> 100 W between two reads: not a 1 s mean
    assert verdicts[0] is True
    assert verdicts[-1] is False


def test_a_jump_across_a_gap_in_the_reads_proves_nothing():
    ev = SelfEvidence()
    mean = lambda t: trailing_mean_w(step_w, t)
    feed(ev, mean, 2.0, 4.0)
    assert ev.add(6.5, mean(6.5)) is None         # 2.5 s without reads (a stalled sampler)
    assert ev.verdict is None


def test_sensor_verdicts_on_gpus_with_only_getpowerusage():
    from vdrive import VirtualDriver
    from wattmeter.clock import VirtualClock
    from wattmeter.meter import Meter
    from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
    from wattmeter.sim.fake_nvml import FakeNVML, build_module
    from wattmeter.sim.scenario import Scenario

    a100, steps = "NVIDIA A100-SXM4-40GB", {"kind": "square", "high_w": 500.0, "low_w": 100.0, "high_s": 3.0, "low_s": 3.0}
    only = {"energy_counter": False, "instant_field": False}
    clock = VirtualClock(start=0.0)
    fake = FakeNVML(Scenario.from_dict({"gpu": [
        {"model": a100, "trace": steps, "sensor": {**only, "power_usage": "average_1s"}},
        {"model": a100, "trace": steps, "sensor": {**only, "power_usage": "instant"}},
        {"model": a100, "trace": {"kind": "ramp", "from_w": 150.0, "to_w": 650.0, "over_s": 20.0},
         "sensor": {**only, "power_usage": "instant"}},
    ]}), clock, t0=0.0)
    sensor = NvmlSensor(build_module(fake), GpuSelection(None), wall=clock.wall, clock=clock, seed=2)
    meter = Meter([sensor], clock=clock)
    meter.start()
    drive = VirtualDriver(meter, clock, seed=3)
    drive.run_until(10.0)
    refs = sensor.references()
    assert refs["gpu0"].reference == "trailing_mean" and "moves like a 1 s mean" in refs["gpu0"].reason
    assert refs["gpu1"].reference == "instant" and "jumps with the load" in refs["gpu1"].reason
    assert refs["gpu2"].reference == "instant" and "no load change" in refs["gpu2"].reason
    # On its trailing-mean reference the averaged GPU's energy over two whole steps is right.
    w = meter.window("two steps")
    drive.run_until(22.0)
    w.end()
    drive.run_until(25.0)
    truth = fake.true_energy_j(0, w.start_t, 22.0)
    got = meter.ledger.energy_at("gpu0", 22.0) - meter.ledger.energy_at("gpu0", w.start_t)
    assert got == pytest.approx(truth, rel=0.01)


def test_field_185_on_a_slow_ramp_with_caught_spikes_stays_a_mean():
    # A 1 s mean of a slow ramp sits near the latest sample, and a sample that caught a 30 ms
    # spike inflates the samples' own mean: where the two models predict about the same value,
    # nothing is learnt (this had flipped field 185 to "instant" for seconds at a time).
    from wattmeter.sensors.power_evidence import MeanEvidence

    rng = random.Random(8)
    spikes, t = [], 0.0
    while t < 20.0:
        t += rng.uniform(0.3, 1.2)
        spikes.append(t)

    def spiky(x: float) -> float:
        return 950.0 if any(s <= x < s + 0.03 for s in spikes) else 150.0 + 25.0 * x

    for seed in range(3):
        ev = MeanEvidence()
        verdicts, t = [], 0.0
        jitter = random.Random(seed)
        while t < 18.0:
            refresh = 0.013 + int((t - 0.013) // 0.1) * 0.1
            ev.add_instant(t, spiky(refresh))                   # a 100 ms point sample, read at t
            if t >= 1.0:
                verdicts.append(ev.add_candidate(t, trailing_mean_w(spiky, refresh, n=2000)))
            t += 0.025 * jitter.uniform(0.6, 1.4)
        assert False not in verdicts


def test_an_instant_candidate_is_told_apart_by_a_step():
    from wattmeter.sensors.power_evidence import MeanEvidence
    ev = MeanEvidence()
    verdicts = []
    t = 0.0
    while t < 20.0:
        w = 100.0 if int(t // 2) % 2 == 0 else 500.0           # 2 s steps
        ev.add_instant(t, w)
        verdicts.append(ev.add_candidate(t, w))                 # GetPowerUsage instant: the same value
        t = round(t + 0.025, 3)
    assert verdicts[-1] is False
