"""Finding the GPUs the NVML sensor reads: the visible GPUs the selection keeps, what each one
answers (a total-energy counter, field 186 instant power, field 185 the 1 s trailing mean, each
probed once), its ``Device``, and the reader for its kind: ``CounterReader`` where it has a
counter (sensors/nvml_counter.py), else ``PowerOnlyReader`` (sensors/nvml_power.py).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from ..clock import Clock
from ..model import Component, Device, Source
from .counter_timing import CounterTiming
from .gpu_selection import GpuSelection
from .nvml_counter import CounterReader
from .nvml_power import FIELD_POWER_AVERAGE, FIELD_POWER_INSTANT, PowerOnlyReader


def decode(value: Any) -> str:
    """An NVML string as str (pynvml returns bytes or str, by version)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class NvmlGpu:
    """One GPU the sensor reads: what discovery found, and the reader for its kind."""

    index: int
    handle: Any
    device: Device
    has_counter: bool
    power_mode: str              # "counter" | "power_only"
    instant_ok: bool = False     # field 186 works
    average_ok: bool = False     # field 185 (1 s trailing mean) answers
    reader: CounterReader | None = None    # GPUs with a counter
    power: PowerOnlyReader | None = None   # GPUs with no counter

    @property
    def counter(self) -> CounterTiming | None:
        """A counter GPU's timing (when to read the counter, and its dating); else None."""
        return self.reader.timing if self.reader is not None else None


def discover_gpus(nvml: ModuleType, selection: GpuSelection, *, wall: Callable[[float], float], clock: Clock,
                  rng: random.Random, power_period_s: float, simulated: bool) -> list[NvmlGpu]:
    """The selected GPUs, each probed once. ``wall`` maps the meter's clock to wall time (to date
    field timestamps), ``clock`` times the end of counter calls and ``rng`` shifts counter pairs
    (sensors/counter_timing.py). NVML errors while listing the GPUs pass through."""
    n = nvml
    count = n.nvmlDeviceGetCount()
    handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    uuids = [decode(n.nvmlDeviceGetUUID(h)) for h in handles]
    gpus = []
    for idx, mig in selection.match(list(enumerate(uuids))):
        h = handles[idx]
        model = decode(n.nvmlDeviceGetName(h))
        has_counter = _counter_ok(n, h)
        instant_ok = _field_ok(n, h, FIELD_POWER_INSTANT)
        average_ok = _field_ok(n, h, FIELD_POWER_AVERAGE)
        mode, source = ("counter", Source.COUNTER) if has_counter else ("power_only", Source.SAMPLED)
        labels = {"gpu": str(idx), "uuid": uuids[idx], "model": model, "hostname": os.uname().nodename}
        if mig:
            labels["mig"] = mig
        key = f"gpu{idx}"
        dev = Device(key=key, component=Component.GPU, source=source, labels=labels,
                     power_is_mean=not has_counter and instant_ok,
                     update_period_s=0.1 if has_counter else power_period_s,
                     simulated=simulated)
        power = None if has_counter else PowerOnlyReader(n, h, key, wall, instant_ok, average_ok)
        reader = None
        if has_counter:
            # Field 186, else GetPowerUsage, shapes the counter's spans (CounterReader).
            timing = CounterTiming(shaped=True, rng=rng)
            reader = CounterReader(n, h, key, timing, wall=wall, clock=clock, instant_ok=instant_ok,
                                   average_ok=average_ok)
        gpus.append(NvmlGpu(idx, h, dev, has_counter, mode, instant_ok, average_ok, reader=reader, power=power))
    return gpus


def _counter_ok(nvml: ModuleType, handle: Any) -> bool:
    """Whether the GPU has a total-energy counter (a probe at discovery)."""
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        return True
    except nvml.NVMLError:
        return False


def _field_ok(nvml: ModuleType, handle: Any, field_id: int) -> bool:
    """Whether a field answers (a probe at discovery)."""
    try:
        return nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0].nvmlReturn == 0
    except nvml.NVMLError:
        return False
