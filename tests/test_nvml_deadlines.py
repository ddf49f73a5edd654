"""NVML calls with deadlines (sensors/guard.py) and GPUs that come late (sensors/late.py, discovery)."""
from __future__ import annotations

import inspect
import threading
import time

import pytest

from wattmeter.clock import SystemClock, VirtualClock
from wattmeter.discovery import SensorPlan, discover
from wattmeter.meter import Meter
from wattmeter.sensors.base import SimulatedNvml
from wattmeter.sensors.guard import with_deadlines
from wattmeter.sensors.late import LateNvmlSensor
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sim.fake_nvml import FakeNVML, build_module, real_pynvml
from wattmeter.sim.scenario import Scenario

nv = real_pynvml()
H100 = "NVIDIA H100 80GB HBM3"
CONST_300 = {"kind": "constant", "power_w": 300.0}


def fake_of(n_gpus=1, faults=(), clock=None):
    gpus = [{"model": H100, "trace": CONST_300, "energy_offset_j": 0.0} for _ in range(n_gpus)]
    scenario = Scenario.from_dict({"gpu": gpus, "fault": list(faults)})
    return FakeNVML(scenario, clock or SystemClock())


@pytest.fixture
def fakes():
    made = []
    yield made
    for f in made:
        f.release_hangs()    # no test leaves a thread blocked


# -- the deadline wrapper ------------------------------------------------------------------------

def test_a_hung_call_raises_the_vendor_timeout_at_its_deadline_then_fails_fast_until_it_returns(fakes):
    fake = fake_of(2, [{"kind": "hang", "function": "nvmlDeviceGetPowerUsage", "gpu": 0}])
    fakes.append(fake)
    n = with_deadlines(build_module(fake), deadline_s=0.2)
    guard = n.WATTMETER_DEADLINES
    n.nvmlInit()
    h0, h1 = n.nvmlDeviceGetHandleByIndex(0), n.nvmlDeviceGetHandleByIndex(1)
    t = time.monotonic()
    with pytest.raises(nv.NVMLError_Timeout):
        n.nvmlDeviceGetPowerUsage(h0)
    waited = time.monotonic() - t
    assert 0.2 <= waited < 0.6                      # the deadline, not the hang
    assert guard.stale(h0) and not guard.stale(h1)
    t = time.monotonic()
    for _ in range(20):                              # later calls on that GPU do not queue behind it
        with pytest.raises(nv.NVMLError_Timeout):
            n.nvmlDeviceGetTotalEnergyConsumption(h0)
    assert time.monotonic() - t < 0.2
    assert n.nvmlDeviceGetPowerUsage(h1) == 300_000  # the other GPU answers at once
    assert n.nvmlDeviceGetCount() == 2               # and so do library calls
    stats = guard.stats()
    assert (stats.timeouts, stats.fast_fails, stats.hung_now) == (1, 20, 1)
    threads = threading.active_count()
    fake.release_hangs()                             # the hung call returns: the GPU recovers
    deadline = time.monotonic() + 5
    while guard.stale(h0) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert n.nvmlDeviceGetPowerUsage(h0) == 300_000
    assert guard.stats().hung_now == 0
    assert threading.active_count() <= threads        # no thread was added for the retries


def test_the_wrapped_module_keeps_pynvml_names_errors_constants_and_signatures():
    fake = fake_of(1)
    n = with_deadlines(build_module(fake))
    assert n.NVML_FI_DEV_POWER_INSTANT == nv.NVML_FI_DEV_POWER_INSTANT
    assert n.NVMLError is nv.NVMLError and n.WATTMETER_FAKE_NVML is fake
    # still a declared stand-in: readings labelled simulated, counter calls timed on its clock
    assert isinstance(n, SimulatedNvml) and n.clock is fake.clock
    assert not isinstance(with_deadlines(nv), SimulatedNvml)
    assert list(inspect.signature(n.nvmlDeviceGetFieldValues).parameters) == ["handle", "fieldIds"]
    with pytest.raises(nv.NVMLError_Uninitialized):   # errors of the call itself pass through
        n.nvmlDeviceGetCount()
    n.nvmlInit()
    with pytest.raises(nv.NVMLError_InvalidArgument):
        n.nvmlDeviceGetHandleByIndex(7)


def test_a_hung_counter_read_costs_the_sensor_at_most_one_deadline_and_is_counted(fakes):
    # The hang starts after discovery (which probes the counter), while reads go on.
    fake = fake_of(2, [{"kind": "hang", "function": "nvmlDeviceGetTotalEnergyConsumption", "gpu": 0, "at_s": 0.3}])
    fakes.append(fake)
    deadline_s = 0.25
    sensor = NvmlSensor(with_deadlines(build_module(fake), deadline_s=deadline_s), GpuSelection(None),
                        wall=fake.clock.wall)
    meter = Meter([sensor], clock=fake.clock)
    time.sleep(max(0.0, 0.3 - fake.scenario_time()))   # the first reads (dense, until a change) hang
    slowest = 0.0
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        t = time.monotonic()
        meter.poll()
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.01)
    status = meter.status["nvml"]
    assert status.errors["timeout"] >= 2             # the hung read, then fast failures, each counted
    assert slowest < deadline_s + 0.2                # no read waited past one deadline
    snap = meter.snapshot()
    assert snap["gpu1"].errors == 0 and snap["gpu0"].errors >= 2
    assert snap["gpu1"].energy_j >= 300.0 * 1.0      # the other GPU kept metering (1.5 s at 300 W)


def test_one_read_of_every_gpu_is_one_hand_off_and_a_hung_gpu_leaves_the_shared_lane_at_once(fakes):
    fake = fake_of(3, [{"kind": "hang", "function": "nvmlDeviceGetPowerUsage", "gpu": 0}])
    fakes.append(fake)
    n = with_deadlines(build_module(fake), deadline_s=0.3)
    guard = n.WATTMETER_DEADLINES
    with guard.inline():
        n.nvmlInit()
        hs = [n.nvmlDeviceGetHandleByIndex(i) for i in range(3)]
    read_at = {}

    def read(i, h):
        w = n.nvmlDeviceGetPowerUsage(h)
        read_at[i] = time.monotonic()
        return w

    def reads(gpus):
        return [(hs[i], lambda i=i: read(i, hs[i])) for i in gpus]

    assert guard.run_each(reads([1, 2])) == [300_000, 300_000]
    assert guard.stats().lanes == 1                  # both GPUs' reads ran on one lane
    t = time.monotonic()
    out = guard.run_each(reads([0, 1, 2]))           # GPU 0, read first, hangs
    waited = time.monotonic() - t
    assert isinstance(out[0], nv.NVMLError_Timeout) and out[1:] == [300_000, 300_000]
    assert 0.3 <= waited < 0.7                       # its deadline, not the hang
    assert read_at[1] - t < 0.15 and read_at[2] - t < 0.15   # the others were read at once, not after it
    assert guard.stale(hs[0]) and not guard.stale(hs[1])
    t = time.monotonic()
    out = guard.run_each(reads([0, 1, 2]))
    assert time.monotonic() - t < 0.15               # GPU 0 fails fast, the others answer
    assert isinstance(out[0], nv.NVMLError_Timeout) and out[1:] == [300_000, 300_000]
    stats = guard.stats()
    assert (stats.timeouts, stats.fast_fails, stats.hung_now) == (1, 1, 1)
    threads = threading.active_count()
    fake.release_hangs()                             # the hung call returns: GPU 0 recovers, on a lane of its own
    deadline = time.monotonic() + 5
    while guard.stale(hs[0]) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert guard.run_each(reads([0, 1, 2])) == [300_000] * 3
    assert guard.stats().hung_now == 0
    assert threading.active_count() <= threads + 1   # GPU 0's own lane; the thread it hung on ends when idle


def test_the_sampler_reads_on_its_own_thread_and_a_hung_call_there_hands_reading_to_a_new_thread(fakes):
    # Field 186 is read at every cadence tick; on GPU 0 it hangs from 0.8 s, for good.
    fake = fake_of(3, [{"kind": "hang", "function": "nvmlDeviceGetFieldValues", "gpu": 0, "at_s": 0.8}])
    fakes.append(fake)
    n = with_deadlines(build_module(fake), deadline_s=0.3)
    guard = n.WATTMETER_DEADLINES
    with guard.inline():                             # as discover() builds it
        sensor = NvmlSensor(n, GpuSelection(None), wall=fake.clock.wall)
    meter = Meter([sensor], clock=fake.clock).start()
    try:
        handoffs, reads = guard.stats().handoffs, meter.status["nvml"].reads   # start()'s first read
        time.sleep(max(0.0, 0.6 - fake.scenario_time()))
        assert meter.status["nvml"].reads > reads
        assert guard.stats().handoffs == handoffs    # no hand-offs since: the reads ran on the reader itself
        threads = threading.active_count()
        while fake.hung_now == 0 and fake.scenario_time() < 3.0:
            time.sleep(0.01)
        time.sleep(0.3 + 0.15 + 0.3)                 # the deadline, the watchdog's look, a few reads
        reads = meter.status["nvml"].reads
        before = meter.snapshot()
        time.sleep(1.0)
        after = meter.snapshot()
        assert meter.status["nvml"].reads >= reads + 5   # a new reader thread reads on
        status = meter.status["nvml"]
        assert status.errors["timeout"] >= 2         # the hang, then its GPU failing fast, each counted
        stats = guard.stats()
        assert stats.timeouts == 1 and stats.hung_now == 1 and stats.fast_fails >= 1
        for key in ("gpu1", "gpu2"):                 # the other GPUs kept metering: ~1 s at 300 W
            assert 300.0 * 0.8 <= after[key].energy_j - before[key].energy_j <= 300.0 * 1.2
        assert threading.active_count() <= threads + 1   # the hung thread and its replacement
    finally:
        t = time.monotonic()
        meter.close()
        assert time.monotonic() - t < 2.0            # stopping waits on the live reader, not the hung one


@pytest.mark.parametrize("function", ["nvmlDeviceGetFieldValues", "nvmlDeviceGetTotalEnergyConsumption"])
def test_a_window_open_across_a_hang_ends_at_once_flagged_approximate(fakes, function):
    # A read of GPU 0 hangs from 0.8 s for good: the window's end must not wait out the
    # result timeout (10 s) for a GPU that cannot answer; its edge is estimated and flagged.
    fake = fake_of(3, [{"kind": "hang", "function": function, "gpu": 0, "at_s": 0.8}])
    fakes.append(fake)
    n = with_deadlines(build_module(fake), deadline_s=0.3)
    with n.WATTMETER_DEADLINES.inline():
        sensor = NvmlSensor(n, GpuSelection(None), wall=fake.clock.wall)
    meter = Meter([sensor], clock=fake.clock).start()
    try:
        time.sleep(max(0.0, 0.5 - fake.scenario_time()))
        w = meter.window("across the hang")
        time.sleep(max(0.0, 1.8 - fake.scenario_time()))
        w.end()
        t = time.monotonic()
        r = w.result()
        assert time.monotonic() - t < 2.0             # ~0.7 s: a deadline and a few reads
        assert r.approximate
        per_gpu = {d.key: d.energy_j for d in r.devices}
        for key in ("gpu1", "gpu2"):
            assert per_gpu[key] == pytest.approx(300.0 * r.duration_s, rel=0.05)
    finally:
        meter.close()


# -- GPUs that come late ---------------------------------------------------------------------------

def _scenario_file(tmp_path, faults):
    import json
    path = tmp_path / "late.json"
    path.write_text(json.dumps({"gpu": [{"model": H100, "trace": CONST_300, "energy_offset_j": 0.0,
                                         "sensor": {"counter_phase_s": 0.0}}], "fault": faults}))
    return str(path)


def test_init_failing_for_5s_then_succeeding_meters_the_gpu_from_then_on(tmp_path):
    clock = VirtualClock(start=100.0)
    plan = SensorPlan(fake_scenario=_scenario_file(tmp_path, [{"kind": "driver_not_loaded", "for_s": 5.0}]),
                      cpu="none", ram="none", clock=clock, gpu_wait_s=2.0)
    found = discover(plan)
    [late] = found.sensors
    assert isinstance(late, LateNvmlSensor) and found.gpus_pending and late.devices() == []
    assert late.pending_reason == "NVML not ready (NVML could not start (Driver Not Loaded)); retried in the background"
    assert any("GPU metering pending" in n and "Driver Not Loaded" in n for n in found.notes)
    meter = Meter(found.sensors, clock=clock)
    meter.poll()
    w_all = meter.window("from-start")
    while not late.connected and clock.now() < 110.0:
        clock.advance(0.1)
        meter.poll()
        late.wait(2.0)                               # a retry started by this read, if any
    assert late.connected and 105.0 <= late.appeared_at <= 105.0 + 4.2   # within one backoff step
    assert late.pending_reason is None
    assert found.gpus_appeared_at == late.appeared_at
    assert any("GPUs appeared at clock time" in n and "gpu0" in n for n in found.notes)
    for _ in range(10):
        clock.advance(0.1)
        meter.poll()
    w = meter.window("after")
    for _ in range(40):
        clock.advance(0.1)
        meter.poll()
    w.end()
    w_all.end()
    for _ in range(10):
        clock.advance(0.1)
        meter.poll()
    assert w.result().component_energy_j("gpu") == pytest.approx(300.0 * 4.0, rel=0.01)
    from_start = w_all.result().component_energy_j("gpu")
    metered_s = w_all.result().end_t - late.appeared_at
    # A window open across the arrival counts the GPU from its first dated point (within ~0.5 s
    # of the arrival here: the counter's first refresh change), flagged approximate.
    assert 300.0 * (metered_s - 1.0) <= from_start <= 300.0 * (metered_s + 0.1)
    assert w_all.result().approximate


def test_a_hung_discovery_does_not_delay_meter_start(tmp_path, fakes):
    plan = SensorPlan(fake_scenario=_scenario_file(tmp_path, [{"kind": "hang", "function": "nvmlDeviceGetCount"}]),
                      cpu="none", ram="none", gpu_wait_s=0.3, nvml_deadline_s=5.0)
    t = time.monotonic()
    found = discover(plan)
    fakes.append(found.fake)
    assert time.monotonic() - t < 1.5                # gpu_wait_s, not the hang
    [late] = found.sensors
    assert not late.connected and found.gpus_pending
    meter = Meter(found.sensors)
    t = time.monotonic()
    meter.start()
    started_s = time.monotonic() - t
    meter.close()
    assert started_s < 0.5


def test_no_nvidia_library_is_final_and_said_once(tmp_path):
    plan = SensorPlan(fake_scenario=_scenario_file(tmp_path, [{"kind": "library_not_found"}]),
                      cpu="none", ram="none", clock=VirtualClock())
    found = discover(plan)
    assert found.sensors == [] and not found.gpus_pending
    assert "nvml" in found.unavailable
    assert [n for n in found.notes if n.startswith("No GPU metering")] == [
        "No GPU metering: NVML could not start (NVML Shared Library Not Found). Metering CPU and RAM only "
        "(install the NVIDIA driver, or use --fake-gpus N to try the GPU path)."]


def test_retries_back_off_on_the_injected_clock():
    clock = VirtualClock(start=0.0)
    calls = []

    def connect():
        calls.append(clock.now())
        raise nv.NVMLError(nv.NVML_ERROR_DRIVER_NOT_LOADED)

    late = LateNvmlSensor("nvml", connect, clock, 0.1, first_retry_s=0.25, max_retry_s=1.0)
    late.wait(2.0)
    for _ in range(60):                              # 6 s of reads at 10 Hz
        clock.advance(0.1)
        late.read(clock.now())
        late.wait(2.0)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    expected = [0.25, 0.5, 1.0] + [1.0] * (len(gaps) - 3)     # doubling, capped; on a 0.1 s read grid
    assert len(gaps) >= 6 and all(e - 1e-6 <= g <= e + 0.1 + 1e-6 for g, e in zip(gaps, expected))
    assert late.devices() == [] and late.read(clock.now()).readings == []


def test_idle_lanes_end_their_threads_and_come_back_on_the_next_call(monkeypatch):
    from wattmeter.sensors import guard_lanes as guard_mod
    monkeypatch.setattr(guard_mod, "IDLE_EXIT_S", 0.05)
    fake = fake_of(2)
    n = with_deadlines(build_module(fake), deadline_s=2.0)
    guard = n.WATTMETER_DEADLINES
    before = set(threading.enumerate())
    n.nvmlInit()
    handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(2)]
    assert [n.nvmlDeviceGetPowerUsage(h) for h in handles] == [300_000, 300_000]
    lanes = set(threading.enumerate()) - before
    assert guard.stats().lanes == len(lanes) == 3                  # the library lane and one per GPU
    deadline = time.monotonic() + 5
    while guard.stats().lanes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guard.stats().lanes == 0
    for t in lanes:
        t.join(5)
    assert not [t.name for t in lanes if t.is_alive()]   # their threads ended
    assert n.nvmlDeviceGetPowerUsage(handles[1]) == 300_000   # a new lane serves the next call
    assert guard.stats().lanes == 1


def test_run_starts_the_child_before_a_late_driver_is_ready_and_meters_its_gpus_from_then_on(tmp_path):
    """`wattmeter run` on the bundled flaky_driver scenario: nvmlInit fails for the first 3 s."""
    import json
    import os
    import subprocess
    import sys
    rec = tmp_path / "r.jsonl"
    started = tmp_path / "started"
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "WATTMETER_FAKE_NVML")}
    child = f"import time, pathlib; pathlib.Path({str(started)!r}).write_text(repr(time.time())); time.sleep(5)"
    launched = time.time()
    p = subprocess.run([sys.executable, "-m", "wattmeter", "run", "--fake-nvml", "flaky_driver", "--records",
                        str(rec), "--", sys.executable, "-c", child], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert float(started.read_text()) - launched < 3.0       # before NVML answers (3 s into the scenario)
    assert "GPU metering pending: NVML is not ready after 1 s (NVML could not start (Driver Not Loaded))" in p.stderr
    r = [json.loads(line) for line in rec.read_text().splitlines()][-1]   # the final record, after checkpoints
    assert r["status"] == "completed"
    assert r["gpu_count"] == 2
    # GPU 1 draws a constant 420 W; it is metered only from when NVML answered (3-4 s in), and
    # the job ends before its counter call hangs (6 s).
    gpu1 = next(d for d in r["devices"] if d["key"] == "gpu1")
    assert 0.0 < gpu1["energy_j"] <= 420.0 * (r["duration_s"] - 2.5)
    assert gpu1["approximate"] and r["approximate"]


def test_deadlines_can_be_turned_off_in_the_plan(tmp_path):
    plan = SensorPlan(fake_scenario=_scenario_file(tmp_path, []), cpu="none", ram="none", clock=VirtualClock(),
                      nvml_deadline_s=None)
    [sensor] = discover(plan).sensors
    assert not hasattr(sensor.nvml, "WATTMETER_DEADLINES")     # the fake's module itself
    assert [d.key for d in sensor.devices()] == ["gpu0"]
    [sensor] = discover(SensorPlan(fake_scenario=plan.fake_scenario, cpu="none", ram="none",
                                   clock=VirtualClock())).sensors
    assert sensor.nvml.WATTMETER_DEADLINES.deadline_s == 1.0


def test_inline_calls_skip_the_lanes_only_on_their_own_thread():
    fake = fake_of(1)
    n = with_deadlines(build_module(fake))
    guard = n.WATTMETER_DEADLINES
    with guard.inline():
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(0)
        assert n.nvmlDeviceGetPowerUsage(h) == 300_000
        assert guard.stats().lanes == 0 and guard.stats().calls == 0
        box = {}

        def other():
            box["w"] = n.nvmlDeviceGetPowerUsage(h)

        th = threading.Thread(target=other)
        th.start()
        th.join(5)
        assert box["w"] == 300_000 and guard.stats().lanes == 1   # another thread still gets a lane
    n.nvmlDeviceGetCount()
    assert guard.stats().lanes == 2                  # after the block, this thread's calls do too


def test_doctor_says_gpu_metering_is_pending_while_the_driver_loads():
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "WATTMETER_FAKE_NVML")}
    p = subprocess.run([sys.executable, "-m", "wattmeter", "doctor", "--fake-nvml", "flaky_driver"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "note: GPU metering pending: NVML is not ready after 1 s (NVML could not start (Driver Not Loaded))" \
        in p.stdout
