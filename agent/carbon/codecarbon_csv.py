"""Run records as rows of CodeCarbon's ``emissions.csv`` so its users' tooling reads ours.

Columns and units follow ``codecarbon.output_methods.emissions_data.EmissionsData``
(CodeCarbon 3.x): duration s, emissions kg CO2e, emissions_rate kg/s, powers W, energies kWh,
water L. Like CodeCarbon, powers and energies are scaled by PUE. Fields wattmeter does not
know (os, cpu_model, coordinates...) are left empty rather than invented. A run on simulated
GPUs says so in ``gpu_model`` ("... (SIMULATED: fake NVML)").
"""
from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any, Iterable, Mapping

from .accounting import J_PER_KWH

try:  # formats floats ~3x faster than repr (float_reprs); optional, as for reading records
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover - repr gives the same text
    _dumps = None
from .tables import load_table, zone_index

CODECARBON_COLUMNS = [
    "timestamp", "project_name", "run_id", "experiment_id", "duration", "emissions", "emissions_rate",
    "cpu_power", "gpu_power", "ram_power", "cpu_energy", "gpu_energy", "ram_energy", "energy_consumed",
    "water_consumed", "country_name", "country_iso_code", "region", "cloud_provider", "cloud_region", "os",
    "python_version", "codecarbon_version", "cpu_count", "cpu_model", "gpu_count", "gpu_model", "longitude",
    "latitude", "ram_total_size", "tracking_mode", "cpu_utilization_percent", "gpu_utilization_percent",
    "ram_utilization_percent", "ram_used_gb", "on_cloud", "pue", "wue",
]


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _where(zone_key: str | None) -> dict[str, str]:
    zone = zone_index().get(zone_key or "")
    if zone is None:
        return {"country_name": "", "country_iso_code": "", "region": "", "cloud_provider": "",
                "cloud_region": "", "on_cloud": "N"}
    country = zone_index().get(zone.country)
    iso3 = ""
    if country is not None:
        iso3 = load_table("countries")["zones"].get(country.key, {}).get("iso3", "")
    return {
        "country_name": country.name if country else "", "country_iso_code": iso3,
        "region": zone.name.lower() if zone.kind in ("us-state", "egrid") else "",
        "cloud_provider": zone.provider or "", "cloud_region": zone.region or "",
        "on_cloud": "Y" if zone.provider else "N",
    }


def _timestamp(record: Mapping[str, Any]) -> str:
    end = record.get("end_unix")
    if isinstance(end, (int, float)) and not isinstance(end, bool):
        return dt.datetime.fromtimestamp(end, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return str(record.get("end") or record.get("start") or "")[:19]


def codecarbon_row(record: Mapping[str, Any], places: dict[str | None, dict[str, str]] | None = None) -> dict[str, Any]:
    """One CodeCarbon row; ``places`` caches the location columns per zone across rows."""
    energy = record.get("energy_j") or {}
    carbon = record.get("carbon")
    if not (isinstance(carbon, dict) or isinstance(carbon, Mapping)):   # dict first: typing's check is slow
        carbon = {}
    pue = _num(carbon.get("pue")) or 1.0
    duration = _num(record.get("duration_s"))
    kwh = {c: _num(energy.get(c)) / J_PER_KWH * pue for c in ("cpu", "gpu", "ram")}
    total_kwh = _num(energy.get("total")) / J_PER_KWH * pue
    em = carbon.get("emissions_g")
    if not (isinstance(em, dict) or isinstance(em, Mapping)):
        em = {}
    kg = _num(em.get("location")) / 1000.0 if "location" in em else None
    models = [str(m) for m in record.get("gpu_models") or ()]
    gpus = int(_num(record.get("gpu_count")))
    labels = record.get("labels") or {}
    row: dict[str, Any] = {c: "" for c in CODECARBON_COLUMNS}
    row.update({
        "timestamp": _timestamp(record),
        "project_name": labels.get("project") or record.get("job") or "",
        "run_id": record.get("run_id", ""),
        "experiment_id": record.get("job") or "",
        "duration": duration,
        "emissions": "" if kg is None else kg,
        "emissions_rate": "" if kg is None else (kg / duration if duration > 0 else 0.0),
        "cpu_power": kwh["cpu"] * J_PER_KWH / duration if duration > 0 else 0.0,
        "gpu_power": kwh["gpu"] * J_PER_KWH / duration if duration > 0 else 0.0,
        "ram_power": kwh["ram"] * J_PER_KWH / duration if duration > 0 else 0.0,
        "cpu_energy": kwh["cpu"], "gpu_energy": kwh["gpu"], "ram_energy": kwh["ram"],
        "energy_consumed": total_kwh,
        "water_consumed": _num(carbon.get("water_l")),
        "codecarbon_version": "",
        "gpu_count": gpus,
        # CodeCarbon has no "simulated" column; its readers show gpu_model, so the mark goes there
        "gpu_model": (f"{model_text(models, gpus)} (SIMULATED: fake NVML)" if record.get("simulated")
                      else model_text(models, gpus) if models else ""),
        "tracking_mode": "process",   # wattmeter's energy_j is the job's share, not the whole machine
        "pue": pue,
        "wue": "",
    })
    zone = carbon.get("zone")
    if places is None:
        row.update(_where(zone))
    else:
        if zone not in places:
            places[zone] = _where(zone)
        row.update(places[zone])
    if carbon.get("water_l") is not None and total_kwh:
        row["wue"] = _num(carbon["water_l"]) / (total_kwh / pue)
    return row


def model_text(models: list[str], gpus: int) -> str:
    if not models:
        return f"{gpus} GPU(s)"
    return f"{gpus} x {models[0]}" if len(set(models)) == 1 else ", ".join(models)


def codecarbon_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [codecarbon_row(r) for r in records]


def csv_cell(text: str) -> str:
    """A text cell as ``csv.writer`` writes it (the excel dialect, QUOTE_MINIMAL): as it is unless
    it holds a character that may need quoting, and then whatever the csv module makes of it."""
    if "," in text or '"' in text or "\n" in text or "\r" in text or "\x00" in text:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow([text, ""])
        return out.getvalue()[:-2]           # the cell, without the empty second one and the newline
    return text


def csv_cells(cells: Iterable[Any]) -> str:
    """Cells as ``csv.writer`` joins them: None empty, text by :func:`csv_cell`, numbers by str()
    (repr for floats, True/False for bools)."""
    return ",".join(["" if c is None else csv_cell(c) if isinstance(c, str) else str(c) for c in cells])


def float_reprs(values: list[float]) -> list[str]:
    """``[repr(v) for v in values]``, from one orjson call where that gives the same text: orjson
    writes the same shortest digits, but fixed-point below 1e-4 ("0.00001") and exponents without
    Python's padding ("1e-7"), and null for NaN and infinities; those values go through repr. A
    third of a float's cost when a report writes 200k runs x 7 floats."""
    if _dumps is None or not values:
        return [repr(v) for v in values]
    text = _dumps(values).decode()
    texts = text[1:-1].split(",")
    if "e" in text or "0.0000" in text or "n" in text:        # n: null
        return [repr(v) if "e" in t or "0.0000" in t or "n" in t else t for v, t in zip(values, texts)]
    return texts


# one CodeCarbon row, CODECARBON_COLUMNS in order: the constant cells are written in (os,
# python_version, codecarbon_version, cpu_count, cpu_model; longitude, latitude, ram_total_size;
# tracking_mode "process"; the four utilisation columns), the rest are filled per run
_LINE = "%s,%s,%s,%s,%r,%s,%s,%r,%r,%r,%r,%r,%r,%r,%r,%s,,,,,,%d,%s,,,,process,,,,,%s,%r,%s"


class CodeCarbonLines:
    """:func:`codecarbon_row` straight from a report row's stored fields (``rowstore.FLOATS``,
    ``INTS``, ``OBJS``), as the line ``csv.writer`` would write for it (no newline): a 200k-run
    report formats each run once, without rebuilding a record, a dict and a csv row per run.
    The location cells, the model text and the project are worked out once per zone, model
    list and label set; the timestamp once per day plus integer arithmetic."""

    def __init__(self) -> None:
        self._places: dict[str | None, tuple[str, str]] = {}
        self._models: dict[tuple[Any, int, bool], str] = {}
        self._projects: dict[Any, str] = {}
        self._days: dict[int, str] = {}

    def _place(self, zone: str | None) -> tuple[str, str]:
        """(the five cells country_name .. cloud_region, on_cloud) for a zone."""
        got = self._places.get(zone)
        if got is None:
            where = _where(zone)
            got = self._places[zone] = (csv_cells(where[k] for k in _PLACE_COLUMNS), csv_cell(where["on_cloud"]))
        return got

    def _timestamp(self, end_unix: float) -> str:
        whole = int(end_unix)
        if end_unix - whole >= 0.999:      # rounding to microseconds could carry into the next second
            return dt.datetime.fromtimestamp(end_unix, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        day, second = divmod(whole, 86400)
        text = self._days.get(day)
        if text is None:
            text = self._days[day] = dt.datetime.fromtimestamp(day * 86400, dt.timezone.utc).strftime("%Y-%m-%dT")
        hours, second = divmod(second, 3600)
        return "%s%02d:%02d:%02d" % (text, hours, second // 60, second % 60)

    def __call__(self, floats: Any, ints: Any, objs: Any) -> str:
        (duration, gpu_j, cpu_j, ram_j, total_j, loc, _mkt, _emb, water, _gpu_h, _inten, pue, end_unix, _kwh,
         _share) = floats
        _tokens, _prompt, _gen, gpus, flags = ints
        run_id, job, _host, _day, start, _status, labels, zone, _source, models, end = objs
        # the stored rows hold NaN for "none" (rowstore); codecarbon_row reads the same fields
        # from the record a row stands for (JobRow.as_record)
        if not (pue == pue and pue != 0.0):
            pue = 1.0
        cpu_kwh, gpu_kwh, ram_kwh = cpu_j / J_PER_KWH * pue, gpu_j / J_PER_KWH * pue, ram_j / J_PER_KWH * pue
        total_kwh = total_j / J_PER_KWH * pue
        project = self._projects.get(labels)
        if project is None:
            project = self._projects[labels] = dict(labels).get("project") or ""
        simulated = bool(flags & 2)
        model = self._models.get((models, gpus, simulated))
        if model is None:
            text = model_text(list(models), gpus)
            model = self._models[(models, gpus, simulated)] = csv_cell(
                f"{text} (SIMULATED: fake NVML)" if simulated else text if models else "")
        if loc == loc:
            kg = loc / 1000.0
            emissions, rate = repr(kg), repr(kg / duration if duration > 0 else 0.0)
        else:
            emissions = rate = ""
        if duration > 0:
            cpu_w, gpu_w, ram_w = cpu_kwh * J_PER_KWH / duration, gpu_kwh * J_PER_KWH / duration, \
                ram_kwh * J_PER_KWH / duration
        else:
            cpu_w = gpu_w = ram_w = 0.0
        has_water = water == water
        where, on_cloud = self._place(zone)
        return _LINE % (
            self._timestamp(end_unix) if end_unix == end_unix else csv_cell((end or start or "")[:19]),
            csv_cell(project or job or ""), csv_cell(run_id), csv_cell(job or ""), duration, emissions, rate,
            cpu_w, gpu_w, ram_w, cpu_kwh, gpu_kwh, ram_kwh, total_kwh, water if has_water else 0.0,
            where, gpus, model, on_cloud, pue,
            repr(water / (total_kwh / pue)) if has_water and total_kwh else "")


_PLACE_COLUMNS = ("country_name", "country_iso_code", "region", "cloud_provider", "cloud_region")
