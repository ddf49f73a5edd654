"""The narrow sensor interface. A sensor knows nothing about who reads it."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from ..model import Batch, Device, ProcessUsage


class SensorUnavailable(Exception):
    """A sensor cannot be used on this machine. ``fix`` tells the user what to do."""

    def __init__(self, sensor: str, reason: str, fix: str = "") -> None:
        super().__init__(f"{sensor}: {reason}" + (f" ({fix})" if fix else ""))
        self.sensor = sensor
        self.reason = reason
        self.fix = fix


@runtime_checkable
class Sensor(Protocol):
    name: str          # "nvml", "rapl", "cpu_model", "ram_model"
    period_s: float    # the cadence the sampler should read it at

    def devices(self) -> Sequence[Device]: ...

    def read(self, now: float) -> Batch:
        """Read every device once. Never raises for one failing device: report it in ``Batch.errors``."""

    def close(self) -> None: ...


@runtime_checkable
class ProcessSensor(Protocol):
    """Optional capability: per-process GPU usage, for attribution."""

    def read_processes(self, now: float) -> list[ProcessUsage]: ...
