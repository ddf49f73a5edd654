"""Steady counter pairs between edges (sensors/counter_timing.py): how often the counter call
(3.5 ms of CPU on an H100) is paid for, judged from what the pairs show.

Before: a pair was two reads 16 ms apart centred on the predicted refresh. Its bracket was as
wide as the allowed phases, so it never narrowed them; on a counter clock that jitters (the
H100's measured 99.97 ms, each refresh +-2.5 ms, with calls as cheap as a simulation's) the
phases widened at every pair until the lock was lost, and a 0.5 s calibration burst (~100
reads) re-locked it every ~20 s: ~8 counter reads a second per GPU with no window open.
And a counter too coarse to shape (field 186 as 100 ms samples stamped at the read) was read
at every tick whatever the call cost: ~12 reads a second, ~4 % of a core per GPU at H100
prices."""
from __future__ import annotations

from wattmeter.clock import VirtualClock
from wattmeter.meter import Meter
from wattmeter.sensors.counter_timing import COUNTER_PERIOD_S, MAX_PAIR_GAP_S
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sim.fake_nvml import FakeNVML, build_module
from wattmeter.sim.scenario import Scenario

from vdrive import VirtualDriver

H100 = "NVIDIA H100 80GB HBM3"


def steady_meter(sensor: dict, seed: int = 1, fault: dict | None = None, trace: dict | None = None):
    """A metered H100 (constant 400 W unless ``trace``), no window open; every counter call's
    time is logged."""
    clock = VirtualClock(start=0.0)
    trace = trace or {"kind": "constant", "power_w": 400.0}
    data = {"seed": 3, "gpu": [{"model": H100, "trace": trace,
                                "sensor": {"counter_phase_s": 0.013, **sensor}, "energy_offset_j": 5e6}],
            "fault": [fault] if fault else []}
    fake = FakeNVML(Scenario.from_dict(data), clock, t0=0.0)
    module = build_module(fake)
    calls: list[float] = []
    real = module.nvmlDeviceGetTotalEnergyConsumption
    module.nvmlDeviceGetTotalEnergyConsumption = lambda h: (calls.append(clock.now()), real(h))[1]
    sensor_ = NvmlSensor(module, GpuSelection(None), wall=clock.wall, clock=clock, seed=seed)
    meter = Meter([sensor_], clock=clock)
    return clock, meter, VirtualDriver(meter, clock, seed=seed), sensor_, calls


def test_a_jittering_h100_clock_stays_locked_without_calibration_bursts():
    clock, meter, drive, sensor, calls = steady_meter({"counter_refresh_s": 0.09997, "counter_jitter_s": 0.0025})
    drive.run_until(20.0)
    n0 = len(calls)
    drive.run_until(140.0)
    per_s = (len(calls) - n0) / 120.0
    timing = sensor._gpus[0].counter
    meter.close()
    # Was ~8 a second (bursts of ~100 reads every ~20 s); pairs of 2-3 reads every 4-8 s now.
    assert per_s < 1.0, per_s
    assert not timing.unlocked


def test_steady_pairs_stretch_while_they_hit_and_shrink_after_a_miss():
    # The counter holds one value from 70 s to 82 s: the pairs in that stretch see no refresh.
    clock, meter, drive, sensor, calls = steady_meter({}, fault={"kind": "counter_stall", "gpu": 0,
                                                                 "at_s": 70.0, "for_s": 12.0})
    timing = sensor._gpus[0].counter
    drive.run_until(40.0)
    assert timing.pair_gap_s == MAX_PAIR_GAP_S        # every pair saw its refresh: fewer pairs
    n0 = len(calls)
    drive.run_until(70.0)
    assert (len(calls) - n0) / 30.0 < 0.5              # 2-3 reads every ~8-11 s (was 2 every ~4-7 s)
    drive.run_until(83.0)
    meter.close()
    assert timing.pair_gap_s == COUNTER_PERIOD_S       # a miss took the gap back


def test_a_missed_pair_resets_the_gap_and_is_read_again_a_period_on():
    from wattmeter.sensors.counter_timing import PAIR_HALF_GAP_S, CounterTiming
    timing = CounterTiming(shaped=True)
    # Lock a 100 ms clock with refreshes at k * 0.1 + 0.013: changes seen by reads 2 ms apart.
    t = 0.0
    while t < 1.0:
        refreshes = int((t - 0.013) // 0.1) + 1 if t >= 0.013 else 0
        timing.observe(t, float(refreshes), t + 0.0001)
        t += 0.002
    assert not timing.unlocked
    timing.pair_gap_s = MAX_PAIR_GAP_S
    # A steady pair planned at 10 s whose counter has stalled: every read sees one value.
    timing.plan_pair(10.0, steady=True)
    reads = []
    now = timing.next_counter_at
    stalled = 77.0
    for _ in range(40):
        if timing.due(now, cadence=False, calibrating=False, edges_pending=False):
            reads.append(now)
            timing.observe(now, stalled, now + 0.0001)
        wish = timing.wish()
        if wish is None or wish > now + 1.0:
            break
        now = max(now + 0.0005, wish)
    assert timing.pair_gap_s == COUNTER_PERIOD_S
    # The pair (three reads 8 ms apart), then the same span a period on, one read wider at each
    # end, and no more: 8 reads, not a 0.5 s burst (~100) nor reads all through the period.
    first, again = [r for r in reads if r < reads[0] + 0.05], [r for r in reads if r >= reads[0] + 0.05]
    assert len(first) == 3 and len(again) == 5, reads
    assert all(abs(b - a - PAIR_HALF_GAP_S) < 0.002 for seq in (first, again) for a, b in zip(seq, seq[1:]))
    assert abs(again[0] - (first[0] + 0.1 - PAIR_HALF_GAP_S)) < 0.002


def test_a_dear_unshaped_counter_is_read_in_pairs_except_just_after_an_edge():
    # Field 186 as 100 ms samples stamped at the read cannot shape counter spans, so the
    # counter is read at every tick. At 3.5 ms a call (an H100's) that was ~12 calls a second
    # per GPU, ~4 % of a core each; a cheap counter still is read at every tick.
    dear = {"counter_refresh_s": 0.09997, "counter_jitter_s": 0.0025, "instant_kind": "sample",
            "instant_refresh_s": 0.1, "field_timestamp": "read",
            "function_latency_s": {"nvmlDeviceGetTotalEnergyConsumption": 0.0035}}
    cheap = {k: v for k, v in dear.items() if k != "function_latency_s"}
    rates = {}
    for name, table in (("dear", dear), ("cheap", cheap)):
        # A 400 ms square: the samples are seen to change, and judged too coarse to shape.
        clock, meter, drive, sensor, calls = steady_meter(table, trace={
            "kind": "square", "high_w": 600.0, "low_w": 200.0, "high_s": 0.2, "low_s": 0.2, "phase_s": 0.0})
        drive.run_until(20.0)
        n0 = len(calls)
        drive.run_until(80.0)
        rates[name] = (len(calls) - n0) / 60.0
        # A window: every tick again while it is young, so its end keeps every counter span.
        w = meter.window("job")
        n1 = len(calls)
        drive.run_until(clock.now() + 3.0)
        w.end()
        rates[name + "_window"] = (len(calls) - n1) / 3.0
        meter.close()
    assert rates["cheap"] > 8.0 and rates["cheap_window"] > 8.0
    assert rates["dear"] < 1.0, rates
    assert rates["dear_window"] > 8.0, rates
