"""The cadence contract of sensors/base.py, passed by every sensor: NVML on the fake (counter and
power-only GPUs, and the late-appearing wrapper), RAPL on powercap fixtures, the CPU and RAM
models. The sampler deals with each only through ``scheduled(sensor)``."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from wattmeter.clock import VirtualClock
from wattmeter.ledger import Ledger
from wattmeter.model import Batch
from wattmeter.sampler import MIN_INTERVAL_S, Sampler
from wattmeter.sensors.base import ScheduledSensor, Sensor, SteadyCadence, scheduled
from wattmeter.sensors.cpu import CpuModelSensor
from wattmeter.sensors.late import LateNvmlSensor
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sensors.ram import RamModelSensor
from wattmeter.sensors.rapl import RaplSensor
from wattmeter.sim.fake_nvml import FakeNVML, build_module
from wattmeter.sim.scenario import Scenario

from test_cpu_model import FakePsutil, probe_for

H100 = "NVIDIA H100 80GB HBM3"
POWERCAP = Path(__file__).parent / "fixtures" / "powercap"


def _nvml(clock, sensor_spec=None):
    gpu = {"model": H100, "trace": {"kind": "constant", "power_w": 200.0}}
    if sensor_spec:
        gpu["sensor"] = sensor_spec
    fake = FakeNVML(Scenario.from_dict({"gpu": [gpu]}), clock)
    return NvmlSensor(build_module(fake), GpuSelection(None), wall=clock.wall, clock=clock)


def _late(clock):
    late = LateNvmlSensor("nvml", lambda: _nvml(clock), clock, 0.1)
    assert late.wait(5.0)
    return late


def _rapl(clock, tmp_path):
    root = tmp_path / "intel_2s"
    shutil.copytree(POWERCAP / "intel_2s", root)
    return RaplSensor(str(root))


def _cpu(clock, tmp_path):
    return CpuModelSensor(probe=probe_for(tmp_path, "v2_container", set(range(4))), psutil_mod=FakePsutil(4))


def _ram(clock, tmp_path):
    return RamModelSensor(total_bytes=16 << 30, probe=probe_for(tmp_path, "v2_container", set(range(4))))


SENSORS = {
    "nvml-counter": lambda clock, tmp: _nvml(clock),
    "nvml-power-only": lambda clock, tmp: _nvml(clock, {"energy_counter": False}),
    "nvml-late": lambda clock, tmp: _late(clock),
    "rapl": _rapl,
    "cpu-model": _cpu,
    "ram-model": _ram,
}


@pytest.mark.parametrize("kind", sorted(SENSORS))
def test_every_sensor_keeps_the_cadence_contract(kind, tmp_path):
    clock = VirtualClock(start=10.0)
    sensor = SENSORS[kind](clock, tmp_path)
    assert isinstance(sensor, Sensor)
    cadence = scheduled(sensor)
    assert isinstance(cadence, ScheduledSensor)
    # NVML declares a cadence of its own; the host sensors are read steadily.
    assert (cadence is sensor) == kind.startswith("nvml")
    assert cadence.min_period_s >= MIN_INTERVAL_S
    assert math.isfinite(cadence.period_s) and cadence.period_s >= cadence.min_period_s
    keys = [d.key for d in cadence.devices()]
    assert keys and len(keys) == len(set(keys))
    # --interval reaches it, never below what it supports.
    cadence.set_period(0.5)
    assert cadence.min_period_s <= cadence.period_s <= 0.5
    cadence.set_period(cadence.min_period_s / 10)
    assert cadence.period_s >= cadence.min_period_s
    # Reads are dated on the clock passed in (no clock of its own), at or before the read.
    for fast in (False, True, False):
        clock.advance(0.2)
        now = clock.now()
        batch = cadence.read(now, fast)
        assert isinstance(batch, Batch)
        assert all(r.device_key in keys and now - 2.0 <= r.t <= now + 1e-9 for r in batch.readings)
        wish = cadence.next_read_at(now)
        assert wish is None or (math.isfinite(wish) and wish >= now - 0.5)
        assert isinstance(cadence.wants_fast(now), bool)
    assert isinstance(cadence.fast_edges, bool)
    cadence.close()


def test_sampler_applies_the_interval_to_every_sensor_and_exposes_the_floor(tmp_path):
    clock = VirtualClock(start=10.0)
    sensors = [_nvml(clock), _ram(clock, tmp_path)]
    sampler = Sampler(sensors, Ledger(), clock, interval_s=0.25)
    assert sampler.cadence(sensors[0]).period_s == 0.25
    assert isinstance(sampler.cadence(sensors[1]), SteadyCadence)
    assert sampler.cadence(sensors[1]).period_s == 0.25
    assert sampler.min_interval_s == MIN_INTERVAL_S
