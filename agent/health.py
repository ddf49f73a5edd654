"""Is each device still delivering data? Judged from the ledger's own points, never by a probe.

Used by the exporter (``wattmeter_up{sensor,device}`` and the sensor-level ``wattmeter_up``)
and by ``/healthz``. A sensor's read can fail for one GPU while the others work: counting its
last read as "down" made ``wattmeter_up{sensor="nvml"}`` flap with every read (issue 8). Here a
device is up while its newest ledger point is younger than ``stale_after_s``, and a sensor is up
while any of its devices is, so one lost GPU turns its own series to 0 and keeps it there.

It also declares the error kinds each sensor can count, so the exporter can export every
``wattmeter_sensor_errors_total{sensor,error}`` at 0 from the start: an alert on
``increase()`` needs the 0 before the first error to see a short burst at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence

if TYPE_CHECKING:     # types only: exporters import this module and must not load a sensor
    from .ledger import DeviceSnapshot
    from .sampler import SensorStatus
    from .sensors.base import Sensor

# A counter GPU's energy is read every 4-8 s, up to 3 s later where it waits for a cadence read
# (sensors/counter_timing.py): 15 s without a point is a device that stopped, not a slow one.
DEVICE_STALE_S = 15.0

# What each sensor counts in wattmeter_sensor_errors_total{error}; "exception" is the
# sampler's catch-all for a sensor bug. Kept in step with the sensors (tests/test_health.py).
SENSOR_ERROR_KINDS: Mapping[str, tuple[str, ...]] = {
    "nvml": ("gpu_lost", "timeout", "not_supported", "permission", "uninitialized", "not_found", "nvml_error",
             "exception"),
    "rapl": ("permission", "read_failed", "exception"),
    "cpu_model": ("read_failed", "permission", "exception"),
    "ram_model": ("exception",),
}
DEFAULT_ERROR_KINDS = ("exception",)


def error_kinds(sensor: str) -> tuple[str, ...]:
    return SENSOR_ERROR_KINDS.get(sensor, DEFAULT_ERROR_KINDS)


@dataclass(frozen=True)
class DeviceHealth:
    sensor: str
    device: str
    age_s: float | None        # since the newest point; None: never read
    up: bool


class MeterView(Protocol):
    """What freshness needs of a meter (``wattmeter.meter.Meter`` has it)."""

    sensors: Sequence["Sensor"]

    def snapshot(self) -> dict[str, "DeviceSnapshot"]: ...

    @property
    def running(self) -> bool: ...

    @property
    def status(self) -> Mapping[str, "SensorStatus"]: ...


class Freshness:
    def __init__(self, meter: MeterView, now: Callable[[], float], stale_after_s: float = DEVICE_STALE_S) -> None:
        self.meter, self.now, self.stale_after_s = meter, now, stale_after_s
        # sensor name -> its device keys, fixed at start (a meter's devices do not change)
        self._devices = {s.name: tuple(d.key for d in s.devices()) for s in meter.sensors}

    def devices(self) -> list[DeviceHealth]:
        snap, now = self.meter.snapshot(), self.now()
        out = []
        for sensor, keys in sorted(self._devices.items()):
            for key in keys:
                s = snap.get(key)
                age = None if s is None or s.t is None else max(0.0, now - s.t)
                out.append(DeviceHealth(sensor, key, age, age is not None and age <= self.stale_after_s))
        return out

    def sensors_up(self, devices: Sequence[DeviceHealth]) -> dict[str, bool]:
        """A sensor with devices is up while any of them is; one without keeps its last read's state."""
        up: dict[str, bool] = {}
        for d in devices:
            up[d.sensor] = up.get(d.sensor, False) or d.up
        return up

    def healthz(self) -> tuple[bool, str]:
        """``/healthz``: fails (503) when the sampler stopped, or a sensor that was delivering data
        has been stale past the threshold; every sensor and stale device is named."""
        devices = self.devices()
        status = self.meter.status
        problems: list[str] = []
        lines: list[str] = []
        by_sensor: dict[str, list[DeviceHealth]] = {}
        for d in devices:
            by_sensor.setdefault(d.sensor, []).append(d)
        for name in sorted(set(status) | set(by_sensor)):
            devs = by_sensor.get(name, [])
            st = status.get(name)
            last_error = st.last_error if st is not None else ""
            fresh = [d for d in devs if d.up]
            stale = [d for d in devs if not d.up and d.age_s is not None]
            if not devs:
                lines.append(f"{name}: no devices")
                continue
            if stale:
                detail = ", ".join(f"{d.device} stale for {d.age_s:.0f} s" for d in stale)
                detail += f" (last error: {last_error})" if last_error else ""
            else:
                detail = ""
            if fresh:
                lines.append(f"{name}: up ({len(fresh)}/{len(devs)} devices fresh)" + (f"; {detail}" if detail else ""))
            elif stale:
                problems.append(f"{name} stale: {detail}")
                lines.append(f"{name}: down; {detail}")
            else:
                lines.append(f"{name}: starting (no reading yet)")
        if not self.meter.running:
            problems.insert(0, "the sampler is not running")
        ok = not problems
        head = "ok" if ok else "unhealthy: " + "; ".join(problems)
        return ok, head + "\n" + "\n".join(lines)
