"""Offline carbon tables shipped under ``carbon/data``: loading and one flat index of zones.

Each data file records its own source, year and licence in ``_meta`` (see docs/carbon.md).
Loads are cached: the files are read-only package data, so the cache never needs resetting.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

WORLD_KEY = "WORLD"
_PROVIDER_NAMES = {"aws": "AWS", "gcp": "GCP", "azure": "Azure"}


@dataclass(frozen=True)
class ZoneInfo:
    """One place electricity can come from, with its offline intensity."""

    key: str                   # canonical: "FR", "US-CA", "CAMX", "aws:us-east-1", "WORLD"
    name: str                  # "France", "California", "WECC California", "AWS us-east-1 (United States)"
    kind: str                  # country | us-state | egrid | cloud | world
    g_per_kwh: float           # offline (table) intensity
    year: int | str
    dataset: str               # short label of the table row's origin, e.g. "ember-owid-2023"
    country: str               # ISO-3166 alpha-2 of the location ("US" for states and subregions)
    provider: str | None = None        # aws | gcp | azure for cloud regions
    default_pue: float | None = None   # the provider's default PUE for cloud regions

    @property
    def source_label(self) -> str:
        return f"table:{self.dataset}"

    @property
    def region(self) -> str | None:
        """The cloud region name without its provider prefix."""
        return self.key.split(":", 1)[1] if self.provider else None


def load_table(name: str) -> dict[str, Any]:
    """A data file by stem (``countries``, ``us``, ``cloud_regions``, ``gpu_power``), parsed."""
    return _load(name)


@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict[str, Any]:
    ref = resources.files("wattmeter.carbon").joinpath("data", f"{name}.json")
    return json.loads(ref.read_text(encoding="utf-8"))


def table_meta(name: str) -> Mapping[str, Any]:
    return load_table(name).get("_meta", {})


@functools.lru_cache(maxsize=None)
def zone_index() -> dict[str, ZoneInfo]:
    """Every zone by canonical key. Built once from the four tables."""
    zones: dict[str, ZoneInfo] = {}
    for key, row in load_table("countries")["zones"].items():
        kind = "world" if key == WORLD_KEY else "country"
        zones[key] = ZoneInfo(key, row["name"], kind, float(row["g_per_kwh"]), row["year"],
                              f"ember-owid-{row['year']}", "" if kind == "world" else key)
    us = load_table("us")
    for code, row in us["states"].items():
        zones[f"US-{code}"] = ZoneInfo(f"US-{code}", row["name"], "us-state", float(row["g_per_kwh"]),
                                       row["year"], f"egrid{row['year']}-state", "US")
    for code, row in us["subregions"].items():
        zones[code] = ZoneInfo(code, row["name"], "egrid", float(row["g_per_kwh"]), row["year"],
                               f"egrid{row['year']}-subregion", "US")
    for provider, block in load_table("cloud_regions")["providers"].items():
        dataset = "google-2023" if provider == "gcp" else f"ccf-{provider}"
        for region, row in block["regions"].items():
            key = f"{provider}:{region}"
            name = f"{_PROVIDER_NAMES.get(provider, provider)} {region} ({row.get('location', row['country'])})"
            zones[key] = ZoneInfo(key, name, "cloud", float(row["g_per_kwh"]), block["year"], dataset,
                                  row["country"], provider, float(block["pue"]))
    return zones


def provider_pue(provider: str) -> float:
    return float(load_table("cloud_regions")["providers"][provider]["pue"])


def cloud_providers() -> list[str]:
    return list(load_table("cloud_regions")["providers"])
