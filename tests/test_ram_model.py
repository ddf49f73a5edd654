"""The modelled RAM sensor: W per GiB of the memory this process can have."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wattmeter.model import Component, Scope, Source
from wattmeter.sensors.base import Sensor
from wattmeter.sensors.host_probe import HostProbe
from wattmeter.sensors.ram import RamModelSensor

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
GIB = 1 << 30


def probe_for(tmp_path: Path, case: str) -> HostProbe:
    root = tmp_path / case
    shutil.copytree(FIXTURES / case, root)
    return HostProbe(proc=str(root / "proc"), cgroup_root=str(root / "cgroupfs"))


def power(s: RamModelSensor, t: float) -> float:
    (r,) = s.read(t).readings
    assert r.device_key == "ram" and r.t == t and r.energy_j is None
    return r.power_w


def test_host_without_limit_uses_total_memory_at_ccf_coefficient(tmp_path):
    s = RamModelSensor(probe=probe_for(tmp_path, "v1_unlimited"), total_bytes=16 * GIB)
    assert isinstance(s, Sensor)
    assert power(s, 1.0) == pytest.approx(0.392 * 16)
    assert power(s, 2.0) == pytest.approx(0.392 * 16)  # constant: capacity, not usage
    assert s.mem_bytes == 16 * GIB


def test_cgroup_v2_memory_limit_caps_the_modelled_memory(tmp_path):
    s = RamModelSensor(probe=probe_for(tmp_path, "v2_container"), total_bytes=64 * GIB)
    assert s.mem_bytes == 4 * GIB
    assert power(s, 0.0) == pytest.approx(0.392 * 4)
    assert "cgroup memory limit" in s.basis


def test_tightest_limit_on_the_cgroup_path_wins(tmp_path):
    # the service says "max", its slice says 8 GiB
    s = RamModelSensor(probe=probe_for(tmp_path, "v2_service"), total_bytes=64 * GIB)
    assert s.mem_bytes == 8 * GIB


def test_cgroup_v1_limit_and_unlimited_sentinel(tmp_path):
    assert RamModelSensor(probe=probe_for(tmp_path, "v1_docker"), total_bytes=64 * GIB).mem_bytes == 2 * GIB
    # a limit larger than the machine changes nothing
    assert RamModelSensor(probe=probe_for(tmp_path, "v2_container"), total_bytes=2 * GIB).mem_bytes == 2 * GIB


def test_custom_coefficient(tmp_path):
    s = RamModelSensor(w_per_gb=1.0, probe=probe_for(tmp_path, "v1_unlimited"), total_bytes=8 * GIB)
    assert power(s, 0.0) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        RamModelSensor(w_per_gb=-1, probe=probe_for(tmp_path / "x", "v1_unlimited"), total_bytes=GIB)


def test_device_is_tagged_modelled_host_ram(tmp_path):
    s = RamModelSensor(probe=probe_for(tmp_path, "v1_unlimited"), total_bytes=GIB)
    (d,) = s.devices()
    assert (d.key, d.component, d.source, d.scope) == ("ram", Component.RAM, Source.MODELLED, Scope.HOST)
    assert s.name == "ram_model" and s.period_s == 1.0


def test_real_host_constructs():
    s = RamModelSensor()
    assert s.mem_bytes > 0 and power(s, 0.0) > 0
