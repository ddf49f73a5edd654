"""Frozen dataclasses shared by every layer: devices, readings, window results.

Units live in names: ``energy_j``, ``power_w``, ``t`` in seconds of the meter's clock.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping


class Source(str, enum.Enum):
    """How a device's energy is known."""

    COUNTER = "counter"      # hardware energy counter (NVML total energy, RAPL)
    SAMPLED = "sampled"      # integrated from sampled power readings
    MODELLED = "modelled"    # estimated from utilisation and a power model

    def __str__(self) -> str:  # so f-strings print "counter", not "Source.COUNTER"
        return self.value


class Component(str, enum.Enum):
    GPU = "gpu"
    CPU = "cpu"
    RAM = "ram"

    def __str__(self) -> str:
        return self.value


class Scope(str, enum.Enum):
    HOST = "host"        # the whole device / host
    PROCESS = "process"  # the metered process tree's share of a host device

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Device:
    """One metered energy stream. ``key`` is unique within a meter (``gpu0``, ``cpu.package-0``)."""

    key: str
    component: Component
    source: Source
    scope: Scope = Scope.HOST
    labels: Mapping[str, str] = field(default_factory=dict)
    update_period_s: float = 0.1   # how often the underlying value refreshes
    simulated: bool = False        # produced by the fake NVML backend
    wrap_j: float | None = None    # counter range: a decrease is a wrap (RAPL), not a reset
    power_is_mean: bool = False    # each power value is the mean since the previous one (NVML field 186)


@dataclass(frozen=True)
class Reading:
    """One observation of a device at clock time ``t``.

    ``energy_j`` is a cumulative counter (monotonic except for resets); ``power_w`` an
    instantaneous or averaged power. Either may be None.
    """

    device_key: str
    t: float
    energy_j: float | None = None
    power_w: float | None = None
    read_t: float | None = None    # when a counter was read, if ``t`` is an earlier refresh time
    # A trailing mean: the mean power over (t - mean_window_s, t] (NVML field 185, or
    # GetPowerUsage where the data shows it averages). The energy reference where no counter is.
    mean_w: float | None = None
    mean_window_s: float | None = None
    # An instant value too coarse to place energy inside a counter span: a point sample that
    # refreshes no faster than the counter and is stamped only with its read time, so it may
    # be up to a refresh old. Kept to bridge counter faults; edges use the counter's own steps.
    instant_coarse: bool = False


@dataclass(frozen=True)
class SensorError:
    """A failed read, translated from the vendor error at the sensor boundary."""

    sensor: str
    kind: str               # short snake-case: gpu_lost, not_supported, timeout, permission, ...
    device_key: str | None = None
    message: str = ""


@dataclass
class Batch:
    """What one sensor read returns: readings for the devices that answered, errors for the rest."""

    readings: list[Reading] = field(default_factory=list)
    errors: list[SensorError] = field(default_factory=list)


@dataclass(frozen=True)
class ProcessUsage:
    """A process's share of a GPU over the last sampling interval (0..1 SM share)."""

    device_key: str
    pid: int
    sm_share: float
    t: float
    mig_instance: str | None = None


@dataclass(frozen=True)
class DeviceEnergy:
    """Energy of one device over a window."""

    key: str
    component: Component
    scope: Scope
    source: Source
    energy_j: float
    avg_power_w: float
    peak_power_w: float | None
    labels: Mapping[str, str] = field(default_factory=dict)
    approximate: bool = False


@dataclass(frozen=True)
class WindowResult:
    """Everything a window (job, call, request) measured."""

    name: str
    start_t: float
    end_t: float
    start_wall: float
    end_wall: float
    devices: tuple[DeviceEnergy, ...]
    tokens: Mapping[str, int] = field(default_factory=dict)
    approximate: bool = False
    simulated: bool = False

    @property
    def duration_s(self) -> float:
        return self.end_t - self.start_t

    def component_energy_j(self, component: Component | str, scope: Scope | str | None = None) -> float:
        """Energy of one component. Without ``scope``, the process-tree share is used where
        one exists for that component, else the host figure (GPUs are always host scope)."""
        comp = Component(component)
        parts = [d for d in self.devices if d.component == comp]
        if scope is None:
            scoped = [d for d in parts if d.scope == Scope.PROCESS]
            parts = scoped or parts
        else:
            parts = [d for d in parts if d.scope == Scope(scope)]
        return sum(d.energy_j for d in parts)

    @property
    def energy_by_component_j(self) -> dict[str, float]:
        return {c.value: self.component_energy_j(c) for c in Component}

    @property
    def total_energy_j(self) -> float:
        return sum(self.energy_by_component_j.values())

    @property
    def energy_kwh(self) -> float:
        return self.total_energy_j / 3.6e6

    @property
    def avg_power_w(self) -> float:
        return self.total_energy_j / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def sources(self) -> dict[str, str]:
        return {d.key: d.source.value for d in self.devices}

    def tokens_total(self, kind: str | None = None) -> int:
        if kind is None:
            return sum(self.tokens.values())
        return self.tokens.get(kind, 0)

    def joules_per_token(self, kind: str = "generation") -> float | None:
        n = self.tokens.get(kind, 0)
        if n <= 0:
            return None
        return self.total_energy_j / n

    def __str__(self) -> str:
        """The same summary table as `wattmeter run` prints."""
        from .summary import render   # summary imports this module

        return render(self)
