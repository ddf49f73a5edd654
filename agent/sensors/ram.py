"""Modelled RAM power: a constant W per GiB of memory this process can have.

    P = w_per_gb × min(total memory, cgroup memory limit) / GiB

0.392 W/GB is Cloud Carbon Footprint's coefficient (the mean of Crucial's ~0.375 W/GB rule of
thumb and Micron's DDR4 power model, ~0.408 W/GB). DRAM power is dominated by refresh and
background power that flows whether or not the memory is used, so the model counts
capacity, not usage; the process-tree share (process.py) is what scales it to a job.
Where RAPL has a DRAM domain, ``ram.dram-N`` from rapl.py is a measurement and is preferred.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..model import Batch, Component, Device, Reading, Source
from .host_probe import HostProbe

CCF_W_PER_GB = 0.392
GIB = 1 << 30           # cloud instance sizes are quoted in GiB; psutil reports bytes
DEFAULT_PERIOD_S = 1.0


class RamModelSensor:
    """Host RAM power from capacity (source ``modelled``).

    Declares ``base.MemCoverage`` (``mem_bytes``, the memory this model covers).
    """

    name = "ram_model"

    def __init__(
        self,
        w_per_gb: float = CCF_W_PER_GB,
        *,
        period_s: float = DEFAULT_PERIOD_S,
        probe: HostProbe | None = None,
        total_bytes: int | None = None,
        psutil_mod: Any | None = None,
    ) -> None:
        if w_per_gb < 0:
            raise ValueError(f"w_per_gb must be >= 0, got {w_per_gb}")
        if total_bytes is None:
            if psutil_mod is None:
                import psutil as psutil_mod  # lazy: keeps `import wattmeter` cheap
            total_bytes = int(psutil_mod.virtual_memory().total)
        limit = (probe or HostProbe()).memory_limit_bytes()
        self.total_bytes = total_bytes
        self.mem_bytes = min(total_bytes, limit) if limit is not None else total_bytes
        self.basis = (f"cgroup memory limit {self.mem_bytes / GIB:.2f} GiB" if self.mem_bytes < total_bytes
                      else f"{total_bytes / GIB:.2f} GiB total memory")
        self.w_per_gb = w_per_gb
        self.period_s = period_s
        self._power_w = w_per_gb * self.mem_bytes / GIB
        self._devices = (Device(
            key="ram",
            component=Component.RAM,
            source=Source.MODELLED,
            update_period_s=period_s,
        ),)

    def devices(self) -> Sequence[Device]:
        return self._devices

    def read(self, now: float) -> Batch:
        return Batch(readings=[Reading("ram", now, power_w=self._power_w)])

    def close(self) -> None:
        pass
