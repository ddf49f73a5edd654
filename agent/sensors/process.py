"""The metered process tree's share of host CPU and RAM energy.

``ProcessTree`` measures a root process and its descendants: cumulative CPU seconds and the
current RSS. ``ProcessShareSensor`` wraps a host sensor (RAPL, CPU model, RAM model) and adds,
for each CPU/RAM device, a process-scope device ``<key>.job`` whose cumulative energy is the
sum over read intervals of (host energy in the interval) × (the tree's share).

Share policy (stated, not hidden; docs/host-sensors.md has the derivation):
- CPU: host power is split into a static floor and a dynamic part with the same linear
  curve as the CPU model, ``P ∝ f + (1 − f)·u``. The dynamic part is shared by busy CPU
  time (tree CPU-s / host busy CPU-s); the floor by capacity (tree CPU-s / host CPU-s of
  capacity). Both simplify to ``share = (c / C) / (f + (1 − f)·u)`` with c the tree's CPU-s,
  C the capacity and u = busy / C. Under the model this charges every CPU-second the peak
  power of one CPU; the floor of CPUs nobody used stays unattributed, so the shares of all
  tenants sum to at most the host total.
- RAM: share = tree RSS / memory (mean of the interval's two ends).
"""
from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from ..model import Batch, Component, Device, Reading, Scope, SensorError
from .base import CpuCoverage, MemCoverage, Sensor, SensorUnavailable
from .cpu import IDLE_FRAC, MIN_INTERVAL_CPU_S, CpuCounters, PerCpuCounters

JOB_SUFFIX = ".job"
DEFAULT_RESCAN_S = 1.0


@dataclass(frozen=True)
class TreeSample:
    cpu_s: float        # cumulative CPU seconds of the tree since the first sample's baseline
    rss_bytes: int      # sum of RSS over live processes (shared pages counted per process)
    n_procs: int
    denied: int = 0     # processes whose counters were not readable (AccessDenied)
    alive: bool = True  # False once the root process has exited


class TreeSource(Protocol):
    def sample(self, now: float | None = None) -> TreeSample: ...


@dataclass(frozen=True)
class _Proc:
    create_time: float
    ppid: int
    own_s: float    # user + system
    kids_s: float   # children_user + children_system: reaped descendants


class ProcessTree:
    """CPU seconds and RSS of ``root_pid`` and every descendant.

    Each live process contributes its own CPU time plus its reaped children's (``children_*``),
    so the time of short-lived subprocesses (compilers, tokenizer workers) is kept once they are
    reaped. When a process we had counted disappears, its reaper's ``children_*`` will grow by
    its final total: that part was already counted, so it is owed back ("debt") to the nearest
    live ancestor and paid out of that ancestor's next ``children_*`` growth. This keeps the
    total from double counting, also when the reap races our read. Time is lost only for
    descendants re-parented outside the tree (daemonised, or orphaned to init) and for their
    last interval.
    """

    def __init__(self, root_pid: int | None = None, *, psutil_mod: Any | None = None,
                 rescan_s: float = DEFAULT_RESCAN_S) -> None:
        if psutil_mod is None:
            import psutil as psutil_mod  # lazy: keeps `import wattmeter` cheap
        self._ps = psutil_mod
        self.root_pid = os.getpid() if root_pid is None else root_pid
        try:
            self._root = psutil_mod.Process(self.root_pid)
            self._root.cpu_times()
        except psutil_mod.NoSuchProcess:
            raise SensorUnavailable("process", f"no process with pid {self.root_pid}", "pass the pid of a running process") from None
        except psutil_mod.AccessDenied:
            raise SensorUnavailable("process", f"permission denied reading pid {self.root_pid}",
                                    "run wattmeter as the user that owns the process, or as root") from None
        self._prev: dict[int, _Proc] = {}
        self._debt: dict[int, float] = {}
        self._cpu_s = 0.0
        self._alive = True
        self.rescan_s = rescan_s
        self._members: list[Any] = []
        self._scan_t: float | None = None
        self._lock = threading.Lock()  # the CPU and RAM wrappers sample from their own reader threads

    def sample(self, now: float | None = None) -> TreeSample:
        """Fresh counters of the tree's processes.

        Finding the members is the expensive part: psutil reads every host process's stat
        file (~15 µs each). So the member list is rescanned at most every ``rescan_s`` of
        ``now`` (always when ``now`` is None); in between, the known members' counters are
        re-read. A process born in between is found at the next rescan, and its CPU time
        from birth is counted then: late, never lost.
        """
        with self._lock:
            if not self._alive:
                return TreeSample(self._cpu_s, 0, 0, alive=False)
            denied = 0
            if now is None or self._scan_t is None or now - self._scan_t >= self.rescan_s:
                self._members, denied = self._scan()
                self._scan_t = now
            return self._read(self._members, denied)

    def _scan(self) -> tuple[list[Any], int]:
        ps = self._ps
        try:
            return [self._root, *self._root.children(recursive=True)], 0  # parents before children
        except ps.NoSuchProcess:
            return [], 0
        except ps.AccessDenied:
            return [self._root], 1

    def _read(self, procs: list[Any], denied: int) -> TreeSample:
        ps = self._ps
        cur: dict[int, _Proc] = {}
        rss = 0
        root_gone = not procs
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cur[p.pid] = _Proc(p.create_time(), p.ppid(), t.user + t.system,
                                       getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0))
                    rss += p.memory_info().rss
            except ps.NoSuchProcess:  # exited (and was reaped) between listing and reading
                cur.pop(p.pid, None)
                root_gone = root_gone or p.pid == self._root.pid
            except ps.AccessDenied:
                cur.pop(p.pid, None)
                denied += 1
        if root_gone:
            self._alive = False
            return TreeSample(self._cpu_s, 0, 0, denied, alive=False)
        if self._root.pid not in cur:  # root unreadable this time: keep the last totals
            return TreeSample(self._cpu_s, 0, 0, denied)
        self._cpu_s += self._increment(cur)
        self._prev = cur
        return TreeSample(self._cpu_s, rss, len(cur), denied)

    def _increment(self, cur: dict[int, _Proc]) -> float:
        prev, debt = self._prev, self._debt
        for pid, old in prev.items():
            new = cur.get(pid)
            if new is not None and new.create_time == old.create_time:
                continue
            owed = old.own_s + old.kids_s + debt.pop(pid, 0.0)
            heir = self._live_ancestor(old.ppid, cur)
            if heir is not None:
                debt[heir] = debt.get(heir, 0.0) + owed
        inc = 0.0
        for pid, new in cur.items():
            old = prev.get(pid)
            if old is None or old.create_time != new.create_time:  # new since last sample (or pid reused)
                d_own, d_kids = new.own_s, new.kids_s
            else:
                d_own, d_kids = max(0.0, new.own_s - old.own_s), max(0.0, new.kids_s - old.kids_s)
            pay = min(debt.get(pid, 0.0), d_kids)
            if pay:
                debt[pid] -= pay
            inc += d_own + d_kids - pay
        return inc

    def _live_ancestor(self, pid: int, cur: dict[int, _Proc]) -> int | None:
        seen: set[int] = set()
        while pid in self._prev and pid not in seen:
            seen.add(pid)
            if pid in cur and cur[pid].create_time == self._prev[pid].create_time:
                return pid
            pid = self._prev[pid].ppid
        return None


@dataclass
class _JobState:
    t: float
    host_energy_j: float | None
    host_power_w: float | None
    tree_cpu_s: float
    rss_bytes: int
    busy_s: float
    cap_s: float
    energy_j: float = 0.0
    cpu_share: float = 0.0


def cpu_share(tree_cpu_s: float, busy_s: float, cap_s: float, idle_frac: float) -> float:
    """The tree's share of host CPU energy over one interval (deltas in CPU-seconds)."""
    if cap_s <= 0:
        return 0.0
    busy = min(max(busy_s, 0.0), cap_s)
    c = min(max(tree_cpu_s, 0.0), busy)  # the tree cannot be busier than the CPUs it runs on
    denom = idle_frac + (1.0 - idle_frac) * busy / cap_s
    return 0.0 if denom <= 0 else min(1.0, (c / cap_s) / denom)


class ProcessShareSensor:
    """A host sensor plus process-scope ``<key>.job`` devices for its CPU and RAM devices.

    The inner sensor's declared coverage is used where it has one (``base.CpuCoverage``: the
    CPUs a CPU model covers; ``base.MemCoverage``: the memory a RAM model covers). Otherwise
    the host's CPUs and total memory are used, which is what RAPL measures.
    """

    def __init__(
        self,
        inner: Sensor,
        tree: TreeSource,
        *,
        cpu_counters: CpuCounters | None = None,
        idle_frac: float | None = None,
        mem_total_bytes: int | None = None,
    ) -> None:
        self.inner = inner
        self._tree = tree
        self.name = inner.name
        self.period_s = inner.period_s
        inner_devices = list(inner.devices())
        self._component = {d.key: d.component for d in inner_devices if d.component in (Component.CPU, Component.RAM)}
        job_devices = [dataclasses.replace(d, key=d.key + JOB_SUFFIX, scope=Scope.PROCESS)
                       for d in inner_devices if d.key in self._component]
        self._devices = tuple(inner_devices + job_devices)
        comps = set(self._component.values())
        cpu_cover = inner if isinstance(inner, CpuCoverage) else None
        self._cpu = None
        if Component.CPU in comps:
            self._cpu = cpu_counters or (cpu_cover.cpu_counters if cpu_cover else None) or PerCpuCounters()
        self.idle_frac = idle_frac if idle_frac is not None else (cpu_cover.idle_frac if cpu_cover else IDLE_FRAC)
        self._mem = 0
        if Component.RAM in comps:
            self._mem = mem_total_bytes or (inner.mem_bytes if isinstance(inner, MemCoverage) else None) \
                or _host_mem_bytes()
        self._state: dict[str, _JobState] = {}

    def devices(self) -> Sequence[Device]:
        return self._devices

    def read(self, now: float) -> Batch:
        inner = self.inner.read(now)
        out = Batch(readings=list(inner.readings), errors=list(inner.errors))
        tree = self._tree.sample(now)
        if tree.denied:
            out.errors.append(SensorError(self.name, "permission", None,
                                          f"{tree.denied} processes of the metered tree are unreadable; their CPU time is not counted"))
        busy = cap = None
        if self._cpu is not None:
            try:
                busy, cap = self._cpu.read()
            except OSError as e:
                out.errors.append(SensorError(self.name, "read_failed", None, f"CPU time counters: {e}"))
        for r in inner.readings:
            comp = self._component.get(r.device_key)
            if comp is None or (comp is Component.CPU and busy is None):
                continue  # not a host CPU/RAM device, or no share this time: the next interval covers it
            job = self._advance(r, comp, tree, busy or 0.0, cap or 0.0)
            if job is not None:
                out.readings.append(job)
        return out

    def close(self) -> None:
        self.inner.close()

    def _advance(self, r: Reading, comp: Component, tree: TreeSample, busy: float, cap: float) -> Reading | None:
        st = self._state.get(r.device_key)
        new = _JobState(r.t, r.energy_j, r.power_w, tree.cpu_s, tree.rss_bytes, busy, cap)
        if st is None:  # first point: the job's counter starts at 0 here
            self._state[r.device_key] = new
            return Reading(r.device_key + JOB_SUFFIX, r.t, energy_j=0.0)
        dt = r.t - st.t
        host_j = _interval_energy(st, r, dt)
        if comp is Component.CPU:
            d_cap = cap - st.cap_s
            if d_cap >= MIN_INTERVAL_CPU_S:
                new.cpu_share = cpu_share(tree.cpu_s - st.tree_cpu_s, busy - st.busy_s, d_cap, self.idle_frac)
            else:
                new.cpu_share = st.cpu_share  # too short to measure: keep the last share
            share = new.cpu_share
        else:
            share = min(1.0, (st.rss_bytes + tree.rss_bytes) / 2 / self._mem) if self._mem > 0 else 0.0
        job_j = host_j * share
        new.energy_j = st.energy_j + job_j
        self._state[r.device_key] = new
        return Reading(r.device_key + JOB_SUFFIX, r.t, energy_j=new.energy_j,
                       power_w=job_j / dt if dt > 0 else None)


def _interval_energy(st: _JobState, r: Reading, dt: float) -> float:
    """Host energy between two readings: counter delta, else trapezoid of the two powers."""
    if r.energy_j is not None and st.host_energy_j is not None:
        d = r.energy_j - st.host_energy_j
        return d if d >= 0 else max(0.0, r.energy_j)  # a decrease is a reset, as the ledger reads it
    if r.power_w is not None and st.host_power_w is not None and dt > 0:
        return (r.power_w + st.host_power_w) / 2.0 * dt
    return 0.0


def _host_mem_bytes() -> int:
    import psutil  # lazy

    return int(psutil.virtual_memory().total)
