"""``wattmeter estimate``: a job's kWh and CO2e before it runs (as the ML CO2 Impact calculator does).

Power per GPU is the shipped board power (``data/gpu_power.json``) times a utilisation, or,
with ``--calibrate RECORDS``, the average power measured on GPUs of the same family in past
runs. Intensity is always the offline table: a live "now" says nothing about a future job.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .accounting import J_PER_KWH, CarbonResult, build_result, emissions_g
from .config import CarbonConfig
from .intensity import IntensityReading
from .records import RecordSet
from .tables import ZoneInfo, load_table
from .zones import suggest


@dataclass(frozen=True)
class GpuSpec:
    name: str
    board_power_w: float
    vendor: str
    family: str


def _norm(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


def gpu_names() -> list[str]:
    table = load_table("gpu_power")
    return list(table["gpus"]) + list(table["_meta"].get("aliases", {}))


def lookup_gpu(name: str) -> GpuSpec:
    """A GPU by model name or alias, case- and separator-insensitive; unknown names get the closest."""
    table = load_table("gpu_power")
    gpus, aliases = table["gpus"], table["_meta"].get("aliases", {})
    by_norm = {_norm(k): k for k in gpus}
    by_norm.update({_norm(a): target for a, target in aliases.items()})
    key = by_norm.get(_norm(name))
    if key is None:
        close = suggest(name, gpu_names())
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise UsageError(f"unknown GPU model {name!r}{hint}; the table lists {len(gpus)} models "
                         "(agent/carbon/data/gpu_power.json)")
    row = gpus[key]
    return GpuSpec(key, float(row["board_power_w"]), row.get("vendor", ""), row.get("family", key))


@dataclass(frozen=True)
class Calibration:
    power_w: float               # measured average power per GPU
    runs: int
    devices: int
    gpu_hours: float
    models: tuple[str, ...]
    simulated_runs: int = 0      # runs on fake GPUs that went into power_w (--include-simulated)
    ignored_simulated: int = 0   # runs on fake GPUs left out (the default)


def calibrate(records: RecordSet, spec: GpuSpec, include_simulated: bool = False) -> Calibration | None:
    """Average power of GPUs of ``spec``'s family over the runs in ``records``, or None.

    Runs on simulated GPUs (``"simulated": true``) are left out unless ``include_simulated``:
    a fake GPU's power is a scenario, not a measurement."""
    pattern = re.compile(rf"(?<![a-z0-9]){re.escape(_norm(spec.family))}(?![a-z0-9])")
    energy_j = seconds = 0.0
    runs, devices, models = 0, 0, set()
    simulated = ignored = 0
    for record in records.records:
        if record.get("simulated") and not include_simulated:
            ignored += 1
            continue
        duration = record.get("duration_s")
        if not isinstance(duration, (int, float)) or duration <= 0:
            continue
        matched = False
        for dev in record.get("devices") or ():
            if not isinstance(dev, dict) or dev.get("component") != "gpu":
                continue
            model = str((dev.get("labels") or {}).get("model", ""))
            joules = dev.get("energy_j")
            if pattern.search(_norm(model)) and isinstance(joules, (int, float)) and joules >= 0:
                energy_j += joules
                seconds += duration
                devices += 1
                models.add(model)
                matched = True
        runs += matched
        simulated += bool(matched and record.get("simulated"))
    if seconds <= 0:
        return None if not ignored else Calibration(0.0, 0, 0, 0.0, (), 0, ignored)
    return Calibration(energy_j / seconds, runs, devices, seconds / 3600.0, tuple(sorted(models)),
                       simulated, ignored)


@dataclass(frozen=True)
class Estimate:
    gpu: GpuSpec
    count: int
    hours: float
    utilisation: float
    power_w_per_gpu: float
    basis: str                   # "board power" or "measured"
    calibration: Calibration | None
    zone: ZoneInfo
    result: CarbonResult

    @property
    def gpu_hours(self) -> float:
        return self.count * self.hours

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gpu": self.gpu.name, "count": self.count, "hours": self.hours, "utilisation": self.utilisation,
            "board_power_w": self.gpu.board_power_w, "power_w_per_gpu": self.power_w_per_gpu,
            "power_basis": self.basis, "gpu_hours": self.gpu_hours,
            "power_source": table_source(), "carbon": self.result.to_record(),
            "g_per_gpu_hour": self.result.emissions_g["location"] / self.gpu_hours,
        }
        if self.calibration is not None:
            c = self.calibration
            out["calibration"] = {"power_w": c.power_w, "runs": c.runs, "devices": c.devices,
                                  "gpu_hours": c.gpu_hours, "models": list(c.models),
                                  "simulated_runs": c.simulated_runs, "ignored_simulated_runs": c.ignored_simulated}
        return out


def table_source() -> str:
    return str(load_table("gpu_power")["_meta"].get("source", "gpu_power.json"))


def estimate(spec: GpuSpec, count: int, hours: float, utilisation: float, config: CarbonConfig,
             calibration: Calibration | None = None) -> Estimate:
    """Energy and emissions of ``count`` GPUs for ``hours``. Linear in count, hours and power."""
    if calibration is not None and calibration.runs:
        power, basis = calibration.power_w, "measured" + (" (SIMULATED GPUs)" if calibration.simulated_runs else "")
    else:
        power, basis = spec.board_power_w * utilisation, "board power"
    energy_j = count * power * hours * 3600.0
    zone = config.zone_info()
    pue = config.effective_pue()
    reading = IntensityReading(zone.g_per_kwh, zone.source_label, zone.key)
    result = build_result(config, zone, pue, energy_j / J_PER_KWH, emissions_g(energy_j, zone.g_per_kwh, pue),
                          reading, device_hours=count * hours)
    return Estimate(spec, count, hours, utilisation, power, basis, calibration, zone, result)


def render_text(est: Estimate, utilisation_given: bool = False) -> str:
    r = est.result
    lines = [f"estimate: {est.count} x {est.gpu.name} for {est.hours:g} h in {est.zone.key} ({est.zone.name})"]
    c = est.calibration
    if c is not None and c.runs:
        lines.append(f"power:    {est.power_w_per_gpu:,.1f} W per GPU, measured: average of {c.devices} GPU(s) over "
                     f"{c.runs} run(s), {c.gpu_hours:,.1f} GPU-hours ({', '.join(c.models)}); "
                     f"board power {est.gpu.board_power_w:g} W not used")
        if c.simulated_runs:
            lines.append(f"          SIMULATED: {c.simulated_runs} of these run(s) metered fake GPUs "
                         "(--include-simulated): the power is a scenario's, not a measurement")
        if utilisation_given:
            lines.append("          --utilisation ignored: measured power already reflects utilisation")
    else:
        if c is not None and c.ignored_simulated:
            lines.append(f"note:     {c.ignored_simulated} simulated run(s) ignored for calibration "
                         "(add --include-simulated to use them)")
        lines.append(f"power:    {est.gpu.board_power_w:g} W board power x utilisation {est.utilisation:g} = "
                     f"{est.power_w_per_gpu:,.1f} W per GPU (vendor datasheet figure, carbon/data/gpu_power.json)")
    lines.append(f"energy:   {r.energy_kwh:,.2f} kWh IT; {r.energy_kwh * r.pue:,.2f} kWh with PUE {r.pue:g}")
    lines.append(f"carbon:   {r.emissions_g['location']:,.1f} g CO2e location-based "
                 f"({r.intensity_g_per_kwh:g} g/kWh, {r.intensity_source})")
    if "market" in r.emissions_g:
        lines.append(f"          {r.emissions_g['market']:,.1f} g CO2e market-based "
                     f"(renewable share {r.renewable_share:g})")
    if "embodied" in r.emissions_g:
        lines.append(f"          {r.emissions_g['embodied']:,.1f} g CO2e embodied ({est.gpu_hours:g} GPU-hours)")
    if r.water_l is not None:
        lines.append(f"water:    {r.water_l:,.1f} L")
    lines.append(f"per unit: {r.emissions_g['location'] / est.gpu_hours:,.2f} g CO2e per GPU-hour")
    if r.intensity_source == "table:world-default":
        lines.append("note:     no zone set, world average used (set --zone, --cloud or WATTMETER_ZONE)")
    return "\n".join(lines) + "\n"
