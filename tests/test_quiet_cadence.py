"""A GPU whose power holds still is read less often (sensors/quiet.py), and nothing measured moves."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
from vdrive import VirtualDriver, jittered_square

from wattmeter.clock import VirtualClock
from wattmeter.meter import Meter
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sensors.quiet import QUIET_SPAN_S, QuietEvidence, QuietSchedule
from wattmeter.sim.fake_nvml import FakeNVML, build_module
from wattmeter.sim.scenario import Scenario
from wattmeter.sim.traces import StepsTrace

H100 = "NVIDIA H100 80GB HBM3"
BOX = {"energy_counter": False, "instant_kind": "box", "instant_refresh_s": 0.02, "field_timestamp": "refresh"}
SAMPLE = {"energy_counter": False, "instant_kind": "sample", "instant_refresh_s": 0.1, "field_timestamp": "read"}


def idle(t_end: float, seed: int = 1, level_w: float = 90.0) -> StepsTrace:
    """An idle board: its draw wobbling +-2 W every 0.2-0.6 s."""
    rng = random.Random(seed)
    pts, t = [], -1.0
    while t < t_end:
        pts.append((t, level_w + rng.uniform(-2.0, 2.0)))
        t += rng.uniform(0.2, 0.6)
    return StepsTrace(pts)


def idle_then_jobs(t_end: float, seed: int = 3) -> StepsTrace:
    """Idle 8-20 s, then a 5-15 s job (a 400 ms 650/90 W square), repeated."""
    rng = random.Random(seed)
    pts, t = [(-1.0, 90.0)], 0.0
    while t < t_end:
        t += rng.uniform(8.0, 20.0)
        end = t + rng.uniform(5.0, 15.0)
        job = [p for p in jittered_square(0.4, end - t, rng.randrange(1000)).points if p[0] > 0.0]
        pts += [(t, 650.0), *((t + a, w) for a, w in job if t + a < end), (end, 90.0)]
        t = end
    return StepsTrace(pts)


def meter_on(trace, sensor: dict | None = None, seed: int = 2):
    scen = Scenario.from_dict({"seed": 3, "gpu": [{"model": H100, "sensor": sensor or {}}]})
    scen = replace(scen, gpus=(replace(scen.gpus[0], trace=trace),))
    clock = VirtualClock(start=0.0)
    fake = FakeNVML(scen, clock, t0=0.0)
    nvml = build_module(fake)
    calls = []
    real = nvml.nvmlDeviceGetFieldValues
    nvml.nvmlDeviceGetFieldValues = lambda *a: (calls.append(clock.now()), real(*a))[1]
    sensor_ = NvmlSensor(nvml, GpuSelection(None), wall=clock.wall, clock=clock, seed=seed)
    meter = Meter([sensor_], clock=clock)
    return clock, fake, meter, sensor_, calls, VirtualDriver(meter, clock, seed=seed)


def field_reads_per_s(calls: list[float], t0: float, t1: float) -> float:
    return sum(1 for t in calls if t0 <= t < t1) / (t1 - t0)


def test_power_in_a_band_for_the_span_is_quiet_and_one_sample_or_reference_outside_ends_it():
    q = QuietEvidence()
    for k in range(60):
        q.add_sample(0.1 * k, 300.0 + (4.0 if k % 2 else -4.0))     # +-4 W: within the band
    assert q.quiet(5.9) and not q.quiet(4.9)
    q.add_reference(303.0)                                          # the mean agrees
    assert q.quiet(6.0)
    q.add_sample(6.0, 340.0)                                        # a step: a new band from here
    assert not q.quiet(6.1) and q.quiet(6.0 + QUIET_SPAN_S)
    q.add_reference(250.0)                                          # the mean says the samples missed the load
    assert not q.quiet(20.0)
    # A counter's span is a reference too: 2 s at 300 W, then 2 s at 450 W on average.
    q = QuietEvidence()
    for k in range(80):
        q.add_sample(0.1 * k, 300.0)
    q.add_counter(4.0, 1000.0)
    q.add_counter(6.0, 1600.0)
    assert q.quiet(8.0)
    q.add_counter(8.0, 2500.0)
    assert not q.quiet(8.0)


def test_quiet_gpus_are_read_together_on_one_jittered_schedule():
    sched = QuietSchedule(random.Random(1))
    gaps = []
    t = 0.0
    for _ in range(200):
        sched.read(t, 0.3)
        gaps.append(sched.next_t - t)
        t = sched.next_t
    assert 0.15 <= min(gaps) and max(gaps) <= 0.45 and 0.28 < sum(gaps) / len(gaps) < 0.32


@pytest.mark.parametrize("sensor, busy_hz, quiet_hz", [
    ({}, 6.0, 4.5),                 # a counter GPU: field 186 at ~7 Hz, then every ~0.3 s
    (BOX, 40.0, 11.0),              # no counter, refresh-stamped mean: every 20 ms value, then ~10 Hz
])
def test_an_idle_gpu_is_read_less_often_and_a_busy_one_as_before(sensor, busy_hz, quiet_hz):
    clock, fake, meter, s, calls, drive = meter_on(idle(80.0), sensor)
    drive.run_until(20.0)
    assert field_reads_per_s(calls, 10.0, 20.0) < quiet_hz
    assert s._gpus[0].reader is None or s._gpus[0].reader.quiet.engaged
    clock, fake, meter, s, calls, drive = meter_on(jittered_square(0.4, 80.0, 5), sensor)
    drive.run_until(20.0)
    assert field_reads_per_s(calls, 10.0, 20.0) > busy_hz
    assert not any((g.reader or g.power).quiet.engaged for g in s._gpus)


def test_a_read_stamped_mean_never_goes_quiet():
    # Dated at each read, its refresh grid came out of the quiet reads' irregular spacing wrong
    # (sensors/quiet.py): such a GPU is read at every value, idle or not.
    clock, fake, meter, s, calls, drive = meter_on(idle(40.0), SAMPLE)
    drive.run_until(20.0)
    assert not s._gpus[0].power.quiet.engaged
    assert field_reads_per_s(calls, 10.0, 20.0) > 30.0


@pytest.mark.parametrize("sensor", [{}, BOX])
def test_windows_and_totals_across_idle_and_jobs_hold_with_quiet_reads(sensor):
    clock, fake, meter, s, calls, drive = meter_on(idle_then_jobs(130.0), sensor)
    drive.run_until(10.0)
    rng = random.Random(4)
    scrapes, errors = [], []
    t_last_window, went_quiet = 0.0, False
    while clock.now() < 120.0:
        drive.run_until(clock.now() + 0.25 + 0.5 * rng.random())
        t = clock.now()
        scrapes.append(meter.ledger.snapshot(t)["gpu0"].energy_j)
        went_quiet = went_quiet or any((g.reader or g.power).quiet.engaged for g in s._gpus)
        if t - t_last_window > 9.0:            # an 8 s window now and then: across transitions too
            t_last_window = t
            w = meter.window("job")
            drive.run_until(t + 8.0)
            t1 = clock.now()
            w.end()
            while meter.ledger.pending_marks() and clock.now() < t1 + 5.0:
                drive.run_until(clock.now() + 0.1)
            truth = fake.true_energy_j(0, t, t1)
            errors.append(w.result().component_energy_j("gpu") / truth - 1.0)
    assert went_quiet
    assert all(b >= a for a, b in zip(scrapes, scrapes[1:]))          # the exported total never falls
    assert max(abs(e) for e in errors) < 0.01, errors


def test_quiet_reads_do_not_teach_a_refresh_period():
    # 30 s idle (quiet), then a job: a power-only GPU still reads each 20 ms value once.
    trace = StepsTrace([*idle(40.0).points, (40.0, 650.0), (40.2, 90.0), (40.4, 650.0), (60.0, 90.0)])
    clock, fake, meter, s, calls, drive = meter_on(trace, BOX)
    drive.run_until(39.0)
    p = s._gpus[0].power
    assert p.quiet.engaged
    assert p.instant.refresh_s == pytest.approx(0.02, abs=0.002)
    drive.run_until(45.0)
    assert not p.quiet.engaged and p.instant.refresh_s == pytest.approx(0.02, abs=0.002)
    assert field_reads_per_s(calls, 42.0, 45.0) > 40.0


def test_a_quiet_power_only_gpu_follows_its_fields_again_while_an_edge_waits():
    # The mean that resolves an edge comes ~0.6 s on; read every ~0.1 s, it often came after
    # result()'s wait and the window was flagged approximate (sensors/nvml.py, fast_edges).
    clock, fake, meter, s, calls, drive = meter_on(idle(40.0), BOX)
    drive.run_until(20.0)
    assert s._gpus[0].power.quiet.engaged and s.fast_edges
    assert field_reads_per_s(calls, 18.0, 20.0) < 11.0
    w = meter.window("job")
    drive.run_until(20.4)
    assert field_reads_per_s(calls, 20.0, 20.4) > 40.0          # every 20 ms value, as when busy
    w.end()
    while meter.ledger.pending_marks() and clock.now() < 26.0:
        drive.run_until(clock.now() + 0.1)
    r = w.result()
    assert not r.approximate
    assert r.component_energy_j("gpu") == pytest.approx(fake.true_energy_j(0, 20.0, 20.4), rel=0.005)
