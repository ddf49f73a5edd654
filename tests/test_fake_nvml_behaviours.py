"""Real sensor behaviours in the fake NVML: field-186 kinds, field timestamps, trailing means,
stalled counters, per-function latency, hung calls, mid-run NotSupported, late init, slow discovery."""
from __future__ import annotations

import math
import threading
import time

import pytest

from wattmeter.clock import VirtualClock
from wattmeter.errors import ScenarioError
from wattmeter.sim.fake_nvml import FakeNVML, real_pynvml
from wattmeter.sim.scenario import Scenario

nv = real_pynvml()
SQUARE = {"kind": "square", "high_w": 650.0, "low_w": 90.0, "high_s": 0.15, "low_s": 0.25}
CONST_300 = {"kind": "constant", "power_w": 300.0}


def make(trace, sensor=None, faults=(), **gpu_extra):
    g = {"model": "NVIDIA H100 80GB HBM3", "trace": trace, "sensor": {"counter_phase_s": 0.0, **(sensor or {})},
         **gpu_extra}
    clock = VirtualClock(start=1000.0)
    fake = FakeNVML(Scenario.from_dict({"gpu": [g], "fault": list(faults)}), clock)
    return fake, clock


def at(clock, fake, scenario_t):
    clock.advance(fake.t0 + scenario_t - clock.now())


def field(fake, h, fid):
    v = fake.nvmlDeviceGetFieldValues(h, [fid])[0]
    assert v.nvmlReturn == nv.NVML_SUCCESS
    return v.value.uiVal / 1000.0, v.timestamp


def wall_us(fake, clock, scenario_t):
    return int(round(clock.wall(fake.t0 + scenario_t) * 1e6))


# -- field 186 ------------------------------------------------------------------------------------

def test_default_field_186_is_a_20ms_box_stamped_with_its_refresh_time():
    fake, clock = make(SQUARE)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 0.147)                    # refresh at 0.14 covers [0.12, 0.14]: all high
    w, ts = field(fake, h, nv.NVML_FI_DEV_POWER_INSTANT)
    assert w == 650.0 and ts == wall_us(fake, clock, 0.14)
    at(clock, fake, 0.165)                    # refresh at 0.16 covers [0.14, 0.16]: half high
    w, ts = field(fake, h, nv.NVML_FI_DEV_POWER_INSTANT)
    assert w == pytest.approx((650 * 0.01 + 90 * 0.01) / 0.02, abs=1e-3)
    assert ts == wall_us(fake, clock, 0.16)


def test_sampled_field_186_holds_the_power_at_each_100ms_refresh_and_is_stamped_at_the_read():
    shifted = {**SQUARE, "phase_s": 0.03}     # edges off the 100 ms grid: no float ties at edges
    fake, clock = make(shifted, {"instant_kind": "sample", "instant_refresh_s": 0.1, "field_timestamp": "read"})
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    for t in (0.05, 0.12, 0.199, 0.2, 0.33, 0.41, 0.5, 1.234):
        at(clock, fake, t)
        w, ts = field(fake, h, nv.NVML_FI_DEV_POWER_INSTANT)
        refresh = math.floor(t / 0.1 + 1e-9) * 0.1
        assert w == fake.true_power_w(0, fake.t0 + refresh)    # an instant sample, not a mean
        assert ts == wall_us(fake, clock, t)                     # the read time, whatever the value's age


def test_read_time_stamps_apply_to_every_field_and_refresh_stamps_stay_the_default():
    fake, clock = make(CONST_300, {"field_timestamp": "read"})
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 2.345)
    values = fake.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_POWER_AVERAGE, nv.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION])
    assert [v.timestamp for v in values] == [wall_us(fake, clock, 2.345)] * 2
    fake2, clock2 = make(CONST_300)
    fake2.nvmlInit()
    h2 = fake2.nvmlDeviceGetHandleByIndex(0)
    at(clock2, fake2, 2.345)
    values = fake2.nvmlDeviceGetFieldValues(h2, [nv.NVML_FI_DEV_POWER_AVERAGE, nv.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION])
    assert [v.timestamp for v in values] == [wall_us(fake2, clock2, 2.3)] * 2


# -- trailing means ---------------------------------------------------------------------------------

@pytest.mark.parametrize("read_t", [1.0, 1.37, 2.05, 7.777])
def test_power_usage_and_field_185_are_the_same_1s_trailing_mean_of_a_square_wave(read_t):
    fake, clock = make(SQUARE, {"power_usage": "average_1s", "power_refresh_s": 0.1})
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, read_t)
    refresh = math.floor(read_t / 0.1 + 1e-9) * 0.1
    truth_w = fake.true_energy_j(0, fake.t0 + refresh - 1.0, fake.t0 + refresh) / 1.0
    usage_w = fake.nvmlDeviceGetPowerUsage(h) / 1000.0
    f185_w, ts = field(fake, h, nv.NVML_FI_DEV_POWER_AVERAGE)
    assert usage_w == pytest.approx(truth_w, abs=1e-3)      # mW resolution
    assert f185_w == usage_w
    assert ts == wall_us(fake, clock, refresh)


def test_average_window_can_be_changed_and_applies_to_both_readings():
    fake, clock = make({"kind": "ramp", "from_w": 100.0, "to_w": 1100.0, "over_s": 10.0},
                       {"power_usage": "average_1s", "average_window_s": 2.0})
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 5.05)                     # refresh 5.0: the mean over [3, 5] of 100 + 100 t is 500 W
    assert fake.nvmlDeviceGetPowerUsage(h) == 500_000
    assert field(fake, h, nv.NVML_FI_DEV_POWER_AVERAGE)[0] == 500.0


# -- counter faults ---------------------------------------------------------------------------------

def test_a_stalled_counter_repeats_its_value_then_catches_up_with_the_truth():
    fake, clock = make(CONST_300, faults=[{"kind": "counter_stall", "at_s": 2.05, "for_s": 3.0}],
                       energy_offset_j=0.0)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    seen = set()
    for k in range(21, 50):                   # reads 2.1 ... 4.9 s, all inside the stall
        at(clock, fake, k / 10 + 0.001)
        seen.add(fake.nvmlDeviceGetTotalEnergyConsumption(h))
        seen.add(fake.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION])[0].value.ullVal)
    assert seen == {600_000}                  # 300 W x 2.0 s (the value of the last refresh before 2.05)
    at(clock, fake, 5.051)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) == 1_500_000   # caught up: 300 W x 5.0 s (last refresh)


def test_counter_not_supported_mid_run_also_fails_field_83_and_ends_with_its_window():
    fault = {"kind": "not_supported", "function": "nvmlDeviceGetTotalEnergyConsumption", "at_s": 3.0, "for_s": 2.0}
    fake, clock = make(CONST_300, faults=[fault])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 2.9)
    fake.nvmlDeviceGetTotalEnergyConsumption(h)
    at(clock, fake, 3.0)
    with pytest.raises(nv.NVMLError_NotSupported):
        fake.nvmlDeviceGetTotalEnergyConsumption(h)
    entry = fake.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION])[0]
    assert entry.nvmlReturn == nv.NVML_ERROR_NOT_SUPPORTED
    assert field(fake, h, nv.NVML_FI_DEV_POWER_INSTANT)[0] == 300.0   # power still answers
    at(clock, fake, 5.0)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) > 0


def test_function_latency_delays_only_that_function_on_the_injected_clock():
    fake, clock = make(CONST_300, {"function_latency_s": {"nvmlDeviceGetTotalEnergyConsumption": 0.05}},
                       energy_offset_j=0.0)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 0.97)
    t = clock.now()
    fake.nvmlDeviceGetPowerUsage(h)
    fake.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_POWER_INSTANT])
    assert clock.now() == t
    value = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    assert clock.now() == pytest.approx(t + 0.05)
    assert value == 300_000                    # the value when the call returns (refresh 1.0), not 0.9


# -- hung calls -----------------------------------------------------------------------------------

def _call_in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as exc:   # the assertion below names it
            box["error"] = exc
        box["done_at"] = time.monotonic()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, box


def test_a_hung_call_blocks_until_the_release_time_and_other_calls_go_on():
    fault = {"kind": "hang", "function": "nvmlDeviceGetTotalEnergyConsumption", "at_s": 1.0, "release_s": 4.0}
    fake, clock = make(CONST_300, faults=[fault], energy_offset_j=0.0)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 1.5)
    th, box = _call_in_thread(lambda: fake.nvmlDeviceGetTotalEnergyConsumption(h))
    deadline = time.monotonic() + 5
    while fake.hung_now == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert fake.hung_now == 1
    assert fake.nvmlDeviceGetPowerUsage(h) == 300_000       # other functions answer meanwhile
    at(clock, fake, 3.9)
    th.join(0.05)
    assert th.is_alive()                                     # still hung before the release time
    at(clock, fake, 4.0)
    th.join(5)
    assert not th.is_alive() and box["value"] == 1_200_000   # returns the value at release
    assert (fake.hung_now, fake.hangs_total) == (0, 1)
    at(clock, fake, 5.0)                                     # calls after the fault window do not hang
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) == 1_500_000


def test_a_call_that_hangs_forever_returns_only_when_released():
    fault = {"kind": "hang", "function": "nvmlDeviceGetFieldValues", "gpu": 0}
    fake, clock = make(CONST_300, faults=[fault])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    th, box = _call_in_thread(lambda: fake.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_POWER_INSTANT]))
    clock.advance(1e6)
    th.join(0.1)
    assert th.is_alive() and fake.hung_now == 1
    fake.release_hangs()
    th.join(5)
    assert not th.is_alive() and box["value"][0].value.uiVal == 300_000


# -- init and discovery -----------------------------------------------------------------------------

def test_init_fails_for_the_first_5s_then_succeeds():
    fake, clock = make(CONST_300, faults=[{"kind": "driver_not_loaded", "for_s": 5.0}])
    for t in (0.0, 2.5, 4.999):
        at(clock, fake, t)
        with pytest.raises(nv.NVMLError_DriverNotLoaded):
            fake.nvmlInit()
    at(clock, fake, 5.0)
    fake.nvmlInit()
    assert fake.nvmlDeviceGetCount() == 1


def test_slow_discovery_and_a_hung_init_use_the_injected_clock():
    faults = [{"kind": "slow_call", "function": "nvmlDeviceGetCount", "delay_s": 2.0},
              {"kind": "slow_call", "function": "nvmlInit", "delay_s": 1.5}]
    fake, clock = make(CONST_300, faults=faults)
    t = clock.now()
    fake.nvmlInit()
    assert clock.now() == pytest.approx(t + 1.5)
    assert fake.nvmlDeviceGetCount() == 1
    assert clock.now() == pytest.approx(t + 3.5)

    fake, clock = make(CONST_300, faults=[{"kind": "hang", "function": "nvmlInit", "release_s": 10.0}])
    th, box = _call_in_thread(fake.nvmlInit)
    th.join(0.05)
    assert th.is_alive()
    at(clock, fake, 10.0)
    th.join(5)
    assert not th.is_alive() and "error" not in box
    assert fake.nvmlDeviceGetCount() == 1


# -- scenario files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ({"sensor": {"instant_kind": "boxed"}}, "gpu[0].sensor.instant_kind: unknown 'boxed'; expected one of box, sample"),
    ({"sensor": {"field_timestamp": "now"}}, "gpu[0].sensor.field_timestamp: unknown 'now'; expected one of refresh, read"),
    ({"sensor": {"function_latency_s": {"nvmlDeviceGetTotalEnergy": 0.05}}},
     "gpu[0].sensor.function_latency_s.nvmlDeviceGetTotalEnergy: 'nvmlDeviceGetTotalEnergy' is not a pynvml function; "
     "did you mean 'nvmlDeviceGetTotalEnergyConsumption'?"),
    ({"sensor": {"function_latency_s": {"nvmlDeviceGetPowerUsage": -1}}},
     "gpu[0].sensor.function_latency_s.nvmlDeviceGetPowerUsage: -1 is out of range; must be >= 0"),
])
def test_bad_sensor_options_are_one_line_errors(body, message):
    with pytest.raises(ScenarioError) as info:
        Scenario.from_dict({"gpu": [{"model": "NVIDIA H100 80GB HBM3", **body}]}, source="s.toml")
    assert str(info.value) == f"scenario s.toml: {message}"


def test_bad_fault_options_are_one_line_errors():
    with pytest.raises(ScenarioError) as info:
        Scenario.from_dict({"gpu": [{}], "fault": [{"kind": "hang", "function": "nvmlInit", "at_s": 5, "release_s": 2}]},
                           source="s.toml")
    assert str(info.value) == "scenario s.toml: fault[0].release_s: 2 is out of range; must be >= 5"
    with pytest.raises(ScenarioError) as info:
        Scenario.from_dict({"gpu": [{}], "fault": [{"kind": "counter_stall"}]}, source="s.toml")
    assert str(info.value) == "scenario s.toml: fault[0].at_s: required; add it"


def test_toml_and_json_files_carry_the_new_options(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('''
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
[gpu.sensor]
instant_kind = "sample"
instant_refresh_s = 0.1
field_timestamp = "read"
function_latency_s = { nvmlDeviceGetTotalEnergyConsumption = 0.05 }
[[fault]]
kind = "counter_stall"
at_s = 4
for_s = 2
[[fault]]
kind = "hang"
function = "nvmlDeviceGetTotalEnergyConsumption"
at_s = 1
for_s = 0.5
release_s = 3
''')
    a = Scenario.load(toml)
    import json
    js = tmp_path / "s.json"
    js.write_text(json.dumps({"gpu": [{"model": "NVIDIA H100 80GB HBM3", "sensor": {
        "instant_kind": "sample", "instant_refresh_s": 0.1, "field_timestamp": "read",
        "function_latency_s": {"nvmlDeviceGetTotalEnergyConsumption": 0.05}}}],
        "fault": [{"kind": "counter_stall", "at_s": 4, "for_s": 2},
                  {"kind": "hang", "function": "nvmlDeviceGetTotalEnergyConsumption", "at_s": 1, "for_s": 0.5,
                   "release_s": 3}]}))
    b = Scenario.load(js)
    for s in (a, b):
        sensor = s.gpus[0].sensor
        assert (sensor.instant_kind, sensor.field_timestamp, sensor.instant_refresh_s) == ("sample", "read", 0.1)
        assert sensor.latency_s("nvmlDeviceGetTotalEnergyConsumption") == 0.05
        assert sensor.latency_s("nvmlDeviceGetPowerUsage") == 0.0
        assert [(f.kind, f.at_s, f.end_s, f.release_s) for f in s.faults] == [
            ("counter_stall", 4.0, 6.0, math.inf), ("hang", 1.0, 1.5, 3.0)]
