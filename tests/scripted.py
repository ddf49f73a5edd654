"""A tiny in-test sensor with an exact power function, for core tests in virtual time."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from wattmeter.model import Batch, Component, Device, Reading, Source


@dataclass
class ScriptedSensor:
    """One device. ``energy(t)`` is the exact cumulative energy; ``mode`` picks what is reported."""

    energy: Callable[[float], float]
    power: Callable[[float], float]
    mode: str = "counter"              # counter | power
    key: str = "gpu0"
    component: Component = Component.GPU
    period_s: float = 0.1
    name: str = "scripted"
    fail_at: set = field(default_factory=set)

    def devices(self) -> list[Device]:
        src = Source.COUNTER if self.mode == "counter" else Source.SAMPLED
        return [Device(self.key, self.component, src, labels={"gpu": "0", "model": "Scripted"},
                       update_period_s=self.period_s)]

    def read(self, now: float) -> Batch:
        if now in self.fail_at:
            from wattmeter.model import SensorError
            return Batch(errors=[SensorError(self.name, "gpu_lost", self.key)])
        if self.mode == "counter":
            return Batch([Reading(self.key, now, energy_j=self.energy(now))])
        return Batch([Reading(self.key, now, power_w=self.power(now))])

    def close(self) -> None:
        pass


def constant(power_w: float, t0: float = 0.0) -> tuple[Callable[[float], float], Callable[[float], float]]:
    return (lambda t: power_w * (t - t0)), (lambda t: power_w)


@dataclass
class CounterSensor:
    """GPU energy counters we set by hand: key -> E(t) in J."""

    energy: dict[str, Callable[[float], float]]
    name: str = "fake"
    period_s: float = 0.1

    def devices(self) -> list[Device]:
        return [Device(k, Component.GPU, Source.COUNTER) for k in self.energy]

    def read(self, now: float) -> Batch:
        return Batch([Reading(k, now, energy_j=f(now)) for k, f in self.energy.items()])

    def close(self) -> None:
        pass
