"""Process-tree CPU/RSS accounting and the process-scope share of host CPU and RAM energy.

Everything runs on injected counters: no sleeping, nothing timing-sensitive.
"""
from __future__ import annotations

import contextlib
import os
from collections import namedtuple
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattmeter.model import Batch, Component, Device, Reading, Scope, SensorError, Source
from wattmeter.sensors.base import Sensor, SensorUnavailable
from wattmeter.sensors.process import ProcessShareSensor, ProcessTree, TreeSample, cpu_share

GIB = 1 << 30
PCpuTimes = namedtuple("PCpuTimes", "user system children_user children_system")
MemInfo = namedtuple("MemInfo", "rss vms")


# -- a scripted process table with psutil's API ------------------------------------------------
class FakePs:
    class NoSuchProcess(Exception):
        pass

    class AccessDenied(Exception):
        pass

    def __init__(self) -> None:
        self.table: dict[int, dict] = {}
        self.before_read: dict[int, callable] = {}   # pid -> hook run just before that pid is read
        self._ct = 0.0

    # scripting
    def spawn(self, pid: int, ppid: int, rss: int = 0) -> None:
        self._ct += 1
        self.table[pid] = dict(ppid=ppid, ct=self._ct, own=0.0, kids=0.0, rss=rss, denied=False)

    def burn(self, pid: int, seconds: float) -> None:
        self.table[pid]["own"] += seconds

    def reap(self, pid: int) -> None:
        """pid exits and its parent waits for it: the parent's children_* grow by its total."""
        p = self.table.pop(pid)
        if p["ppid"] in self.table:
            self.table[p["ppid"]]["kids"] += p["own"] + p["kids"]

    # psutil API
    def Process(self, pid: int) -> "FakeProc":
        if pid not in self.table:
            raise self.NoSuchProcess(pid)
        return FakeProc(self, pid)


@dataclass
class FakeProc:
    ps: FakePs
    pid: int

    def _row(self) -> dict:
        hook = self.ps.before_read.pop(self.pid, None)
        if hook:
            hook()
        row = self.ps.table.get(self.pid)
        if row is None:
            raise FakePs.NoSuchProcess(self.pid)
        if row["denied"]:
            raise FakePs.AccessDenied(self.pid)
        return row

    def children(self, recursive: bool = False) -> list["FakeProc"]:
        out, frontier = [], [self.pid]
        while frontier:
            parent = frontier.pop(0)
            kids = [pid for pid, r in self.ps.table.items() if r["ppid"] == parent]
            out += [FakeProc(self.ps, k) for k in kids]
            frontier += kids
        return out

    def oneshot(self):
        return contextlib.nullcontext()

    def cpu_times(self) -> PCpuTimes:
        r = self._row()
        return PCpuTimes(r["own"] * 0.75, r["own"] * 0.25, r["kids"] * 0.5, r["kids"] * 0.5)

    def memory_info(self) -> MemInfo:
        return MemInfo(self._row()["rss"], 0)

    def ppid(self) -> int:
        return self._row()["ppid"]

    def create_time(self) -> float:
        return self._row()["ct"]


@pytest.fixture
def ps() -> FakePs:
    ps = FakePs()
    ps.spawn(100, ppid=1, rss=100)
    return ps


# -- ProcessTree ---------------------------------------------------------------------------------
def test_tree_counts_root_and_descendants_cpu_and_rss(ps):
    ps.spawn(101, 100, rss=10)
    ps.spawn(102, 101, rss=1)
    ps.spawn(999, 1, rss=10**9)   # not ours
    tree = ProcessTree(100, psutil_mod=ps)
    ps.burn(100, 1.0), ps.burn(101, 2.0), ps.burn(102, 3.0), ps.burn(999, 50.0)
    s = tree.sample()
    assert s.cpu_s == pytest.approx(6.0)
    assert s.rss_bytes == 111 and s.n_procs == 3 and s.alive


def test_reaped_child_is_not_counted_twice(ps):
    ps.spawn(101, 100)
    tree = ProcessTree(100, psutil_mod=ps)
    ps.burn(101, 5.0)
    assert tree.sample().cpu_s == pytest.approx(5.0)
    ps.burn(101, 1.0)
    ps.reap(101)                                  # root's children_* now hold all 6 s
    assert tree.sample().cpu_s == pytest.approx(6.0)
    ps.burn(100, 2.0)
    assert tree.sample().cpu_s == pytest.approx(8.0)


def test_short_lived_subprocess_between_samples_is_counted(ps):
    tree = ProcessTree(100, psutil_mod=ps)
    tree.sample()
    ps.spawn(101, 100)
    ps.burn(101, 4.0)
    ps.reap(101)                                  # never seen alive: only via children_*
    assert tree.sample().cpu_s == pytest.approx(4.0)


def test_reap_racing_the_read_is_neither_lost_nor_doubled(ps):
    ps.spawn(101, 100)
    tree = ProcessTree(100, psutil_mod=ps)
    ps.burn(101, 5.0)
    tree.sample()
    ps.burn(101, 1.0)
    ps.before_read[101] = lambda: ps.reap(101)    # root already read; the child vanishes under us
    assert tree.sample().cpu_s == pytest.approx(5.0)   # the last second shows up next time
    assert tree.sample().cpu_s == pytest.approx(6.0)
    assert tree.sample().cpu_s == pytest.approx(6.0)


def test_grandchild_reaped_by_child_then_child_by_root(ps):
    ps.spawn(101, 100)
    ps.spawn(102, 101)
    tree = ProcessTree(100, psutil_mod=ps)
    ps.burn(102, 3.0)
    assert tree.sample().cpu_s == pytest.approx(3.0)
    ps.reap(102)
    ps.burn(101, 1.0)
    assert tree.sample().cpu_s == pytest.approx(4.0)
    ps.reap(101)
    assert tree.sample().cpu_s == pytest.approx(4.0)


def test_orphaned_descendant_loses_time_but_never_goes_backwards(ps):
    ps.spawn(101, 100)
    ps.spawn(102, 101)
    tree = ProcessTree(100, psutil_mod=ps)
    ps.burn(102, 3.0)
    first = tree.sample().cpu_s
    ps.table.pop(101)                 # intermediate parent dies; 102 is re-parented to init
    ps.table[102]["ppid"] = 1
    second = tree.sample().cpu_s
    ps.burn(100, 2.0)
    third = tree.sample().cpu_s
    assert first <= second <= third
    assert third - second == pytest.approx(2.0)   # later work by the tree still counts


def test_unreadable_descendant_is_counted_as_denied(ps):
    ps.spawn(101, 100)
    ps.table[101]["denied"] = True
    tree = ProcessTree(100, psutil_mod=ps)
    s = tree.sample()
    assert s.denied == 1 and s.n_procs == 1


def test_root_exit_ends_the_tree_and_freezes_cpu(ps):
    tree = ProcessTree(100, psutil_mod=ps)
    ps.burn(100, 2.0)
    assert tree.sample().cpu_s == pytest.approx(2.0)
    ps.table.pop(100)
    s = tree.sample()
    assert not s.alive and s.cpu_s == pytest.approx(2.0) and s.rss_bytes == 0


def test_reused_pid_is_a_new_process(ps):
    ps.spawn(101, 100)
    tree = ProcessTree(100, psutil_mod=ps)
    ps.burn(101, 5.0)
    tree.sample()
    ps.table.pop(101)                 # exits, reaped by someone outside the tree
    ps.spawn(101, 100)                # same pid, new process
    ps.burn(101, 1.0)
    assert tree.sample().cpu_s == pytest.approx(6.0)


def test_members_are_rescanned_at_most_every_rescan_s_but_counters_stay_fresh(ps, monkeypatch):
    ps.spawn(101, 100)
    tree = ProcessTree(100, psutil_mod=ps, rescan_s=1.0)
    scans = []
    real_children = FakeProc.children
    monkeypatch.setattr(FakeProc, "children", lambda self, recursive=False: scans.append(1) or real_children(self, recursive))
    tree.sample(10.0)
    ps.burn(101, 1.0)
    ps.spawn(102, 100)
    ps.burn(102, 2.0)
    assert tree.sample(10.4).cpu_s == pytest.approx(1.0)   # known members re-read, no rescan
    assert len(scans) == 1
    assert tree.sample(11.0).cpu_s == pytest.approx(3.0)   # rescan finds 102, with all its time
    assert len(scans) == 2
    tree.sample(None)                                      # no clock: always a full scan
    assert len(scans) == 3


def test_missing_or_foreign_root_is_unavailable(ps):
    with pytest.raises(SensorUnavailable, match="no process with pid 4242"):
        ProcessTree(4242, psutil_mod=ps)
    ps.table[100]["denied"] = True
    with pytest.raises(SensorUnavailable, match="permission denied reading pid 100") as info:
        ProcessTree(100, psutil_mod=ps)
    assert "as root" in info.value.fix


def test_real_process_tree_of_this_test():
    s = ProcessTree(os.getpid()).sample()
    assert s.alive and s.cpu_s > 0 and s.rss_bytes > 0 and s.n_procs >= 1


# -- ProcessShareSensor --------------------------------------------------------------------------
@dataclass
class FakeTree:
    cpu_s: float = 0.0
    rss_bytes: int = 0
    denied: int = 0

    def sample(self, now: float | None = None) -> TreeSample:
        return TreeSample(self.cpu_s, self.rss_bytes, 1, self.denied)


@dataclass
class FakeCounters:
    busy: float = 0.0
    cap: float = 0.0

    def read(self) -> tuple[float, float]:
        return self.busy, self.cap


@dataclass
class FakeInner:
    """A host sensor whose next readings tests set: energy (counter) or power per device."""

    devs: list[Device]
    name: str = "rapl"
    period_s: float = 0.5
    energy: dict[str, float] = field(default_factory=dict)
    power: dict[str, float] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)
    closed: bool = False

    def devices(self):
        return self.devs

    def read(self, now: float) -> Batch:
        b = Batch()
        for d in self.devs:
            if d.key in self.failing:
                b.errors.append(SensorError(self.name, "read_failed", d.key))
            else:
                b.readings.append(Reading(d.key, now, energy_j=self.energy.get(d.key), power_w=self.power.get(d.key)))
        return b

    def close(self) -> None:
        self.closed = True


PKG = Device("cpu.package-0", Component.CPU, Source.COUNTER, labels={"domain": "package-0"})
DRAM = Device("ram.dram-0", Component.RAM, Source.COUNTER, labels={"domain": "dram-0"})
GPU = Device("gpu0", Component.GPU, Source.COUNTER)


def job(batch: Batch, key: str) -> Reading:
    (r,) = [r for r in batch.readings if r.device_key == key + ".job"]
    return r


def rapl_setup(**kw):
    inner = FakeInner([PKG, DRAM, GPU], energy={"cpu.package-0": 0.0, "ram.dram-0": 0.0, "gpu0": 0.0})
    tree, counters = FakeTree(), FakeCounters()
    s = ProcessShareSensor(inner, tree, cpu_counters=counters, mem_total_bytes=8 * GIB, **kw)
    return s, inner, tree, counters


def test_job_devices_mirror_host_cpu_and_ram_devices():
    s, inner, *_ = rapl_setup()
    assert isinstance(s, Sensor) and s.inner is inner
    assert s.name == "rapl" and s.period_s == 0.5
    devs = {d.key: d for d in s.devices()}
    assert set(devs) == {"cpu.package-0", "ram.dram-0", "gpu0", "cpu.package-0.job", "ram.dram-0.job"}
    j = devs["cpu.package-0.job"]
    assert (j.scope, j.component, j.source, j.labels) == (Scope.PROCESS, Component.CPU, Source.COUNTER, {"domain": "package-0"})
    assert devs["ram.dram-0.job"].scope is Scope.PROCESS
    assert devs["cpu.package-0"].scope is Scope.HOST


def test_cpu_share_of_measured_energy():
    s, inner, tree, counters = rapl_setup()
    first = s.read(0.0)
    assert job(first, "cpu.package-0").energy_j == 0.0
    assert {r.device_key for r in first.readings} >= {"cpu.package-0", "gpu0"}   # inner readings pass through
    # 1 s on 8 CPUs: host busy 4 CPU-s (u = 0.5), the job 2 CPU-s, package burned 100 J
    inner.energy["cpu.package-0"] = 100.0
    counters.busy, counters.cap, tree.cpu_s = 4.0, 8.0, 2.0
    r = job(s.read(1.0), "cpu.package-0")
    expected = 100.0 * (2 / 8) / (0.3 + 0.7 * 0.5)
    assert r.energy_j == pytest.approx(expected) and r.power_w == pytest.approx(expected)
    # dynamic part by busy share + floor by capacity share: the same number, spelled out
    floor = 0.3 / (0.3 + 0.7 * 0.5)
    assert expected == pytest.approx(100 * ((1 - floor) * 2 / 4 + floor * 2 / 8))


def test_sole_tenant_of_a_fully_busy_host_gets_all_of_it():
    s, inner, tree, counters = rapl_setup()
    s.read(0.0)
    inner.energy["cpu.package-0"] = 50.0
    counters.busy, counters.cap, tree.cpu_s = 8.0, 8.0, 8.0
    assert job(s.read(1.0), "cpu.package-0").energy_j == pytest.approx(50.0)


def test_idle_job_gets_nothing_and_unused_floor_stays_unattributed():
    s, inner, tree, counters = rapl_setup()
    s.read(0.0)
    inner.energy["cpu.package-0"] = 60.0
    counters.busy, counters.cap = 0.0, 8.0
    assert job(s.read(1.0), "cpu.package-0").energy_j == 0.0


def test_tenants_together_never_exceed_the_host():
    # two jobs on one host: 3 and 5 of 6 busy CPU-s is impossible, 2 + 4 = 6 is the maximum
    for c1, c2, busy in [(2.0, 4.0, 6.0), (1.0, 1.0, 2.0), (0.5, 0.0, 8.0)]:
        total = cpu_share(c1, busy, 8.0, 0.3) + cpu_share(c2, busy, 8.0, 0.3)
        assert total <= 1.0 + 1e-12


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 500), st.floats(0, 1), st.floats(0, 1), st.floats(0.01, 5)),
                min_size=1, max_size=20),
       st.floats(0, 1))
def test_conservation_job_never_exceeds_host(steps, idle_frac):
    inner = FakeInner([PKG], energy={"cpu.package-0": 0.0})
    tree, counters = FakeTree(), FakeCounters()
    s = ProcessShareSensor(inner, tree, cpu_counters=counters, idle_frac=idle_frac)
    s.read(0.0)
    t, last_job = 0.0, 0.0
    n_cpus = 4
    for host_j, u, job_frac, dt in steps:
        t += dt
        inner.energy["cpu.package-0"] += host_j
        counters.cap += dt * n_cpus
        counters.busy += dt * n_cpus * u
        tree.cpu_s += dt * n_cpus * u * job_frac
        r = job(s.read(t), "cpu.package-0")
        assert last_job - 1e-9 <= r.energy_j                       # monotonic
        assert r.energy_j - last_job <= host_j + 1e-9              # never more than the host burned
        last_job = r.energy_j
    assert last_job <= inner.energy["cpu.package-0"] + 1e-9


def test_ram_share_is_rss_over_memory():
    s, inner, tree, counters = rapl_setup()
    tree.rss_bytes = 2 * GIB
    s.read(0.0)
    inner.energy["ram.dram-0"] = 40.0
    assert job(s.read(1.0), "ram.dram-0").energy_j == pytest.approx(10.0)
    tree.rss_bytes = 4 * GIB               # mean of the two ends: 3 GiB of 8
    inner.energy["ram.dram-0"] = 80.0
    assert job(s.read(2.0), "ram.dram-0").energy_j == pytest.approx(10.0 + 40.0 * 3 / 8)


def test_power_only_inner_is_integrated_with_the_trapezoid_rule():
    ram = Device("ram", Component.RAM, Source.MODELLED)
    inner = FakeInner([ram], name="ram_model", power={"ram": 10.0})
    tree = FakeTree(rss_bytes=GIB)
    s = ProcessShareSensor(inner, tree, mem_total_bytes=4 * GIB)
    s.read(0.0)
    inner.power["ram"] = 20.0
    r = job(s.read(2.0), "ram")
    assert r.energy_j == pytest.approx((10 + 20) / 2 * 2 * 0.25)
    assert {d.key: d.source for d in s.devices()}["ram.job"] is Source.MODELLED


def test_modelled_cpu_charges_each_cpu_second_one_cpus_peak(tmp_path):
    """With the CPU model inside, a job's energy depends on its own CPU time only."""
    from wattmeter.sensors.cpu import CpuModelSensor, PerCpuCounters
    from wattmeter.sensors.host_probe import HostProbe

    (tmp_path / "cpuinfo").write_text("".join(
        f"processor\t: {i}\nmodel name\t: Test CPU\nphysical id\t: 0\nsiblings\t: 4\ncore id\t: {i}\ncpu cores\t: 4\n\n"
        for i in range(4)))
    probe = HostProbe(proc=str(tmp_path), cgroup_root=str(tmp_path / "none"), affinity=lambda: {0, 1, 2, 3})

    class Ps:
        T = namedtuple("T", "user nice system idle iowait")

        def __init__(self):
            self.busy, self.idle = [0.0] * 4, [0.0] * 4

        def cpu_times(self, percpu=False):
            return [self.T(b, 0.0, 0.0, i, 0.0) for b, i in zip(self.busy, self.idle)]

    for others_busy in (0, 1, 3):      # other tenants keep 0, 1 or 3 CPUs busy
        ps = Ps()
        model = CpuModelSensor(tdp_w=40.0, probe=probe, psutil_mod=ps, counters=PerCpuCounters(psutil_mod=ps))
        assert model.peak.watts == pytest.approx(40.0)   # 4 CPUs × 10 W
        tree = FakeTree()
        s = ProcessShareSensor(model, tree)
        for step in range(0, 11):      # steady load from before the first read; our job keeps CPU 0 busy
            for cpu in range(4):
                busy = 1.0 if cpu <= others_busy else 0.0
                ps.busy[cpu] += busy
                ps.idle[cpu] += 1 - busy
            tree.cpu_s += 1.0
            r = job(s.read(float(step)), "cpu")
        assert r.energy_j == pytest.approx(10 * 10.0), others_busy   # 10 CPU-s × 10 W


def test_failed_inner_read_skips_the_job_and_the_next_interval_covers_the_gap():
    s, inner, tree, counters = rapl_setup()
    s.read(0.0)
    inner.failing = {"cpu.package-0"}
    counters.busy, counters.cap, tree.cpu_s = 8.0, 8.0, 8.0
    inner.energy["cpu.package-0"] = 30.0
    b = s.read(1.0)
    assert not [r for r in b.readings if r.device_key.startswith("cpu.package-0")]
    assert b.errors[0].device_key == "cpu.package-0"
    inner.failing = set()
    counters.busy, counters.cap, tree.cpu_s = 16.0, 16.0, 16.0
    inner.energy["cpu.package-0"] = 60.0
    assert job(s.read(2.0), "cpu.package-0").energy_j == pytest.approx(60.0)


def test_unreadable_tree_members_are_reported():
    s, inner, tree, counters = rapl_setup()
    tree.denied = 2
    b = s.read(0.0)
    assert any(e.kind == "permission" and "2 processes" in e.message for e in b.errors)


def test_close_closes_the_inner_sensor():
    s, inner, *_ = rapl_setup()
    s.close()
    assert inner.closed
