"""Splitting each GPU's energy among the processes, containers and pods that share it.

Policy (stated, not hidden; docs/attribution.md):
- Each interval's device energy ΔE (from the ledger, so resets and GPU loss are already
  handled) is split by the processes' SM-utilisation shares, ``ΔE × s_i / Σs``. The tenants'
  parts therefore sum to ΔE: a tenant is never charged the whole device.
- No process on the GPU: ΔE is **idle** energy.
- Processes on the GPU but no utilisation signal (Σs = 0, for longer than ``hold_s``): ΔE is
  **unattributed** energy; so is the part of a tenant whose series was refused by the cap.
- MIG: NVML has no per-instance power. ΔE is apportioned to each instance in use by its
  fraction of the GPU's SMs, then among that instance's processes by SM share (equally
  without one); slices nobody uses are idle. These series carry ``estimated="true"``.
- Conservation: Σ process parts + idle + unattributed = device ΔE, exactly, at every commit.

The sampler task calls ``tick(now)`` (NVML process query + commit); a scrape calls
``snapshot(ledger_snapshot)``, which commits up to that ledger snapshot with the last known
shares and never touches hardware. Committing on a scrape keeps every counter monotonic and
makes the parts equal the device counter exposed in the same scrape.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from .cgroups import HOST, ContainerInfo
from .ledger import DeviceSnapshot
from .model import Component, ProcessUsage

log = logging.getLogger("wattmeter.attribution")

PROCESS_METRIC = "wattmeter_process_gpu_energy_joules_total"

ReadProcesses = Callable[[float], "list[ProcessUsage]"]
Resolve = Callable[[int, float], ContainerInfo]
MigLayout = Callable[[], "Mapping[str, Mapping[str, float]]"]   # device key -> {instance: SM fraction}


@dataclass(frozen=True)
class ProcessKey:
    """The label set of one per-process series (``pid`` is "" unless pid labels are on)."""

    device_key: str
    container_id: str = ""
    pod: str = ""
    namespace: str = ""
    mig_instance: str = ""
    estimated: bool = False
    pid: str = ""


@dataclass(frozen=True)
class AttributionConfig:
    pid_labels: bool = False        # off by default: PIDs churn and explode cardinality
    max_series: int = 2000          # live per-process series; beyond it energy is unattributed
    series_ttl_s: float = 900.0     # a series unseen this long is retired (no longer counts to the cap)
    hold_s: float = 5.0             # keep the last shares this long when NVML has no new samples


@dataclass(frozen=True)
class AttributionSnapshot:
    processes: Mapping[ProcessKey, float]       # joules since start, per series
    idle_j: Mapping[str, float]                 # device key -> joules with no process on the GPU
    unattributed_j: Mapping[str, float]         # device key -> joules nobody could be charged for
    device_j: Mapping[str, float]               # device key -> ledger total at the last commit
    retired_j: Mapping[str, float] = field(default_factory=dict)   # parts of series retired after their TTL
    dropped_series: int = 0
    errors: int = 0


@dataclass
class _Share:
    key: ProcessKey
    weight: float            # SM share (0..1), or within-instance share for MIG
    instance_fraction: float | None = None   # MIG: the instance's fraction of the GPU's SMs


@dataclass
class _DeviceState:
    shares: list[_Share] = field(default_factory=list)
    present: bool = False        # some process holds the GPU
    last_signal_t: float | None = None
    last_e: float | None = None


class Attributor:
    def __init__(self, read_processes: ReadProcesses | None = None, resolve: Resolve | None = None,
                 config: AttributionConfig | None = None, mig_layout: MigLayout | None = None) -> None:
        self.read_processes = read_processes
        self.resolve = resolve or (lambda pid, now: HOST)
        self.config = config or AttributionConfig()
        self.mig_layout = mig_layout
        self._lock = threading.Lock()
        self._dev: dict[str, _DeviceState] = {}
        self._proc: dict[ProcessKey, float] = {}
        self._seen: dict[ProcessKey, float] = {}
        self._idle: dict[str, float] = {}
        self._unattr: dict[str, float] = {}
        self._retired: dict[str, float] = {}     # energy of retired series, kept for conservation
        self._refused: set[ProcessKey] = set()
        self.dropped_series = 0
        self.errors = 0

    # -- input -------------------------------------------------------------------------------
    def tick(self, now: float, ledger_snapshot: Mapping[str, DeviceSnapshot] | None = None) -> None:
        """Sampler task: read the shares of the interval just ended, then commit its energy."""
        if self.read_processes is not None:
            try:
                self.observe(self.read_processes(now), now)
            except Exception as exc:  # a failing query must not kill the sampler thread; counted, logged
                log.warning("process query failed: %s: %s", type(exc).__name__, exc)
                with self._lock:
                    self.errors += 1
        if ledger_snapshot is not None:
            self.advance(ledger_snapshot)

    def observe(self, usages: Iterable[ProcessUsage], now: float) -> None:
        """New shares per device (from one NVML process query)."""
        by_dev: dict[str, list[ProcessUsage]] = {}
        for u in usages:
            by_dev.setdefault(u.device_key, []).append(u)
        layout = self._layout()
        # Resolved outside the lock: a /proc read must never delay a scrape.
        infos = {u.pid: self.resolve(u.pid, now) for us in by_dev.values() for u in us}
        with self._lock:
            self._expire(now)        # first, so retired series free the cap for newcomers
            for key, st in self._dev.items():
                if key not in by_dev:
                    st.present, st.shares = False, []
            for dev_key, us in by_dev.items():
                st = self._dev.setdefault(dev_key, _DeviceState())
                st.present = True
                shares = self._shares(dev_key, us, infos, layout.get(dev_key), now)
                signal = sum(s.weight for s in shares) > 0
                if signal or st.last_signal_t is None or now - st.last_signal_t > self.config.hold_s \
                        or {s.key for s in shares} != {s.key for s in st.shares}:
                    st.shares = shares
                if signal:
                    st.last_signal_t = now

    def _layout(self) -> Mapping[str, Mapping[str, float]]:
        if self.mig_layout is None:
            return {}
        try:
            return self.mig_layout()
        except Exception as exc:  # optional capability; a failure degrades to non-MIG shares
            log.warning("MIG layout query failed: %s", exc)
            return {}

    def _shares(self, dev_key: str, us: list[ProcessUsage], infos: Mapping[int, ContainerInfo],
                layout: Mapping[str, float] | None, now: float) -> list[_Share]:
        cfg = self.config
        merged: dict[ProcessKey, float] = {}
        instance_of: dict[ProcessKey, str] = {}
        for u in us:
            info = infos[u.pid]
            mig = u.mig_instance or ""
            key = ProcessKey(dev_key, info.container_id, info.pod, info.namespace, mig, bool(mig),
                             str(u.pid) if cfg.pid_labels else "")
            if key in self._proc or self._admit(key):
                self._seen[key] = now      # a refused key keeps its weight: its part is unattributed
            merged[key] = merged.get(key, 0.0) + max(0.0, u.sm_share)
            instance_of[key] = mig
        if not layout or not any(instance_of.values()):
            return [_Share(k, w) for k, w in merged.items()]
        out = []
        for inst in set(instance_of.values()):
            members = [k for k in merged if instance_of[k] == inst]
            total = sum(merged[k] for k in members)
            frac = float(layout.get(inst, 0.0))
            for k in members:
                w = merged[k] / total if total > 0 else 1.0 / len(members)
                out.append(_Share(k, w, frac))
        return out

    def _admit(self, key: ProcessKey) -> bool:
        if len(self._proc) < self.config.max_series:
            self._proc[key] = 0.0
            return True
        if key not in self._refused:
            self._refused.add(key)
            self.dropped_series += 1
            if len(self._refused) > 4 * self.config.max_series:
                self._refused.clear()        # bounded memory; a refused key may be counted again later
        return False

    def _expire(self, now: float) -> None:
        ttl = self.config.series_ttl_s
        for key in [k for k, t in self._seen.items() if now - t > ttl]:
            del self._seen[key]
            energy = self._proc.pop(key, 0.0)
            self._retired[key.device_key] = self._retired.get(key.device_key, 0.0) + energy

    # -- commit -------------------------------------------------------------------------------
    def advance(self, ledger_snapshot: Mapping[str, DeviceSnapshot]) -> None:
        """Split each GPU's energy since the last commit with the current shares."""
        with self._lock:
            for key, snap in ledger_snapshot.items():
                if snap.device.component != Component.GPU:
                    continue
                st = self._dev.setdefault(key, _DeviceState())
                e = snap.energy_j
                de = e - (st.last_e if st.last_e is not None else 0.0)
                st.last_e = e if st.last_e is None else max(st.last_e, e)
                if de > 0:
                    self._split(key, st, de)

    def _split(self, dev_key: str, st: _DeviceState, de: float) -> None:
        if not st.present:
            self._idle[dev_key] = self._idle.get(dev_key, 0.0) + de
            return
        given = refused = 0.0
        if any(s.instance_fraction is not None for s in st.shares):
            for s in st.shares:
                part = de * (s.instance_fraction or 0.0) * s.weight
                if s.key in self._proc:
                    self._proc[s.key] += part
                    given += part
                else:
                    refused += part
            self._unattr[dev_key] = self._unattr.get(dev_key, 0.0) + refused
            # Slices nobody uses are idle; rounding never makes the remainder negative.
            self._idle[dev_key] = self._idle.get(dev_key, 0.0) + max(0.0, de - given - refused)
            return
        total = sum(s.weight for s in st.shares)
        if total > 0:
            for s in st.shares:
                if s.key in self._proc:
                    part = de * s.weight / total
                    self._proc[s.key] += part
                    given += part
        # Processes present without a signal, or refused by the cap: nobody can be charged.
        self._unattr[dev_key] = self._unattr.get(dev_key, 0.0) + max(0.0, de - given)

    # -- output -------------------------------------------------------------------------------
    def snapshot(self, ledger_snapshot: Mapping[str, DeviceSnapshot] | None = None) -> AttributionSnapshot:
        if ledger_snapshot is not None:
            self.advance(ledger_snapshot)
        with self._lock:
            return AttributionSnapshot(
                processes=dict(self._proc), idle_j=dict(self._idle), unattributed_j=dict(self._unattr),
                retired_j=dict(self._retired),
                device_j={k: st.last_e for k, st in self._dev.items() if st.last_e is not None},
                dropped_series=self.dropped_series, errors=self.errors)


def conservation_error(snap: AttributionSnapshot, device_key: str) -> float:
    """Relative gap between the device total and its parts (0.0 when they match exactly)."""
    total = snap.device_j.get(device_key, 0.0)
    parts = sum(v for k, v in snap.processes.items() if k.device_key == device_key)
    parts += snap.idle_j.get(device_key, 0.0) + snap.unattributed_j.get(device_key, 0.0)
    parts += snap.retired_j.get(device_key, 0.0)
    return abs(parts - total) / total if total > 0 else abs(parts)
