"""RAPL through checked-in fake powercap trees (copied to tmp so tests can move counters)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from wattmeter.model import Component, Source
from wattmeter.sensors.base import Sensor, SensorUnavailable
from wattmeter.sensors.rapl import RaplSensor

FIXTURES = Path(__file__).parent / "fixtures" / "powercap"


@pytest.fixture
def tree(tmp_path: Path):
    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return dst
    return copy


def set_uj(root: Path, zone: str, value: int) -> None:
    (root / zone / "energy_uj").write_text(f"{value}\n")


def energies(batch) -> dict[str, float]:
    return {r.device_key: r.energy_j for r in batch.readings}


def test_two_socket_intel_uses_packages_and_dram_only(tree):
    root = tree("intel_2s")
    s = RaplSensor(str(root))
    assert isinstance(s, Sensor)
    devs = {d.key: d for d in s.devices()}
    assert set(devs) == {"cpu.package-0", "cpu.package-1", "ram.dram-0", "ram.dram-1"}
    assert devs["cpu.package-0"].component is Component.CPU
    assert devs["ram.dram-1"].component is Component.RAM
    assert all(d.source is Source.COUNTER for d in devs.values())
    assert devs["cpu.package-1"].labels == {"domain": "package-1"}
    assert devs["ram.dram-0"].labels == {"domain": "dram-0"}
    assert all(d.update_period_s == s.period_s for d in devs.values())  # windows resolve between reads
    skipped = {z.name: z.note for z in s.zones if z.device_key is None}
    assert "double count" in skipped["psys"]
    assert "inside package-0" in skipped["core"]


def test_energy_is_the_sum_of_non_overlapping_zones(tree):
    root = tree("intel_2s")
    s = RaplSensor(str(root))
    s.read(0.0)
    # 10 J more in each package, 2 J in each dram; core (inside package) and psys (everything) move too
    for zone, start, add in [("intel-rapl:0", 120000000, 10), ("intel-rapl:1", 110000000, 10),
                             ("intel-rapl:0:0", 30000000, 2), ("intel-rapl:1:0", 25000000, 2),
                             ("intel-rapl:0:1", 90000000, 8), ("intel-rapl:2", 400000000, 24),
                             ("intel-rapl-mmio:0", 120000000, 10)]:
        set_uj(root, zone, start + add * 1_000_000)
    e = energies(s.read(1.0))
    assert sum(e.values()) == pytest.approx(24.0)  # = psys: nothing counted twice
    assert e["cpu.package-0"] == pytest.approx(10.0)
    assert e["ram.dram-1"] == pytest.approx(2.0)


def test_counter_wrap_keeps_energy_monotonic_and_correct(tree):
    root = tree("amd_zen")
    rng = 65712999613
    set_uj(root, "intel-rapl:0", rng - 3_000_000)  # 3 J before the wrap
    s = RaplSensor(str(root))
    first = s.read(10.0).readings[0]
    set_uj(root, "intel-rapl:0", 2_000_000)        # wrapped, then 2 J more
    second = s.read(11.0).readings[0]
    set_uj(root, "intel-rapl:0", 7_000_000)
    third = s.read(12.0).readings[0]
    assert first.energy_j <= second.energy_j <= third.energy_j
    assert second.energy_j - first.energy_j == pytest.approx(5.0)
    assert second.power_w == pytest.approx(5.0)
    assert third.energy_j - first.energy_j == pytest.approx(10.0)


def test_psys_only_platform_reports_psys_as_cpu(tree):
    s = RaplSensor(str(tree("psys_only")))
    (dev,) = s.devices()
    assert dev.key == "cpu.psys" and dev.component is Component.CPU
    assert dev.labels == {"domain": "psys"}


def test_amd_zen_has_package_and_no_dram(tree):
    s = RaplSensor(str(tree("amd_zen")))
    assert [d.key for d in s.devices()] == ["cpu.package-0"]
    assert not any(d.component is Component.RAM for d in s.devices())


def test_subzones_nested_inside_their_package_are_found(tree):
    root = tree("intel_2s")
    for sub in ("intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:1:0"):
        parent = root / sub.rsplit(":", 1)[0]
        shutil.move(str(root / sub), str(parent / sub))
    s = RaplSensor(str(root))
    assert {d.key for d in s.devices()} == {"cpu.package-0", "cpu.package-1", "ram.dram-0", "ram.dram-1"}


def test_missing_powercap_dir_is_unavailable_with_a_fix(tmp_path):
    with pytest.raises(SensorUnavailable) as info:
        RaplSensor(str(tmp_path / "nope"))
    assert info.value.sensor == "rapl"
    assert "does not exist" in info.value.reason
    assert "modprobe intel_rapl_msr" in info.value.fix and "CPU model" in info.value.fix


def test_powercap_without_rapl_zones_is_unavailable(tree):
    with pytest.raises(SensorUnavailable) as info:
        RaplSensor(str(tree("no_zones")))
    assert "no RAPL package or psys zone" in info.value.reason


def _permission_fix_ok(exc: SensorUnavailable) -> None:
    assert "permission denied" in exc.reason and "energy_uj" in exc.reason
    assert "CVE-2020-8694" in exc.fix
    assert "deploy/systemd/wattmeter-powercap.service" in exc.fix


def test_root_only_energy_file_gives_the_cve_fix_via_opener(tree):
    root = tree("intel_2s")

    def opener(path: str) -> str:
        if path.endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", path)
        with open(path) as f:
            return f.read().strip()

    with pytest.raises(SensorUnavailable) as info:
        RaplSensor(str(root), read_text=opener)
    _permission_fix_ok(info.value)


def test_root_only_energy_file_gives_the_cve_fix_via_chmod(tree):
    root = tree("intel_2s")
    target = root / "intel-rapl:0" / "energy_uj"
    target.chmod(0)
    try:
        if os.access(target, os.R_OK):
            pytest.skip("running as root: chmod 000 does not deny reads (covered by the opener test)")
        with pytest.raises(SensorUnavailable) as info:
            RaplSensor(str(root))
        _permission_fix_ok(info.value)
    finally:
        target.chmod(0o644)


def test_failing_zone_is_reported_not_raised(tree):
    root = tree("intel_2s")
    s = RaplSensor(str(root))
    s.read(0.0)
    (root / "intel-rapl:1" / "energy_uj").write_text("garbage\n")
    batch = s.read(0.5)
    assert "cpu.package-1" not in energies(batch)
    assert "cpu.package-0" in energies(batch)
    (err,) = batch.errors
    assert err.sensor == "rapl" and err.device_key == "cpu.package-1" and err.kind == "read_failed"


def test_period_is_shortened_when_a_zone_could_wrap_between_reads(tree):
    root = tree("amd_zen")
    (root / "intel-rapl:0" / "max_energy_range_uj").write_text("3000000\n")     # 3 J range
    (root / "intel-rapl:0" / "constraint_0_max_power_uw").write_text("1000000\n")  # at 1 W: wraps in 3 s
    s = RaplSensor(str(root), period_s=5.0)
    assert s.wrap_s == pytest.approx(3.0)
    assert s.period_s == pytest.approx(1.0)
    assert RaplSensor(str(tree("intel_2s"))).period_s == 1.0
