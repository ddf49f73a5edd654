"""Which processes use each NVIDIA GPU, and how MIG splits it (for attribution).

NVML has no per-process or per-MIG-instance power: attribution apportions each GPU's energy by
the SM share of its processes (``read``) and, in MIG mode, by each GPU instance's fraction of
the GPU's SMs (``mig_layout``). ``mig_uuids`` maps the device plugin's ``MIG-<uuid>`` IDs to
their parent GPU and instance, so the kubelet's pod-resources API can place them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Sequence

from ..model import Device, ProcessUsage
from .nvml_discovery import decode

NO_INSTANCE = 0xFFFFFFFF      # gpuInstanceId of a process on a GPU not in MIG mode
MIG_SLICES = 7                # compute slices of an A100/H100 in MIG mode
MIG_LAYOUT_TTL_S = 60.0       # MIG layouts change only when an admin repartitions


@dataclass
class _Gpu:
    device: Device
    handle: Any
    last_proc_ts: int = 0                   # newest process-utilisation sample seen (µs)
    pids: tuple[int, ...] = ()


@dataclass
class _Mig:
    uuid: str
    gi_id: str
    sm_fraction: float | None


class ProcessReader:
    """Reads processes and MIG layout for the GPUs an ``NvmlSensor`` discovered."""

    def __init__(self, nvml: ModuleType, gpus: Sequence[tuple[Device, Any]]) -> None:
        self.nvml = nvml
        self.gpus = [_Gpu(d, h) for d, h in gpus]
        self._migs: tuple[float, dict[str, list[_Mig]]] | None = None   # (when read, GPU key -> instances)

    def read(self, now: float) -> list[ProcessUsage]:
        """SM share per process since the last call. Host PIDs."""
        n = self.nvml
        out: list[ProcessUsage] = []
        mismatch = getattr(n, "NVMLLibraryMismatchError", ())   # nvidia-ml-py >= 12.535 only
        for g in self.gpus:
            instance: dict[int, str] = {}
            try:
                running = n.nvmlDeviceGetComputeRunningProcesses(g.handle)
                g.pids = tuple(int(p.pid) for p in running)
                for p in running:   # MIG: which GPU instance the process runs in
                    gi = getattr(p, "gpuInstanceId", None)      # absent from old nvidia-ml-py structs
                    if gi is not None and int(gi) != NO_INSTANCE:
                        instance[int(p.pid)] = str(int(gi))
            except (n.NVMLError, *((mismatch,) if mismatch else ())):
                g.pids = ()
            try:
                samples = n.nvmlDeviceGetProcessUtilization(g.handle, g.last_proc_ts)
            except n.NVMLError:
                samples = []    # NotFound: no new samples since last_seen
            sm: dict[int, float] = {}
            for s in samples:
                g.last_proc_ts = max(g.last_proc_ts, int(s.timeStamp))
                sm[int(s.pid)] = max(sm.get(int(s.pid), 0.0), float(s.smUtil))
            for pid in g.pids:
                out.append(ProcessUsage(g.device.key, pid, min(1.0, sm.get(pid, 0.0) / 100.0), now,
                                        instance.get(pid) or g.device.labels.get("mig")))
        return out

    def mig_layout(self, now: float) -> dict[str, dict[str, float]]:
        """Per GPU in MIG mode, each GPU instance's fraction of the GPU's SMs (estimated)."""
        return {key: {m.gi_id: m.sm_fraction for m in migs if m.sm_fraction is not None}
                for key, migs in self._instances(now).items()
                if any(m.sm_fraction is not None for m in migs)}

    def mig_uuids(self, now: float) -> dict[str, tuple[str, str]]:
        """MIG device UUID -> (parent GPU UUID, GPU instance id)."""
        parents = {g.device.key: g.device.labels.get("uuid", "") for g in self.gpus}
        return {m.uuid: (parents[key], m.gi_id) for key, migs in self._instances(now).items()
                for m in migs if m.uuid and parents.get(key)}

    def _instances(self, now: float) -> dict[str, list[_Mig]]:
        if self._migs is not None and now - self._migs[0] < MIG_LAYOUT_TTL_S:
            return self._migs[1]
        n, out = self.nvml, {}
        for g in self.gpus:
            try:
                if int(n.nvmlDeviceGetMigMode(g.handle)[0]) != 1:
                    continue
                slots = n.nvmlDeviceGetMaxMigDeviceCount(g.handle)
            except (n.NVMLError, AttributeError):   # not MIG-capable, or bindings without MIG calls
                continue
            found: list[_Mig] = []
            for i in range(slots):
                try:
                    mig = n.nvmlDeviceGetMigDeviceHandleByIndex(g.handle, i)
                    gi = str(int(n.nvmlDeviceGetGpuInstanceId(mig)))
                except n.NVMLError:
                    continue        # an empty slot
                try:
                    uuid = decode(n.nvmlDeviceGetUUID(mig))
                except n.NVMLError:
                    uuid = ""
                found.append(_Mig(uuid, gi, self._sm_fraction(g.handle, mig)))
            if found:
                out[g.device.key] = found
        self._migs = (now, out)
        return out

    def _sm_fraction(self, parent: Any, mig: Any) -> float | None:
        n = self.nvml
        try:
            return n.nvmlDeviceGetAttributes(mig).multiprocessorCount / n.nvmlDeviceGetAttributes(parent).multiprocessorCount
        except (n.NVMLError, AttributeError, ZeroDivisionError, TypeError):
            pass
        # The profile name says how many of the GPU's 7 compute slices the instance has: "MIG 3g.40gb".
        match = re.search(r"(\d+)g\.\d+gb", decode(n.nvmlDeviceGetName(mig)))
        return int(match.group(1)) / MIG_SLICES if match else None
