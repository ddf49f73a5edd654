"""RAPL energy counters through the Linux powercap sysfs tree (Intel, and AMD Zen, which the
kernel's intel_rapl driver exposes under the same ``intel-rapl:N`` names).

Zones overlap, so only a non-overlapping set becomes devices:
- ``package-N`` (whole socket) -> ``cpu.package-N``; its ``core``/``uncore`` subzones lie
  inside it and are never used.
- ``dram`` subzones are *not* inside the package -> ``ram.dram-N`` (a real measurement).
- ``psys`` (platform) includes the packages and DRAM, so it is used only when no package
  zone exists -> ``cpu.psys``.
- ``intel-rapl-mmio:N`` mirrors package N through MMIO and is ignored (summing it doubles).

Counters wrap at ``max_energy_range_uj``; each zone keeps an accumulator so readings are
monotonic cumulative joules since the sensor's first read. That needs at least one read per wrap period, which the
constructor enforces by shortening ``period_s`` if a zone could wrap faster than 3 reads.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from ..model import Batch, Component, Device, Reading, SensorError, Source
from .base import SensorUnavailable

DEFAULT_ROOT = "/sys/class/powercap"
# Counters refresh every ~1 ms and a read costs ~10 µs per zone, but 1 s (the design's CPU cadence)
# is enough: window edges are interpolated on an exact counter, wraps take minutes, and the
# process-share wrapper's /proc scan rides on this cadence.
DEFAULT_PERIOD_S = 1.0
_ASSUMED_MAX_POWER_W = 1000.0  # wrap-time bound when a zone publishes no max power

PERMISSION_FIX = (
    "since Linux 5.10 energy_uj is root-only (CVE-2020-8694): run as root, or grant read access "
    "with deploy/systemd/wattmeter-powercap.service (chgrp powercap + chmod g+r)"
)
NO_RAPL_FIX = (
    "load the driver (modprobe intel_rapl_msr; it also serves AMD Zen); in a container bind-mount "
    "/sys/class/powercap read-only; most cloud VMs expose no RAPL, so the CPU model is used instead"
)

# Compiled on first use (re caches it): hosts without powercap never need it.
_ZONE_PATTERN = r"^intel-rapl:(\d+)(?::(\d+))?$"


@dataclass(frozen=True)
class RaplZone:
    """One powercap zone, used or not. ``note`` says why an unused zone was skipped."""

    zone_id: str            # "intel-rapl:0:1"
    name: str               # "package-0", "dram", "core", "uncore", "psys"
    path: str
    parent: str | None      # "intel-rapl:0" for a subzone
    max_range_uj: int       # wrap point; 0 when the zone does not say
    max_power_w: float | None
    device_key: str | None = None
    note: str = ""

    @property
    def wrap_s(self) -> float:
        """Shortest time the counter can take to wrap (at the zone's maximum power)."""
        if self.max_range_uj <= 0:
            return float("inf")
        return self.max_range_uj / 1e6 / (self.max_power_w or _ASSUMED_MAX_POWER_W)


@dataclass
class _Acc:
    last_raw: int | None = None
    last_t: float | None = None
    energy_j: float = 0.0


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("ascii", "replace").strip()


class RaplSensor:
    """Cumulative package and DRAM energy from RAPL counters (source ``counter``)."""

    name = "rapl"

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        *,
        period_s: float = DEFAULT_PERIOD_S,
        read_text: Callable[[str], str] | None = None,
    ) -> None:
        self._read = read_text or _read_text
        self.root = root
        if not os.path.isdir(root):
            raise SensorUnavailable(self.name, f"no powercap interface: {root} does not exist", NO_RAPL_FIX)
        self.zones: tuple[RaplZone, ...] = tuple(_select(self._discover()))
        used = [z for z in self.zones if z.device_key]
        if not used:
            found = ", ".join(f"{z.zone_id}={z.name}" for z in self.zones) or "none"
            raise SensorUnavailable(self.name, f"no RAPL package or psys zone under {root} (zones: {found})", NO_RAPL_FIX)
        for z in used:  # fail at construction, not on every sample, when counters are unreadable
            self._probe(z)
        self.wrap_s = min(z.wrap_s for z in used)
        self.period_s = min(period_s, self.wrap_s / 3)
        self._slots = [(z, str(z.device_key), _Acc()) for z in used]
        self._devices = tuple(_device(z, self.period_s) for z in used)

    def devices(self) -> Sequence[Device]:
        return self._devices

    def read(self, now: float) -> Batch:
        batch = Batch()
        for z, key, acc in self._slots:
            try:
                raw = int(self._read(os.path.join(z.path, "energy_uj")))
            except (OSError, ValueError) as e:
                kind = "permission" if isinstance(e, PermissionError) else "read_failed"
                batch.errors.append(SensorError(self.name, kind, key, f"{z.zone_id}/energy_uj: {e}"))
                continue
            batch.readings.append(_advance(z.max_range_uj, key, acc, raw, now))
        return batch

    def close(self) -> None:
        pass  # no open handles: each read opens and closes the sysfs file

    # -- internals ----------------------------------------------------------------------
    def _probe(self, z: RaplZone) -> None:
        path = os.path.join(z.path, "energy_uj")
        try:
            int(self._read(path))
        except PermissionError:
            raise SensorUnavailable(self.name, f"permission denied reading {path}", PERMISSION_FIX) from None
        except (OSError, ValueError) as e:
            raise SensorUnavailable(self.name, f"cannot read {path}: {e}", NO_RAPL_FIX) from None

    def _discover(self) -> list[RaplZone]:
        """Zones listed flat under the root (as /sys/class/powercap does) or nested inside
        their parent (as /sys/devices/virtual/powercap/intel-rapl does)."""
        seen: dict[str, str] = {}
        for entry in sorted(os.listdir(self.root)):
            if re.match(_ZONE_PATTERN, entry):
                seen.setdefault(entry, os.path.join(self.root, entry))
                parent_dir = os.path.join(self.root, entry)
                for sub in sorted(os.listdir(parent_dir)) if os.path.isdir(parent_dir) else ():
                    if re.match(_ZONE_PATTERN, sub):
                        seen.setdefault(sub, os.path.join(parent_dir, sub))
        zones = []
        for zone_id, path in seen.items():
            m = re.match(_ZONE_PATTERN, zone_id)
            assert m is not None
            parent = f"intel-rapl:{m.group(1)}" if m.group(2) is not None else None
            zones.append(RaplZone(
                zone_id=zone_id,
                name=self._opt(path, "name") or zone_id,
                path=path,
                parent=parent,
                max_range_uj=int(self._opt(path, "max_energy_range_uj") or 0),
                max_power_w=self._max_power_w(path),
            ))
        return zones

    def _opt(self, path: str, fname: str) -> str | None:
        try:
            return self._read(os.path.join(path, fname))
        except OSError:
            return None

    def _max_power_w(self, path: str) -> float | None:
        """Highest published power for the zone (constraint_*_max_power_uw, else the limits)."""
        values: list[float] = []
        for fname in ("max_power_uw", "power_limit_uw"):
            for i in range(4):
                v = self._opt(path, f"constraint_{i}_{fname}")
                if v and v.isdigit() and int(v) > 0:
                    values.append(int(v) / 1e6)
            if values:
                return max(values)
        return None


def _advance(range_uj: int, key: str, acc: _Acc, raw: int, now: float) -> Reading:
    power_w = None
    if acc.last_raw is None:
        acc.energy_j = 0.0  # from 0, so a re-created sensor never looks like a big jump to the ledger
    else:
        delta = raw - acc.last_raw
        if delta < 0:  # one wrap since the last read (reads are faster than wrap_s / 3)
            delta = delta + range_uj if range_uj > 0 else 0
        acc.energy_j += delta / 1e6
        if acc.last_t is not None and now > acc.last_t:
            power_w = delta / 1e6 / (now - acc.last_t)
    acc.last_raw, acc.last_t = raw, now
    return Reading(key, now, energy_j=acc.energy_j, power_w=power_w)


def _select(zones: list[RaplZone]) -> list[RaplZone]:
    """Assign device keys to a non-overlapping subset and say why the rest are skipped."""
    by_id = {z.zone_id: z for z in zones}
    packages = [z for z in zones if z.parent is None and z.name.startswith("package")]
    out: list[RaplZone] = []
    for z in zones:
        parent = by_id.get(z.parent) if z.parent else None
        if z.name.startswith("package") and z.parent is None:
            out.append(_with(z, f"cpu.{z.name}"))
        elif z.name == "dram" and packages:
            out.append(_with(z, f"ram.dram-{_socket(parent, z)}"))
        elif z.name == "psys":
            out.append(_with(z, None if packages else "cpu.psys",
                             "psys includes the packages and DRAM; summing it would double count" if packages else ""))
        elif parent is not None:
            out.append(_with(z, None, f"inside {parent.name}; counted by it"))
        else:
            out.append(_with(z, None, "not a package, dram or psys zone; not used"))
    return out


def _with(z: RaplZone, key: str | None, note: str = "") -> RaplZone:
    return dataclasses.replace(z, device_key=key, note=note)


def _socket(parent: RaplZone | None, z: RaplZone) -> str:
    if parent is not None and parent.name.startswith("package-"):
        return parent.name[len("package-"):]
    return z.zone_id.split(":")[1]


def _device(z: RaplZone, period_s: float) -> Device:
    assert z.device_key is not None
    component = Component.RAM if z.device_key.startswith("ram.") else Component.CPU
    domain = z.device_key.split(".", 1)[1]
    return Device(
        key=z.device_key,
        component=component,
        source=Source.COUNTER,
        labels={"domain": domain},
        # the counter refreshes every ~1 ms, but a window's edges are interpolated between
        # our reads, so the read period is the resolution a window can honestly claim
        update_period_s=period_s,
    )
