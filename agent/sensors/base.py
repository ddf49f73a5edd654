"""The narrow sensor interface and the cadence contract. A sensor knows nothing about who reads it.

Every sensor is read by the sampler on its own thread at ``period_s`` (jittered, so a fixed
cadence cannot alias with a periodic load). A sensor that needs more than a steady period
declares it by implementing ``ScheduledSensor``:

- ``min_period_s``: the fastest cadence it supports; ``set_period`` takes ``--interval``;
- ``next_read_at(now)``: when it next wants a read (a counter pair around a predicted refresh,
  the next field value), or None;
- ``wants_fast(now)``: read it at the sampler's fast cadence now (calibrating counter timing);
- ``fast_edges``: read it fast while a window edge waits on one of its devices, through
  ``read(now, fast=True)``.

``devices()`` may grow after the sampler started (a GPU that appears late): the sampler adds
new devices to the ledger as their readings arrive. Sensors never read a clock of their own:
the time of each read is passed in, and a sensor that must time a call takes the meter's clock.
"""
from __future__ import annotations

import threading
import types
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ..clock import Clock
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

    def devices(self) -> Sequence[Device]:
        """The devices it meters. May grow after start (never shrinks)."""

    def read(self, now: float) -> Batch:
        """Read every device once. Never raises for one failing device: report it in ``Batch.errors``."""

    def close(self) -> None: ...


@runtime_checkable
class ScheduledSensor(Sensor, Protocol):
    """A sensor with a cadence of its own beyond a steady period (see the module docstring)."""

    min_period_s: float    # the fastest cadence it supports
    fast_edges: bool       # read fast while a window edge waits on one of its devices

    def set_period(self, period_s: float) -> None:
        """Read at this cadence from now on (``--interval``; never below ``min_period_s``)."""

    def next_read_at(self, now: float) -> float | None:
        """When the next read is due beyond the steady cadence, or None."""

    def wants_fast(self, now: float) -> bool:
        """Whether to read at the sampler's fast cadence now (e.g. to time a counter's refreshes)."""

    def read(self, now: float, fast: bool = False) -> Batch:
        """As ``Sensor.read``; ``fast``: an edge waits, so schedule what resolves it soonest."""


class SteadyCadence:
    """The cadence of a sensor that declares none: read every ``period_s``, nothing more. The
    sampler wraps plain sensors in it, so it only ever deals with ``ScheduledSensor``."""

    fast_edges = False

    def __init__(self, sensor: Sensor, min_period_s: float = 0.01) -> None:
        self.sensor = sensor
        self.name = sensor.name
        self.period_s = sensor.period_s
        self.min_period_s = min_period_s

    def devices(self) -> Sequence[Device]:
        return self.sensor.devices()

    def set_period(self, period_s: float) -> None:
        self.period_s = max(period_s, self.min_period_s)

    def next_read_at(self, now: float) -> float | None:
        return None

    def wants_fast(self, now: float) -> bool:
        return False

    def read(self, now: float, fast: bool = False) -> Batch:
        return self.sensor.read(now)

    def close(self) -> None:
        self.sensor.close()


@runtime_checkable
class CadenceFloor(Protocol):
    """Optional capability of a ``ScheduledSensor``: until when a steady-cadence read would do
    nothing (it read what such a read would, too recently), so the sampler skips those slots
    instead of waking up for them. Fast reads and ``next_read_at`` wishes are never skipped."""

    def cadence_floor(self, now: float) -> float:
        """Steady reads before this clock time are no-ops (-inf: every read counts)."""
        ...


def scheduled(sensor: Sensor) -> ScheduledSensor:
    """The sensor itself where it declares a cadence, else a steady one around it."""
    return sensor if isinstance(sensor, ScheduledSensor) else SteadyCadence(sensor)


@runtime_checkable
class ProcessSensor(Protocol):
    """Optional capability: per-process GPU usage, for attribution."""

    def read_processes(self, now: float) -> list[ProcessUsage]: ...


@runtime_checkable
class MigSensor(Protocol):
    """Optional capability: how MIG splits each GPU. NVML has no per-instance power, so
    attribution apportions a GPU's energy by its instances' SM fractions; the UUIDs place the
    device plugin's ``MIG-<uuid>`` IDs through the kubelet's pod-resources API."""

    def mig_layout(self) -> dict[str, dict[str, float]]:
        """GPU key -> {GPU instance id: fraction of the GPU's SMs}, for GPUs in MIG mode."""
        ...

    def mig_uuids(self) -> dict[str, tuple[str, str]]:
        """MIG device UUID -> (parent GPU UUID, GPU instance id)."""
        ...


@runtime_checkable
class CpuCoverage(Protocol):
    """Optional capability of a modelled CPU sensor: the CPU counters its utilisation comes
    from and its idle floor, so a process's share is taken of the CPUs the model covers (RAPL,
    which has neither, covers the host)."""

    cpu_counters: Any        # sensors.cpu.CpuCounters
    idle_frac: float


@runtime_checkable
class MemCoverage(Protocol):
    """Optional capability of a modelled RAM sensor: the memory its model covers (a cgroup's
    limit, else the host's), so a process's share is taken of that."""

    mem_bytes: int


class SimulatedNvml(types.ModuleType):
    """A ``pynvml`` stand-in declares itself by this type (the fake NVML, ``wattmeter.sim``):
    its readings are labelled simulated, and its GPUs run on ``clock``, which times counter calls
    unless the caller passes one. A deadline wrapper of one is one too (``sensors/guard.py``)."""

    clock: Clock


@runtime_checkable
class DeadlineLanes(Protocol):
    """Driver calls under a deadline, off the caller's thread (``sensors/guard.py``): what a
    deadline-wrapped ``pynvml`` module carries as ``WATTMETER_DEADLINES``. A sensor that reads
    several GPUs hands one read of each to ``run_each`` (one hand-off for all of them)."""

    def run_each(self, calls: Sequence[tuple[Any, Callable[[], Any]]]) -> list[Any]:
        """Run each ``(handle, fn)``'s ``fn()``; in order, its value or the exception it raised
        (the vendor's timeout error where that GPU's call hung or is stale). A hung GPU never
        holds back another's call, and the whole waits at most one deadline."""
        ...


class ReaderAbandoned(BaseException):
    """Raised on a reader thread that was replaced while one of its driver calls hung: the
    thread ends once that call returns, and nothing it read is recorded (its replacement has
    read on meanwhile). A BaseException, so no sensor's ``except Exception`` swallows it."""


class Reader:
    """A sampler reader thread that another thread may replace. Driver calls made on it may run
    on it directly, without a hand-off to a worker thread (``DeadlineLanes``): a call that hangs
    past its deadline gets ``abandon()`` called from elsewhere, which starts a fresh reader
    (``replace``); the hung thread ends once its call returns (``ReaderAbandoned``)."""

    def __init__(self, replace: Callable[[], None]) -> None:
        self.abandoned = False
        self._replace = replace

    def abandon(self) -> None:
        self.abandoned = True
        self._replace()


class _ThreadReader(threading.local):
    reader: Reader | None = None


_thread_reader = _ThreadReader()


def declare_reader(reader: Reader | None) -> None:
    """The sampler says that the calling thread is ``reader`` (None: an ordinary thread)."""
    _thread_reader.reader = reader


def current_reader() -> Reader | None:
    """The replaceable reader running on this thread, if the sampler declared one."""
    return _thread_reader.reader
