"""Counters that refresh every 20, 50 or 200 ms (not the 100 ms measured on H100s) meter a job
as well as a 100 ms one: the sensor measures the period from its reads (sensors/refresh_period.py).
Before, steady 400 W jobs of 1.5 s read up to +-6 % on them. Counters that refresh every few ms,
or are computed at each call, are dated at their reads (sensors/refresh.py, ``current_within_s``)."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from wattmeter.clock import VirtualClock
from wattmeter.meter import Meter
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sim.fake_nvml import FakeNVML, build_module
from wattmeter.sim.scenario import Scenario

from vdrive import VirtualDriver, jittered_square, window_jobs

H100 = "NVIDIA H100 80GB HBM3"


def job_errors(refresh_s: float, jobs: int = 6, seed: int = 1, jitter_s: float = 0.0,
               duration_s: float = 1.5) -> list[float]:
    clock = VirtualClock(start=0.0)
    data = {"seed": 3, "gpu": [{"model": H100, "trace": {"kind": "constant", "power_w": 400.0},
                                "sensor": {"counter_refresh_s": refresh_s, "counter_phase_s": min(0.013, 0.5 * refresh_s),
                                           "counter_jitter_s": jitter_s},
                                "energy_offset_j": 5e6}]}
    fake = FakeNVML(Scenario.from_dict(data), clock, t0=0.0)
    sensor = NvmlSensor(build_module(fake), GpuSelection(None), wall=clock.wall, clock=clock, seed=seed)
    meter = Meter([sensor], clock=clock)
    results = window_jobs(meter, VirtualDriver(meter, clock, seed=seed), fake, jobs=jobs,
                          rng=random.Random(seed), duration_s=duration_s)
    meter.close()
    return [err for err, _ in results]


@pytest.mark.parametrize("refresh_s", [0.02, 0.05, 0.2])
def test_a_steady_job_on_a_counter_with_another_refresh_period_is_metered_to_a_percent_or_two(refresh_s):
    errors = sorted(abs(e) for e in job_errors(refresh_s))
    assert errors[len(errors) // 2] < 0.005 and errors[-1] < 0.02, errors   # was up to 6 %


@pytest.mark.parametrize("refresh_s", [0.001, 0.003])
def test_a_counter_that_refreshes_every_few_ms_is_metered_as_exactly_as_a_100_ms_one(refresh_s):
    # As a simulation that computes the counter at each call would: dated on a 100 ms grid,
    # steady 1.5 s jobs read 5-6 % off. The reads show it refreshes within ms of each read.
    errors = sorted(abs(e) for e in job_errors(refresh_s))
    assert errors[-1] < 0.003, errors


def test_the_100_ms_counter_is_unchanged():
    assert max(abs(e) for e in job_errors(0.1)) < 0.001


@pytest.mark.parametrize("seed", [1, 2])
def test_a_counter_clock_jittering_past_its_allowance_never_costs_a_whole_period(seed):
    # Each refresh +-7.5 ms off its grid (the tracker allows 3 ms): a change whose allowed
    # phases split at both ends of a period-wide bracket was dated at one of them, and a
    # value seen where the next refresh might land was dated a period late. A steady 8 s job
    # then read ~1.1 % off (one period of energy); such values are now left undated.
    errors = job_errors(0.1, jobs=8, seed=seed, jitter_s=0.0075, duration_s=8.0)
    assert max(abs(e) for e in errors) < 0.004, errors


@pytest.mark.parametrize("seed", [1, 2])
def test_a_counter_clock_jittering_by_20_ms_meters_steady_jobs_to_a_percent(seed):
    # Each refresh +-20 ms off its 100 ms grid. On the 3 ms allowance built for an H100's clock,
    # a refresh 12 ms early was dated at the one before it (a steady 1.5 s job 4 % off, an 8 s
    # one 1.3 %), and the period's brackets agreed on 107 or 114 ms. The allowance now follows
    # the spread the pinned refreshes show (~20 ms), and the brackets widen with it.
    short = job_errors(0.1, jobs=8, seed=seed, jitter_s=0.02)
    assert max(abs(e) for e in short) < 0.015, short
    long = job_errors(0.1, jobs=4, seed=seed, jitter_s=0.02, duration_s=8.0)
    assert max(abs(e) for e in long) < 0.005, long


@pytest.mark.parametrize("trace_seed", [1, 2])
def test_a_refined_period_keeps_the_phase_its_counter_showed(trace_seed):
    # A 1 s counter under a jittered 200 ms square: ~16 s in, its measured period (981 ms) was
    # refined to 1002 ms and the phases known on it were dropped, so the value seen at that
    # read was dated in the middle of its 1 s bracket, half a second off: that job +4.0 / +3.6 %.
    clock = VirtualClock(start=0.0)
    data = {"seed": 3, "gpu": [{"model": H100, "energy_offset_j": 5e6,
                                "sensor": {"counter_refresh_s": 1.0, "counter_phase_s": 0.013}}]}
    scen = Scenario.from_dict(data)
    scen = replace(scen, gpus=(replace(scen.gpus[0], trace=jittered_square(0.2, 200.0, trace_seed)),))
    fake = FakeNVML(scen, clock, t0=0.0)
    sensor = NvmlSensor(build_module(fake), GpuSelection(None), wall=clock.wall, clock=clock, seed=4)
    meter = Meter([sensor], clock=clock)
    results = window_jobs(meter, VirtualDriver(meter, clock, seed=4), fake, jobs=8, rng=random.Random(4),
                          duration_s=8.0)
    meter.close()
    assert max(abs(err) for err, _ in results) < 0.025, results


def test_the_phase_fit_measures_a_period_to_its_brackets_scatter_over_the_count():
    from wattmeter.sensors.refresh_period import PhaseFit
    rng = random.Random(5)

    def bracket(k: int) -> tuple[float, float]:
        """A 2 ms bracket around the k-th refresh of a 200 ms clock (0.013 + k * 0.2)."""
        t = 0.013 + k * 0.2
        lo = t - rng.uniform(0.0, 0.002)
        return lo, lo + 0.002

    fit = PhaseFit(sum(bracket(0)) / 2, 0.201, 0.002, 0.002)   # a first estimate 0.5 % off
    for k in range(1, 4):                          # a burst's consecutive refreshes
        assert fit.add(*bracket(k))
    assert abs(fit.period_s - 0.2) < 0.0005
    # Ten minutes on, the fit cannot count on its own yet; the caller's phases can.
    assert fit.add(*bracket(3003)) is None
    assert fit.add(*bracket(3003), steps=3000)
    for k in (3043, 3083, 3123, 3203, 3283):      # pairs 8-16 s apart, counted by the fit
        assert fit.add(*bracket(k)) is True
    assert abs(fit.period_s - 0.2) < 4 * fit.period_sd_s < 1e-5
    # A refresh half a period from where the fit puts it contradicts it.
    lo, hi = bracket(3400)
    assert fit.add(lo + 0.1, hi + 0.1) is False


@pytest.mark.parametrize("refresh_s", [0.02, 0.05, 0.2])
def test_a_measured_period_stays_locked_without_calibration_bursts(refresh_s):
    """On a measured period the phases widened by 0.3 % a period (the estimate's trust) until the
    lock was lost, and a 0.5 s burst of reads re-locked it every ~10 s: ~11 (20 and 50 ms) and
    ~17 (200 ms) counter reads a second with no window open. The fit over brackets a count of
    periods apart narrows the allowance as the run grows; and the jitter allowance that
    brackets conflicting on the nominal 100 ms grid had raised to +-3 ms (which kept a 20 ms
    counter's pairs from holding its 8 ms lock) starts small again on the measured period."""
    clock = VirtualClock(start=0.0)
    data = {"seed": 3, "gpu": [{"model": H100, "trace": {"kind": "constant", "power_w": 400.0},
                                "sensor": {"counter_refresh_s": refresh_s, "counter_phase_s": 0.013},
                                "energy_offset_j": 5e6}]}
    fake = FakeNVML(Scenario.from_dict(data), clock, t0=0.0)
    module = build_module(fake)
    calls: list[float] = []
    real = module.nvmlDeviceGetTotalEnergyConsumption
    module.nvmlDeviceGetTotalEnergyConsumption = lambda h: (calls.append(clock.now()), real(h))[1]
    sensor = NvmlSensor(module, GpuSelection(None), wall=clock.wall, clock=clock, seed=1)
    meter = Meter([sensor], clock=clock)
    drive = VirtualDriver(meter, clock, seed=1)
    drive.run_until(60.0)
    n0 = len(calls)
    drive.run_until(180.0)
    tracker = sensor._gpus[0].counter.tracker
    meter.close()
    assert (len(calls) - n0) / 120.0 < 1.5
    assert tracker.measured and abs(tracker.period_s - refresh_s) < 0.0005 * refresh_s


@pytest.mark.parametrize("seed", range(4))
def test_a_100_ms_counter_read_at_a_jittered_cadence_keeps_its_period(seed):
    """Reads ~100 ms apart (a jittered 10 Hz cadence: a counter too coarse to shape is read at
    every tick) see a change at almost every read, and their period brackets overlap most
    deeply somewhere in 94-207 ms. Taken for a measured period, the 100 ms counter became a
    155-190 ms one (every seed before), and its values were dated on that grid."""
    from wattmeter.sensors.refresh import RefreshTracker
    rng = random.Random(seed)
    tracker = RefreshTracker(period_s=0.1)
    slot = 0.0
    while slot < 600.0:
        t = slot + rng.random() * 0.1
        slot += 0.1
        tracker.observe(t, float(int((t - 0.013) // 0.1)), t + 0.00002)
        assert tracker.period_s == 0.1
    assert not tracker.measured


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_1_s_counter_dates_its_first_jobs_on_an_honest_allowance(seed):
    """A 1 s counter's first period estimate comes a few per cent off (0.98 s, claiming
    88 ms). Allowed 0.3 % a period of drift, its phases looked locked while they moved ~20 ms
    a period, and values were dated half a period off: the first steady 1.5 s job read -5.9 %
    (seed 3) or +1.6 % (seed 1). The first allowance is now the estimate's own precision."""
    errors = job_errors(1.0, jobs=8, seed=seed)
    assert max(abs(e) for e in errors) < 0.01, errors


def test_a_1_s_counter_has_every_field_value_read_once_its_period_is_fitted():
    """A 1 s counter's span is shaped by instant power. Read at the cadence (~7 Hz), field 186
    left the shape inside a span to a handful of 20 ms boxes: bursty 1.5 s jobs read 4-9 % off
    p90. Once the fit holds the period, every field value is read (as on a GPU with no
    counter). (A minute or two in: the fit needs brackets seconds apart.)"""
    from dataclasses import replace

    from vdrive import jittered_square
    clock = VirtualClock(start=0.0)
    data = {"seed": 3, "gpu": [{"model": H100, "sensor": {"counter_refresh_s": 1.0, "counter_phase_s": 0.013},
                                "energy_offset_j": 5e6}]}
    scen = Scenario.from_dict(data)
    scen = replace(scen, gpus=(replace(scen.gpus[0], trace=jittered_square(0.1, 250.0, 7)),))
    fake = FakeNVML(scen, clock, t0=0.0)
    sensor = NvmlSensor(build_module(fake), GpuSelection(None), wall=clock.wall, clock=clock, seed=1)
    meter = Meter([sensor], clock=clock)
    results = window_jobs(meter, VirtualDriver(meter, clock, seed=1), fake, jobs=8, rng=random.Random(1),
                          start_s=150.0, duration_s=1.5)
    reader = sensor._gpus[0].reader
    meter.close()
    errors = sorted(abs(err) for err, _ in results)
    assert reader.timing.slow
    # Before: 2nd worst of 8 jobs 5.2 % (7.4, 5.2, 3.1 % ...); now ~1.5 %. (The first job still
    # reads -5.2 %: at 150 s the fit does not hold the period yet (allowance 1.1 % a period),
    # one refresh's value goes undated, and a 2 s span is shaped by reads at the cadence.)
    assert errors[-2] < 0.02, errors


def dear_counter(refresh_s: float, jitter_s: float, calls: list[float] | None = None):
    """One GPU whose counter refreshes every ``refresh_s`` (each refresh +-``jitter_s``), read by
    3.5 ms calls (an H100's); ``calls`` collects each counter call's time."""
    clock = VirtualClock(start=0.0)
    data = {"seed": 3, "gpu": [{"model": H100, "trace": {"kind": "constant", "power_w": 400.0},
                                "sensor": {"counter_refresh_s": refresh_s, "counter_phase_s": 0.013,
                                           "counter_jitter_s": jitter_s,
                                           "function_latency_s": {"nvmlDeviceGetTotalEnergyConsumption": 0.0035}},
                                "energy_offset_j": 5e6}]}
    fake = FakeNVML(Scenario.from_dict(data), clock, t0=0.0)
    module = build_module(fake)
    if calls is not None:
        real = module.nvmlDeviceGetTotalEnergyConsumption
        module.nvmlDeviceGetTotalEnergyConsumption = lambda h: (calls.append(clock.now()), real(h))[1]
    sensor = NvmlSensor(module, GpuSelection(None), wall=clock.wall, clock=clock, seed=1)
    meter = Meter([sensor], clock=clock)
    return clock, fake, sensor, meter, VirtualDriver(meter, clock, seed=1)


@pytest.mark.parametrize("refresh_s, jitter_s", [(0.09997, 0.0025), (0.1, 0.0)])
def test_a_nominal_100_ms_counter_takes_the_period_its_pairs_measure_only_where_they_contradict_it(refresh_s, jitter_s):
    """An H100's counter refreshes every 99.97 ms (+-2.5 ms): 0.3 ms a second off the nominal
    grid, so pairs a few seconds apart were planned ~5 ms late on average (real time, 8 GPUs),
    their first read often already saw the refresh, and each miss was chased. The pairs'
    brackets are fitted over their count of periods (as on a measured period); the fit's period
    replaces the nominal one only where it lies over 3 sd off it, so an exact 100 ms clock keeps
    0.1 (a fit 0.015 % off it dated steady 1.5 s jobs 0.1 % off)."""
    clock, fake, sensor, meter, drive = dear_counter(refresh_s, jitter_s)
    drive.run_until(150.0)
    tracker = sensor._gpus[0].counter.tracker
    grid = fake._gpus[0].counter_grid
    # The refreshes it predicts over the next minute, against the clock's own (its jitter aside).
    offsets = []
    for i in range(60):
        t = clock.now() + i
        predicted = tracker.next_refresh_after(t)
        k = round((predicted - grid.phase) / grid.period)
        offsets.append(predicted - (grid.phase + k * grid.period))
    meter.close()
    if jitter_s:
        assert tracker.fitted and abs(tracker.period_s - refresh_s) < 5e-6, tracker.period_s
        # Over the minute the predictions keep to the clock (on the nominal period they moved
        # 0.3 ms a second: 18 ms).
        assert abs(offsets[-1] - offsets[0]) < 0.002, offsets
    else:
        assert tracker.period_s == 0.1 and not tracker.measured


def test_pairs_on_a_fitted_period_stretch_to_16_s():
    """Once the period is fitted (its drift known to a few parts in 100,000, a tenth of the lock
    over 16 s), pairs that keep hitting their refresh stretch up to 16 s apart instead of 8
    (``CounterTiming._max_pair_gap_s``): an H100's counter call is
    3.5 ms of CPU, and between windows the pairs are all the counter reads there are (steady
    load, 100-400 s: ~0.28 reads a second with 8 s pairs)."""
    calls: list[float] = []
    clock, fake, sensor, meter, drive = dear_counter(0.09997, 0.0025, calls)
    drive.run_until(100.0)
    n0 = len(calls)
    drive.run_until(400.0)
    counter = sensor._gpus[0].counter
    meter.close()
    assert counter.tracker.fitted and counter.pair_gap_s == 16.0
    assert (len(calls) - n0) / 300.0 < 0.21
