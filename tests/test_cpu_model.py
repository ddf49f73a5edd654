"""The modelled CPU sensor: TDP lookup, scaling to visible CPUs, utilisation from CPU-time deltas."""
from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from wattmeter.model import Component, Source
from wattmeter.sensors.base import Sensor
from wattmeter.sensors.cpu import DEFAULT_W_PER_CORE, CpuModelSensor, PerCpuCounters
from wattmeter.sensors.host_probe import HostProbe, TdpSpec, lookup_tdp

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")


class FakePsutil:
    """psutil.cpu_times(percpu=True) over CPUs whose busy/idle seconds tests advance by hand."""

    def __init__(self, n_cpus: int) -> None:
        self.busy = [0.0] * n_cpus
        self.idle = [0.0] * n_cpus

    def run(self, seconds: float, busy: dict[int, float] | float = 0.0) -> None:
        """Advance wall time; ``busy`` is a utilisation per CPU (or one for all)."""
        for i in range(len(self.busy)):
            u = busy.get(i, 0.0) if isinstance(busy, dict) else busy
            self.busy[i] += seconds * u
            self.idle[i] += seconds * (1 - u)

    def cpu_times(self, percpu: bool = False):
        assert percpu
        # split busy into user/system, and put guest time inside user as Linux does
        return [CpuTimes(b * 0.8, 0.0, b * 0.2, i, 0.0, 0.0, 0.0, 0.0, b * 0.1, 0.0)
                for b, i in zip(self.busy, self.idle)]


def probe_for(tmp_path: Path, case: str, affinity: set[int]) -> HostProbe:
    root = tmp_path / case
    shutil.copytree(FIXTURES / case, root)
    return HostProbe(proc=str(root / "proc"), cgroup_root=str(root / "cgroupfs"), affinity=lambda: affinity)


def bare_metal_probe(tmp_path: Path, model: str, sockets: int, cores: int, tpc: int) -> HostProbe:
    blocks, n = [], 0
    for s in range(sockets):
        for _ in range(tpc):
            for c in range(cores):
                blocks.append(f"processor\t: {n}\nmodel name\t: {model}\nphysical id\t: {s}\n"
                              f"siblings\t: {cores * tpc}\ncore id\t\t: {c}\ncpu cores\t: {cores}\n")
                n += 1
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text("\n".join(blocks))
    return HostProbe(proc=str(tmp_path / "proc"), cgroup_root=str(tmp_path / "no-cgroup"), affinity=lambda: set(range(n)))


def power(batch) -> float:
    (r,) = batch.readings
    assert r.device_key == "cpu" and r.energy_j is None
    return r.power_w


def test_vm_with_known_cpu_is_charged_its_share_of_the_socket(tmp_path):
    # 8 vCPUs (4 cores × 2 threads) of an EPYC 7763 (280 W, 64 cores): 280/64/2 = 2.1875 W per vCPU
    probe = probe_for(tmp_path, "v2_container", set(range(8)))
    (Path(probe.cgroup_root) / "cpu.max").write_text("max 100000\n")  # no CPU quota
    ps = FakePsutil(8)
    s = CpuModelSensor(probe=probe, psutil_mod=ps)
    assert isinstance(s.cpu_counters, PerCpuCounters)
    assert isinstance(s, Sensor)
    assert s.peak.watts == pytest.approx(17.5)
    assert "EPYC 7763" in s.peak.basis
    ps.run(1.0, busy=0.0)
    assert power(s.read(1.0)) == pytest.approx(0.3 * 17.5)      # idle floor
    ps.run(1.0, busy=1.0)
    assert power(s.read(2.0)) == pytest.approx(17.5)            # flat out = TDP share
    ps.run(1.0, busy=0.5)
    assert power(s.read(3.0)) == pytest.approx(17.5 * (0.3 + 0.7 * 0.5))


def test_bare_metal_with_every_cpu_visible_gives_back_tdp_per_socket(tmp_path):
    probe = bare_metal_probe(tmp_path, "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", 2, 20, 2)
    ps = FakePsutil(80)
    s = CpuModelSensor(probe=probe, psutil_mod=ps)
    assert s.peak.watts == pytest.approx(2 * 150.0)
    ps.run(2.0, busy=1.0)
    assert power(s.read(5.0)) == pytest.approx(300.0)


def test_affinity_mask_scales_peak_and_utilisation_to_those_cpus(tmp_path):
    probe = bare_metal_probe(tmp_path, "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", 2, 20, 2)
    probe.affinity = lambda: {0, 1, 2, 3}
    ps = FakePsutil(80)
    s = CpuModelSensor(probe=probe, psutil_mod=ps)
    assert s.visible_cpus == 4 and "affinity" in s.visible_basis
    assert s.peak.watts == pytest.approx(4 * 150 / 20 / 2)
    # the other 76 CPUs are saturated by someone else; ours are half busy
    ps.run(1.0, busy={**{i: 1.0 for i in range(4, 80)}, **{i: 0.5 for i in range(4)}})
    assert s.read(1.0).readings[0].power_w == pytest.approx(15.0 * (0.3 + 0.7 * 0.5))


def test_cgroup_v2_quota_limits_peak_and_uses_the_containers_own_usage(tmp_path):
    probe = probe_for(tmp_path, "v2_container", set(range(8)))
    ps = FakePsutil(8)
    s = CpuModelSensor(probe=probe, psutil_mod=ps)
    assert s.visible_cpus == 2.0 and "quota" in s.visible_basis
    assert s.peak.watts == pytest.approx(2 * 2.1875)
    # 10 s pass; the container used 15 CPU-s of its 20 (the host's other CPUs are irrelevant)
    ps.run(10.0, busy=1.0)
    (Path(probe.cgroup_root) / "cpu.stat").write_text("usage_usec 20000000\n")
    assert s.utilisation == 0.0
    s.read(10.0)
    assert s.utilisation == pytest.approx(0.75)


def test_cgroup_v1_quota_is_found_under_co_mounted_cpu_cpuacct(tmp_path):
    probe = probe_for(tmp_path, "v1_docker", {0, 1, 2, 3})
    ps = FakePsutil(4)
    s = CpuModelSensor(probe=probe, psutil_mod=ps)
    assert s.visible_cpus == 0.5 and "cgroup v1" in s.visible_basis
    ps.run(4.0)
    (Path(probe.cgroup_root) / "cpu,cpuacct" / "docker" / "abc123" / "cpuacct.usage").write_text("3000000000\n")
    s.read(4.0)
    assert s.utilisation == pytest.approx(0.5)  # 1 CPU-s of 4 s × 0.5 CPU


def test_unknown_cpu_uses_the_stated_per_core_default(tmp_path):
    ps = FakePsutil(2)
    s = CpuModelSensor(probe=probe_for(tmp_path, "v1_unlimited", {0, 1}), psutil_mod=ps)
    assert s.peak.watts == pytest.approx(2 * DEFAULT_W_PER_CORE)
    assert "not in cpu_tdp.json" in s.peak.basis and "default" in s.peak.basis


def test_explicit_tdp_overrides_the_table(tmp_path):
    probe = bare_metal_probe(tmp_path, "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", 1, 20, 2)
    s = CpuModelSensor(tdp_w=100.0, probe=probe, psutil_mod=FakePsutil(40))
    assert s.peak.watts == pytest.approx(100.0)
    assert "given" in s.peak.basis


def test_device_is_tagged_modelled_host_cpu(tmp_path):
    s = CpuModelSensor(probe=probe_for(tmp_path, "v1_unlimited", {0, 1}), psutil_mod=FakePsutil(2))
    (d,) = s.devices()
    assert (d.key, d.component, d.source) == ("cpu", Component.CPU, Source.MODELLED)
    assert d.labels == {"domain": "package"}
    assert s.name == "cpu_model" and s.period_s == 1.0


def test_reads_closer_than_the_kernel_tick_keep_the_last_utilisation(tmp_path):
    ps = FakePsutil(2)
    s = CpuModelSensor(probe=probe_for(tmp_path, "v1_unlimited", {0, 1}), psutil_mod=ps)
    ps.run(1.0, busy=1.0)
    first = power(s.read(1.0))
    ps.run(0.001, busy=0.0)  # 1 ms later: below the counters' resolution
    assert power(s.read(1.001)) == first


def test_failing_counters_are_reported_not_raised(tmp_path):
    class Flaky:
        fail = False

        def read(self):
            if self.fail:
                raise OSError("boom")
            return (0.0, 0.0)

    c = Flaky()
    s = CpuModelSensor(probe=probe_for(tmp_path, "v1_unlimited", {0, 1}), psutil_mod=FakePsutil(2), counters=c)
    c.fail = True
    batch = s.read(1.0)
    assert not batch.readings
    assert batch.errors[0].device_key == "cpu" and batch.errors[0].sensor == "cpu_model"


def test_real_host_constructs_and_reads(tmp_path):
    s = CpuModelSensor()
    p = power(s.read(0.0))
    assert s.peak.watts * s.idle_frac <= p <= s.peak.watts


@pytest.mark.parametrize("name, expected", [
    ("AMD EPYC 7763 64-Core Processor", "EPYC 7763"),
    ("AMD EPYC 7543P 32-Core Processor", "EPYC 7543P"),
    ("Intel(R) Xeon(R) Platinum 8480+", "Xeon Platinum 8480"),
    ("Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", "E5-2680 v4"),
    ("Intel(R) Xeon(R) Platinum 8380H CPU @ 2.90GHz", None),   # a different SKU: no false match
    ("AMD EPYC", None),
    (None, None),
])
def test_tdp_lookup_matches_whole_model_numbers(name, expected):
    spec = lookup_tdp(name)
    assert (spec.match if spec else None) == expected


def test_tdp_lookup_prefers_the_longest_match():
    table = [TdpSpec("EPYC 7543", 225, 32), TdpSpec("EPYC 7543 Special", 1, 1)]
    assert lookup_tdp("AMD EPYC 7543 Special Edition", table).tdp_w == 1
