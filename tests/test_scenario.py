"""Scenario files, traces and their exact integrals (the fake's ground truth)."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import uuid

import pytest

from wattmeter.errors import ScenarioError
from wattmeter.sim.scenario import (ConstantTrace, PiecewiseLinearTrace, RampTrace, Scenario, SquareTrace,
                                        StepsTrace, _uuid4_text, bundled_scenarios, load_scenario, parse_smi_csv)

SMI_LOG = """timestamp, index, power.draw [W]
2024/05/01 12:00:00.123, 0, 312.45 W
2024/05/01 12:00:00.125, 1, 80.00 W
2024/05/01 12:00:00.223, 0, 320.00 W
2024/05/01 12:00:00.224, 1, [N/A]
2024/05/01 12:00:00.323, 0, 100.00 W
2024/05/01 12:00:00.325, 1, 90.00 W
"""


def numeric_integral(trace, t0: float, t1: float, n: int = 200_000) -> float:
    """Midpoint rule: the independent reference the closed forms are checked against."""
    dt = (t1 - t0) / n
    return sum(trace.power_w(t0 + (i + 0.5) * dt) for i in range(n)) * dt


TRACES = {
    "constant": ConstantTrace(312.5),
    "square": SquareTrace(650, 90, 0.15, 0.25, phase_s=0.07),
    "ramp": RampTrace(80, 700, 7.5),
    "steps": StepsTrace([(0.0, 120), (1.3, 610), (4.05, 250), (9.9, 640)]),
    "replay": PiecewiseLinearTrace([0, 0.1, 0.25, 0.4, 0.9], [70, 400, 650, 610, 90]),
    "replay-loop": PiecewiseLinearTrace([0, 0.1, 0.25, 0.4, 0.9], [70, 400, 650, 610, 90], loop=True),
}


@pytest.mark.parametrize("kind", sorted(TRACES))
@pytest.mark.parametrize("window", [(0.0, 12.345), (-1.5, 3.21), (2.003, 2.004), (5.5, 5.5)])
def test_trace_integral_matches_fine_numeric_integration(kind, window):
    trace = TRACES[kind]
    t0, t1 = window
    exact = trace.integral(t0, t1)
    # the midpoint rule errs by up to dt * jump at each edge, hence 1e-4
    assert exact == pytest.approx(numeric_integral(trace, t0, t1), rel=1e-4, abs=1e-6)
    assert trace.integral(t1, t0) == pytest.approx(-exact)   # signed, so windows compose


def test_square_integral_is_closed_form_over_many_periods():
    bursty = SquareTrace(650, 90, 0.150, 0.250)
    # a million periods: exact mean 300 W, no drift from summing periods one by one
    assert bursty.integral(0.0, 400_000.0) == pytest.approx(300.0 * 400_000.0, rel=1e-12)
    assert bursty.integral(1e5 + 0.05, 1e5 + 0.10) == pytest.approx(650 * 0.05, rel=1e-9)


def test_ramp_holds_after_reaching_target():
    ramp = RampTrace(100, 1100, 10)
    assert ramp.power_w(-3) == 100 and ramp.power_w(5) == 600 and ramp.power_w(50) == 1100
    assert ramp.integral(10, 20) == pytest.approx(11_000)


def test_looping_replay_repeats_without_a_seam_jump():
    trace = PiecewiseLinearTrace([0, 1, 2], [100, 300, 200], loop=True)   # period 3 s: 2->3 ramps back
    assert trace.period_s == 3.0
    assert trace.power_w(2.5) == pytest.approx(150)
    assert trace.power_w(7.0) == pytest.approx(trace.power_w(1.0))
    assert trace.integral(0, 300) == pytest.approx(100 * trace.integral(0, 3))


def test_replay_parses_real_nvidia_smi_csv_per_gpu_index():
    times0, powers0 = parse_smi_csv(SMI_LOG, index=0)
    assert powers0 == [312.45, 320.0, 100.0]
    assert times0 == pytest.approx([0.0, 0.1, 0.2])
    times1, powers1 = parse_smi_csv(SMI_LOG, index=1)
    assert powers1 == [80.0, 90.0]               # the [N/A] row is skipped, not read as 0 W
    assert times1 == pytest.approx([0.0, 0.2])


def test_replay_accepts_noheader_nounits_logs():
    times, powers = parse_smi_csv("2024/05/01 12:00:00.000, 0, 50.5\n2024/05/01 12:00:01.000, 0, 60\n")
    assert times == [0.0, 1.0] and powers == [50.5, 60.0]


def test_replay_file_is_resolved_next_to_the_scenario(tmp_path):
    (tmp_path / "log.csv").write_text(SMI_LOG)
    (tmp_path / "s.toml").write_text('[[gpu]]\n[gpu.trace]\nkind = "replay"\nfile = "log.csv"\nindex = 0\n')
    trace = load_scenario(tmp_path / "s.toml").gpus[0].trace
    assert trace.power_w(0.05) == pytest.approx((312.45 + 320.0) / 2)   # linear interpolation
    assert trace.power_w(99) == 100.0                                    # holds the last sample


def test_bad_replay_row_names_file_and_line(tmp_path):
    (tmp_path / "log.csv").write_text("timestamp, index, power.draw [W]\n2024/05/01 12:00:00.1, 0, lots W\n")
    (tmp_path / "s.toml").write_text('[[gpu]]\n[gpu.trace]\nkind = "replay"\nfile = "log.csv"\n')
    with pytest.raises(ScenarioError, match=r"gpu\[0\]\.trace\.file: log\.csv line 2: bad power 'lots W'"):
        load_scenario(tmp_path / "s.toml")


def write(tmp_path, text: str, name: str = "h100.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("body, message", [
    ('[[gpu]]\n[[gpu]]\n[gpu.trace]\nkind = "sqare"\n',
     "scenario h100.toml: gpu[1].trace.kind: unknown 'sqare'; expected one of constant, square, ramp, steps, replay"),
    ('[[gpu]]\n[gpu.sensor]\ncounter_refesh_s = 0.1\n',
     "scenario h100.toml: gpu[0].sensor.counter_refesh_s: unknown key; did you mean 'counter_refresh_s'?"),
    ('[[gpu]]\npower_limit_w = "700"\n', "scenario h100.toml: gpu[0].power_limit_w: expected a number, got a string"),
    ('[[gpu]]\n[gpu.trace]\nkind = "square"\nhigh_w = 600\nlow_w = 90\nhigh_s = 0.1\n',
     "scenario h100.toml: gpu[0].trace.low_s: required; add it"),
    ('[[gpu]]\n[[fault]]\nkind = "gpu_lost"\ngpu = 3\nat_s = 1\n',
     "scenario h100.toml: fault[0].gpu: no GPU 3; the scenario has 1 (indices from 0)"),
    ('[[gpu]]\n[[fault]]\nkind = "slow_call"\nfunction = "nvmlDeviceGetPowerUsag"\ndelay_s = 1\n',
     "scenario h100.toml: fault[0].function: 'nvmlDeviceGetPowerUsag' is not a pynvml function; "
     "did you mean 'nvmlDeviceGetPowerUsage'?"),
    ('[[gpu]]\nmodel = "Acme X1"\n', "scenario h100.toml: gpu[0].architecture: required; model 'Acme X1'"),
    ('[[gpu]]\n[gpu.sensor]\npower_usage = "avg"\n',
     "scenario h100.toml: gpu[0].sensor.power_usage: unknown 'avg'; expected one of average_1s, instant"),
    ('[[gpu]]\n[[gpu.process]]\npid = 1\nsm_util = 130\n',
     "scenario h100.toml: gpu[0].process[0].sm_util: 130 is out of range; must be <= 100"),
    ('sed = 4\n', "scenario h100.toml: sed: unknown key; did you mean 'seed'?"),
    ('[[gpu\n', "scenario h100.toml: not valid TOML"),
])
def test_loader_errors_are_one_line_with_field_path_and_fix(tmp_path, body, message):
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, body))
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_missing_file_lists_bundled_names(tmp_path):
    with pytest.raises(ScenarioError, match="file not found.*bursty"):
        load_scenario(tmp_path / "nope.toml")


def test_json_scenarios_use_the_same_schema(tmp_path):
    data = {"seed": 2, "gpu": [{"model": "NVIDIA A100-SXM4-80GB", "trace": {"kind": "constant", "power_w": 250}}],
            "fault": [{"kind": "counter_reset", "at_s": 3}]}
    scenario = load_scenario(write(tmp_path, json.dumps(data), "s.json"))
    gpu = scenario.gpus[0]
    assert (gpu.architecture, gpu.memory_total_mib, gpu.power_limit_w) == ("ga100", 81920, 400)
    assert scenario.faults[0].kind == "counter_reset" and scenario.faults[0].gpu is None


def test_architecture_defaults_follow_the_nvml_facts(tmp_path):
    s = load_scenario(write(tmp_path, '[[gpu]]\nmodel = "NVIDIA A100-SXM4-40GB"\n[[gpu]]\n'
                                      '[[gpu]]\nmodel = "Tesla P100-PCIE-16GB"\n[[gpu]]\nmodel = "NVIDIA A10"\n'))
    a100, h100, p100, a10 = s.gpus
    assert (a100.sensor.power_usage, a100.sensor.instant_field, a100.sensor.energy_counter) == ("instant", True, True)
    assert (h100.sensor.power_usage, h100.model) == ("average_1s", "NVIDIA H100 80GB HBM3")
    assert (p100.sensor.energy_counter, p100.sensor.instant_field, p100.sensor.power_usage) == (False, False, "instant")
    assert (a10.architecture, a10.sensor.power_usage) == ("ampere", "average_1s")
    for g in s.gpus:
        assert 0 <= g.sensor.counter_phase_s < g.sensor.counter_refresh_s
        assert g.energy_offset_j > 0          # counters count since driver load, never from 0


def test_identity_is_deterministic_from_seed(tmp_path):
    one = load_scenario(write(tmp_path, "seed = 9\n[[gpu]]\n[[gpu]]\n"))
    again = load_scenario(write(tmp_path, "seed = 9\n[[gpu]]\n[[gpu]]\n"))
    other = load_scenario(write(tmp_path, "seed = 10\n[[gpu]]\n[[gpu]]\n"))
    assert [g.uuid for g in one.gpus] == [g.uuid for g in again.gpus]
    assert one.gpus[0].uuid != one.gpus[1].uuid != other.gpus[1].uuid
    assert one.gpus[0].uuid.startswith("GPU-") and len(one.gpus[0].uuid) == 40


@pytest.mark.parametrize("bits", [0, 2**128 - 1, *(random.Random(7).getrandbits(128) for _ in range(20))])
def test_gpu_uuids_read_as_the_uuid_module_prints_them(bits):
    assert _uuid4_text(bits) == str(uuid.UUID(int=bits, version=4))


def test_simulated_gpus_start_without_imports_only_other_paths_need():
    # Meter() start latency: uuid (imports platform), statistics and difflib are imported lazily.
    code = ("import sys; before = set(sys.modules)\n"
            "from wattmeter.sim import fake_nvml, scenario\n"
            "fake_nvml.build_module(fake_nvml.FakeNVML(scenario.load_scenario('bursty')))\n"
            "print(sorted({'uuid', 'statistics', 'difflib'} & (set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_default_scenario_is_n_busy_h100s_with_varying_power():
    s = Scenario.default(4)
    assert len(s.gpus) == 4 and len({g.uuid for g in s.gpus}) == 4
    for g in s.gpus:
        samples = [g.trace.power_w(t / 10) for t in range(1200)]
        assert min(samples) < 300 < 600 < max(samples) <= g.power_limit_w
        assert 350 < g.trace.integral(0, 120) / 120 < 650
        assert g.processes and g.processes[0].active(10.0)
    assert Scenario.default(4).gpus[2].uuid == s.gpus[2].uuid


@pytest.mark.parametrize("name", bundled_scenarios())
def test_bundled_scenarios_load(name):
    scenario = load_scenario(name)
    assert scenario.gpus and scenario.description


def test_bundled_bursty_wave_averages_300_w():
    gpu = load_scenario("bursty").gpus[0]
    assert gpu.trace.integral(0, 40) / 40 == pytest.approx(300.0)
    assert {gpu.trace.power_w(0.1), gpu.trace.power_w(0.3)} == {650.0, 90.0}


def test_bundled_replay_skips_na_rows_and_loops():
    s = load_scenario("replay")
    assert s.gpus[0].trace.kind == "replay" and s.gpus[0].trace.loop
    assert math.isfinite(s.gpus[1].trace.integral(0, 1000))
    assert 50 < s.gpus[1].trace.power_w(1.0) < 100        # idle start of the log
