"""Modelled CPU power for hosts without readable RAPL (VMs, containers, non-root).

    P = peak_w × (idle_frac + (1 − idle_frac) × u)

- ``peak_w`` is the TDP share of the CPUs this process can use: TDP per socket / physical
  cores per socket / hardware threads per core × visible CPUs (affinity mask, tightened by a
  cgroup CPU quota). TDP comes from data/cpu_tdp.json by model name, else 7 W per core.
- ``u`` is the utilisation of those CPUs over the interval between two reads, from the
  kernel's CPU-time counters (not psutil.cpu_percent's global state), so the model needs no
  clock of its own.
- ``idle_frac`` = 0.3: a linear power curve with a static floor, as SPECpower-derived models
  (Cloud Carbon Footprint) use; see docs/host-sensors.md for the sources and the comparison
  with CodeCarbon.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from ..model import Batch, Component, Device, Reading, SensorError, Source
from .base import SensorUnavailable
from .host_probe import CpuQuota, CpuTopology, HostProbe, TdpSpec, lookup_tdp, visible_cpus

IDLE_FRAC = 0.3
DEFAULT_W_PER_CORE = 7.0     # median TDP/physical core of data/cpu_tdp.json; = 2 × CCF's AWS 3.5 W per vCPU max
DEFAULT_PERIOD_S = 1.0
MIN_INTERVAL_CPU_S = 0.02   # below two 10 ms jiffies a utilisation figure is noise: keep the last one


class CpuCounters(Protocol):
    """Cumulative CPU time of a set of CPUs: (busy CPU-seconds, capacity CPU-seconds).

    Capacity is busy + idle, i.e. wall time × CPUs. Deltas of the pair give utilisation.
    """

    def read(self) -> tuple[float, float]: ...


def _psutil(mod: Any | None) -> Any:
    if mod is not None:
        return mod
    import psutil  # lazy: keeps `import wattmeter` cheap

    return psutil


def _total_s(t: Any) -> float:
    # guest time is already inside user/nice on Linux; psutil's own cpu_percent drops it too
    return sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _busy_s(t: Any) -> float:
    return _total_s(t) - t.idle - getattr(t, "iowait", 0.0)


class PerCpuCounters:
    """Busy/capacity of some CPUs (all when ``cpus`` is None) from psutil.cpu_times(percpu=True).

    The per-CPU list is indexed like /proc/stat's cpuN lines; with CPUs offline the index
    and the CPU number can differ, which only matters for an affinity subset.
    """

    def __init__(self, cpus: frozenset[int] | None = None, *, psutil_mod: Any | None = None) -> None:
        self._ps = _psutil(psutil_mod)
        self._cpus = cpus

    def read(self) -> tuple[float, float]:
        busy = cap = 0.0
        for i, t in enumerate(self._ps.cpu_times(percpu=True)):
            if self._cpus is None or i in self._cpus:
                busy += _busy_s(t)
                cap += _total_s(t)
        return busy, cap


class CgroupCpuCounters:
    """Busy = the cgroup's own CPU usage; capacity = wall time × its quota in CPUs.

    Wall time is derived from the host's CPU-time counters (sum over CPUs / CPU count), so
    this stays on the kernel's clock like PerCpuCounters.
    """

    def __init__(self, usage_s: Callable[[], float | None], quota_cpus: float, *, psutil_mod: Any | None = None) -> None:
        self._usage = usage_s
        self._quota = quota_cpus
        self._ps = _psutil(psutil_mod)

    def read(self) -> tuple[float, float]:
        usage = self._usage()
        if usage is None:
            raise OSError("cgroup CPU usage (cpu.stat usage_usec / cpuacct.usage) is unreadable")
        times = self._ps.cpu_times(percpu=True)
        wall = sum(_total_s(t) for t in times) / max(1, len(times))
        return usage, wall * self._quota


@dataclass(frozen=True)
class PeakPower:
    """The modelled peak of the visible CPUs and how it was derived (shown by ``doctor``)."""

    watts: float
    basis: str


def peak_power(topo: CpuTopology, n_visible: float, tdp_w: float | None, spec: TdpSpec | None) -> PeakPower:
    """Peak power of ``n_visible`` logical CPUs.

    A logical CPU is a hardware thread, so per-CPU watts = TDP / cores / threads-per-core;
    on bare metal with every CPU visible this gives back TDP × sockets, and in a VM it
    charges each vCPU its hyperthread's share of the physical socket.
    """
    tpc = max(1, topo.threads_per_core)
    if tdp_w is not None:
        cores = topo.cores_per_socket or max(1, topo.logical_cpus // (topo.sockets * tpc))
        w_core, src = tdp_w / cores, f"TDP {tdp_w:g} W (given) / {cores} cores"
    elif spec is not None:
        w_core, src = spec.tdp_w / spec.cores, f"{spec.match}: TDP {spec.tdp_w:g} W / {spec.cores} cores"
    else:
        name = topo.model_name or "unknown CPU"
        w_core, src = DEFAULT_W_PER_CORE, f"{name} not in cpu_tdp.json: default {DEFAULT_W_PER_CORE:g} W per core"
    w_cpu = w_core / tpc
    return PeakPower(w_cpu * n_visible, f"{src} / {tpc} threads per core × {n_visible:g} visible CPUs")


class CpuModelSensor:
    """Host CPU power from a TDP × utilisation model (source ``modelled``).

    Declares ``base.CpuCoverage`` (``cpu_counters``, the counters this model's utilisation
    comes from, and ``idle_frac``): a process share is taken of the same CPUs.
    """

    name = "cpu_model"

    def __init__(
        self,
        tdp_w: float | None = None,
        *,
        idle_frac: float = IDLE_FRAC,
        period_s: float = DEFAULT_PERIOD_S,
        probe: HostProbe | None = None,
        psutil_mod: Any | None = None,
        counters: CpuCounters | None = None,
    ) -> None:
        if not 0.0 <= idle_frac <= 1.0:
            raise ValueError(f"idle_frac must be in [0, 1], got {idle_frac}")
        if tdp_w is not None and tdp_w <= 0:
            raise ValueError(f"tdp_w must be positive, got {tdp_w}")
        probe = probe or HostProbe()
        topo = probe.topology()
        affinity, quota = probe.affinity_cpus(), probe.cpu_quota()
        self.visible_cpus, self.visible_basis = visible_cpus(len(affinity), quota)
        self.peak = peak_power(topo, self.visible_cpus, tdp_w, lookup_tdp(topo.model_name) if tdp_w is None else None)
        self.idle_frac = idle_frac
        self.period_s = period_s
        self.cpu_counters = counters or _default_counters(probe, affinity, quota, psutil_mod)
        try:
            self._last = self.cpu_counters.read()  # baseline: the first read already has an interval
        except OSError as e:
            raise SensorUnavailable(self.name, f"cannot read CPU time counters: {e}", "check that /proc/stat is readable") from None
        self.utilisation = 0.0
        self._devices = (Device(
            key="cpu",
            component=Component.CPU,
            source=Source.MODELLED,
            labels={"domain": "package"},
            update_period_s=period_s,
        ),)

    def devices(self) -> Sequence[Device]:
        return self._devices

    def power_w(self, utilisation: float) -> float:
        return self.peak.watts * (self.idle_frac + (1.0 - self.idle_frac) * utilisation)

    def read(self, now: float) -> Batch:
        try:
            busy, cap = self.cpu_counters.read()
        except OSError as e:
            return Batch(errors=[SensorError(self.name, "read_failed", "cpu", str(e))])
        d_busy, d_cap = busy - self._last[0], cap - self._last[1]
        if d_cap >= MIN_INTERVAL_CPU_S:
            self.utilisation = min(1.0, max(0.0, d_busy / d_cap))
            self._last = (busy, cap)
        return Batch(readings=[Reading("cpu", now, power_w=self.power_w(self.utilisation))])

    def close(self) -> None:
        pass


def _default_counters(probe: HostProbe, affinity: set[int], quota: CpuQuota | None, psutil_mod: Any | None) -> CpuCounters:
    """Utilisation of the CPUs the model's peak covers: the cgroup's own usage when a quota
    is the binding limit, else the CPUs of the affinity mask (all CPUs when unrestricted)."""
    ps = _psutil(psutil_mod)
    if quota is not None and quota.cpus < len(affinity) and probe.cgroup_cpu_usage_s(quota) is not None:
        return CgroupCpuCounters(lambda: probe.cgroup_cpu_usage_s(quota), quota.cpus, psutil_mod=ps)
    n_cpus = len(ps.cpu_times(percpu=True))
    subset = frozenset(affinity) if len(affinity) < n_cpus else None
    return PerCpuCounters(subset, psutil_mod=ps)
