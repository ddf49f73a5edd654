"""Carbon accounting: location-based emissions integrated over a job, plus optional scopes.

    location g CO2e = kWh x PUE x intensity          (each interval with its own intensity)
    market   g CO2e = location x (1 - renewable_share)
    embodied g CO2e = device-hours x kg per device x 1000 / (service life in hours)
    water    L      = kWh (IT) x WUE

Scopes are reported side by side and never summed into one figure behind the user's back.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .intensity import IntensityReading, IntensitySource, ProviderError
from .tables import ZoneInfo
from .zones import resolve_zone

if TYPE_CHECKING:  # pragma: no cover
    from .config import CarbonConfig

J_PER_KWH = 3.6e6
HOURS_PER_YEAR = 8766.0      # 365.25 days: service lives are quoted in calendar years
WORLD_DEFAULT_LABEL = "table:world-default"


def emissions_g(energy_j: float, intensity_g_per_kwh: float, pue: float) -> float:
    """Location-based grams CO2e of ``energy_j`` of IT energy. 3.6 MJ at 56 g/kWh, PUE 1.1 -> 61.6 g."""
    return energy_j / J_PER_KWH * pue * intensity_g_per_kwh


def market_g(location_g: float, renewable_share: float) -> float:
    """Market-based grams: only the fossil share ``1 - renewable_share`` emits."""
    return location_g * (1.0 - renewable_share)


def embodied_g(device_hours: float, kg_per_device: float, service_life_years: float) -> float:
    """Manufacturing emissions amortised linearly over the device's service life."""
    return device_hours * kg_per_device * 1000.0 / (service_life_years * HOURS_PER_YEAR)


@dataclass(frozen=True)
class CarbonResult:
    """A snapshot of a job's carbon account (also the ``carbon`` field of a run record)."""

    zone: str
    zone_name: str
    intensity_g_per_kwh: float          # the latest intensity used
    intensity_source: str               # its label, e.g. "table:ember-owid-2023"
    pue: float
    energy_kwh: float                   # IT energy (before PUE)
    emissions_g: Mapping[str, float]    # "location" always; "market", "embodied" when configured
    water_l: float | None = None
    renewable_share: float | None = None
    device_hours: float = 0.0
    intensity_avg_g_per_kwh: float | None = None   # energy-weighted over the job
    sources: tuple[str, ...] = ()                  # every label used, in order of first use

    @property
    def fell_back(self) -> bool:
        return any(s.startswith("table (") for s in self.sources)

    def to_record(self) -> dict[str, Any]:
        """The ``carbon`` object of docs/records.md (fields documented in docs/carbon.md)."""
        rec: dict[str, Any] = {
            "zone": self.zone,
            "zone_name": self.zone_name,
            "intensity_g_per_kwh": round(self.intensity_g_per_kwh, 3),
            "intensity_source": self.intensity_source,
            "pue": self.pue,
            "energy_kwh": self.energy_kwh,
            "emissions_g": {k: v for k, v in self.emissions_g.items()},
        }
        if self.intensity_avg_g_per_kwh is not None:
            rec["intensity_avg_g_per_kwh"] = round(self.intensity_avg_g_per_kwh, 3)
        if len(self.sources) > 1:
            rec["intensity_sources"] = list(self.sources)
        if self.renewable_share is not None:
            rec["renewable_share"] = self.renewable_share
        if "embodied" in self.emissions_g:
            rec["device_hours"] = self.device_hours
        if self.water_l is not None:
            rec["water_l"] = self.water_l
        return rec

    def summary(self) -> str:
        """One human line for run summaries; says so when the world default or a fallback applied."""
        parts = [f"{self.emissions_g.get('location', 0.0):.2f} g CO2e location-based"]
        for scope in ("market", "embodied"):
            if scope in self.emissions_g:
                parts.append(f"{self.emissions_g[scope]:.2f} g {scope}")
        if self.water_l is not None:
            parts.append(f"{self.water_l:.3f} L water")
        where = f"{self.zone} {self.intensity_g_per_kwh:.0f} g/kWh ({self.intensity_source}), PUE {self.pue:g}"
        text = f"{', '.join(parts)}; {where}"
        if self.intensity_source == WORLD_DEFAULT_LABEL:
            text += "; no zone set, world average used (set --zone or WATTMETER_ZONE)"
        elif self.fell_back and not self.intensity_source.startswith("table ("):
            text += "; the live provider failed during the run, the table filled in"
        return text

    def prometheus_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) for ``wattmeter_emissions_grams_total{scope}`` and
        ``wattmeter_grid_intensity_grams_per_kwh{zone,source}``; exporters render them."""
        out = [("wattmeter_emissions_grams_total", {"scope": scope}, grams)
               for scope, grams in self.emissions_g.items()]
        out.append(("wattmeter_grid_intensity_grams_per_kwh",
                    {"zone": self.zone, "source": self.intensity_source}, self.intensity_g_per_kwh))
        return out


@dataclass
class _Totals:
    energy_j: float = 0.0
    location_g: float = 0.0
    weighted_intensity_j: float = 0.0   # sum of energy_j x intensity, for the average
    device_hours: float = 0.0
    sources: list[str] = field(default_factory=list)


class CarbonAccountant:
    """Integrates intensity over a job. Thread-safe; never raises into the metered job.

    The meter calls ``add_energy`` with consecutive intervals. Each interval's energy is
    multiplied by that interval's intensity; the source is asked at most once per
    ``config.ttl_s`` (wall clock ``clock_wall``), and never while holding the lock.
    """

    def __init__(self, config: "CarbonConfig", source: IntensitySource,
                 clock_wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.source = source
        self.zone: ZoneInfo = config.zone_info()
        self.pue = config.effective_pue()
        self._clock_wall = clock_wall
        self._lock = threading.Lock()
        self._totals = _Totals()
        self._reading: IntensityReading | None = None
        self._read_at: float | None = None

    def _intensity(self, t_wall: float) -> IntensityReading:
        now = self._clock_wall()
        with self._lock:
            reading, read_at = self._reading, self._read_at
        if reading is not None and read_at is not None and now - read_at < self.config.ttl_s:
            return reading
        try:
            reading = self.source.read(t_wall)
        except ProviderError as exc:   # an unwrapped live source: keep the last value or the table
            reading = self._reading or IntensityReading(
                self.zone.g_per_kwh, f"table ({self.source.name} failed: {exc.kind})", self.zone.key)
        with self._lock:
            self._reading, self._read_at = reading, now
        return reading

    def add_energy(self, energy_j: float, t_wall_start: float, t_wall_end: float) -> None:
        """Account ``energy_j`` of IT energy spent between the two wall times."""
        if not (isinstance(energy_j, (int, float)) and math.isfinite(energy_j)) or energy_j <= 0:
            return   # a counter glitch must not poison the account, nor raise into the job
        reading = self._intensity((t_wall_start + t_wall_end) / 2.0)
        grams = emissions_g(energy_j, reading.g_per_kwh, self.pue)
        with self._lock:
            t = self._totals
            t.energy_j += energy_j
            t.location_g += grams
            t.weighted_intensity_j += energy_j * reading.g_per_kwh
            if reading.source not in t.sources:
                t.sources.append(reading.source)

    def add_device_hours(self, n_devices: float, hours: float) -> None:
        """Device-hours for the embodied scope (e.g. 8 GPUs for 0.5 h)."""
        if n_devices > 0 and hours > 0 and math.isfinite(n_devices * hours):
            with self._lock:
                self._totals.device_hours += n_devices * hours

    def snapshot(self) -> CarbonResult:
        with self._lock:
            t = self._totals
            energy_j, location, weighted = t.energy_j, t.location_g, t.weighted_intensity_j
            device_hours, sources = t.device_hours, tuple(t.sources)
            reading = self._reading
        if reading is None:   # nothing metered yet: report the table without asking a provider
            reading = IntensityReading(self.zone.g_per_kwh, self.zone.source_label, self.zone.key)
        return build_result(self.config, self.zone, self.pue, energy_j / J_PER_KWH, location,
                            reading, device_hours, weighted / energy_j if energy_j else None, sources)


def build_result(config: "CarbonConfig", zone: ZoneInfo, pue: float, energy_kwh: float,
                 location_g: float, reading: IntensityReading, device_hours: float = 0.0,
                 avg_intensity: float | None = None, sources: tuple[str, ...] = ()) -> CarbonResult:
    """Assemble the scopes the config asks for around a location-based figure."""
    scopes = {"location": location_g}
    if config.renewable_share is not None:
        scopes["market"] = market_g(location_g, config.renewable_share)
    if config.embodied_kg_per_gpu is not None:
        scopes["embodied"] = embodied_g(device_hours, config.embodied_kg_per_gpu, config.service_life_years)
    water = energy_kwh * config.wue_l_per_kwh if config.wue_l_per_kwh is not None else None
    return CarbonResult(zone.key, zone.name, reading.g_per_kwh, reading.source, pue, energy_kwh, scopes,
                        water, config.renewable_share, device_hours, avg_intensity,
                        sources or (reading.source,))


def record_energy_kwh(record: Mapping[str, Any]) -> float | None:
    """IT energy of a run record in kWh (``energy_kwh``, else ``energy_j.total``)."""
    kwh = record.get("energy_kwh")
    if isinstance(kwh, (int, float)) and not isinstance(kwh, bool):
        return float(kwh)
    energy = record.get("energy_j")
    total = energy.get("total") if isinstance(energy, Mapping) else None
    if isinstance(total, (int, float)) and not isinstance(total, bool):
        return float(total) / J_PER_KWH
    return None


def what_if(record: Mapping[str, Any], zone: ZoneInfo | str) -> dict[str, Any]:
    """A run record's emissions had it run in ``zone`` (table intensity).

    PUE: the target provider's default for a cloud region, else the record's own PUE (1.0 if
    none). Market-based follows the record's renewable share; embodied does not depend on the
    zone and is carried over unchanged.
    """
    target = resolve_zone(zone) if isinstance(zone, str) else zone
    carbon = record.get("carbon") if isinstance(record.get("carbon"), Mapping) else {}
    pue = target.default_pue if target.default_pue is not None else float(carbon.get("pue") or 1.0)
    kwh = record_energy_kwh(record) or 0.0
    scopes: dict[str, float] = {"location": kwh * pue * target.g_per_kwh}
    share = carbon.get("renewable_share")
    if isinstance(share, (int, float)):
        scopes["market"] = market_g(scopes["location"], float(share))
    old = carbon.get("emissions_g") if isinstance(carbon.get("emissions_g"), Mapping) else {}
    if isinstance(old.get("embodied"), (int, float)):
        scopes["embodied"] = float(old["embodied"])
    return {"zone": target.key, "zone_name": target.name, "intensity_g_per_kwh": target.g_per_kwh,
            "intensity_source": target.source_label, "pue": pue, "energy_kwh": kwh, "emissions_g": scopes}
