"""Zones, the shipped tables, and the country-table generator."""
from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from pathlib import Path

import pytest

from wattmeter.carbon.tables import load_table, zone_index
from wattmeter.carbon.zones import resolve_cloud, resolve_zone, suggest
from wattmeter.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gen_country_table", REPO / "tools" / "gen_country_table.py")
gen_country_table = importlib.util.module_from_spec(_spec)   # a script, loaded for its pure build_table
_spec.loader.exec_module(gen_country_table)

FACTS_2023 = {"WORLD": 481, "US": 369, "FR": 56, "DE": 381, "GB": 238, "CN": 582, "IN": 713, "SE": 41,
              "PL": 662, "NO": 30, "JP": 485}


@pytest.mark.parametrize("zone,g", sorted(FACTS_2023.items()))
def test_country_table_matches_ember_2023_facts(zone, g):
    row = zone_index()[zone]
    assert round(row.g_per_kwh) == g and row.year == 2023


@pytest.mark.parametrize("name", ["countries", "us", "cloud_regions", "gpu_power"])
def test_every_table_records_source_year_and_licence(name):
    meta = load_table(name)["_meta"]
    text = json.dumps(meta)
    assert "source" in text and "year" in text and "licence" in text


def test_cloud_tables_carry_provider_pue_and_no_odbl_data():
    providers = load_table("cloud_regions")["providers"]
    assert {p: providers[p]["pue"] for p in providers} == {"aws": 1.135, "gcp": 1.1, "azure": 1.185}
    for name in ("countries", "us", "cloud_regions"):
        assert "electricitymaps" not in json.dumps(load_table(name)).lower().replace(" ", "")


@pytest.mark.parametrize("spec,key", [
    ("FR", "FR"), ("fr", "FR"), ("FRA", "FR"), ("France", "FR"), ("world", "WORLD"), ("UK", "GB"),
    ("US-CA", "US-CA"), ("CAMX", "CAMX"), ("US-CAMX", "CAMX"), ("egrid:erct", "ERCT"),
    ("aws:us-east-1", "aws:us-east-1"), ("gcp:europe-west1", "gcp:europe-west1"),
    ("azure:westeurope", "azure:westeurope"), ("AWS:US-EAST-1", "aws:us-east-1"),
])
def test_zones_resolve(spec, key):
    assert resolve_zone(spec).key == key


def test_us_state_and_subregion_values_come_from_egrid():
    ca, camx = resolve_zone("US-CA"), resolve_zone("CAMX")
    assert ca.g_per_kwh == pytest.approx(394.769 * 0.45359237, abs=1e-3) and ca.dataset == "egrid2023-state"
    assert camx.g_per_kwh == pytest.approx((497.443 + 28 * 0.03 + 265 * 0.004) * 0.45359237, abs=1e-3)


@pytest.mark.parametrize("spec,expected", [
    ("FRR", "FR (France)"), ("Frnace", "FR (France)"), ("US-CAA", "US-CA"),
    ("aws:us-east-7", "aws:us-east-1"), ("gcp:europe-west", "gcp:europe-west1"),
    ("azure:west-europe", "azure:westeurope"), ("amazon:us-east-1", "aws:us-east-1"),
])
def test_unknown_zone_names_the_closest(spec, expected):
    with pytest.raises(UsageError) as exc:
        resolve_zone(spec)
    message = str(exc.value)
    assert "\n" not in message and spec in message and expected in message


def test_cloud_needs_provider_prefix():
    with pytest.raises(UsageError, match="provider prefix"):
        resolve_cloud("us-east-1")


def test_suggest_is_case_insensitive():
    assert suggest("camx", ["CAMX", "ERCT"]) == ["CAMX"]


# -- the country table and its generator --------------------------------------------------------

def test_generator_builds_rows_from_codecarbon_shape():
    mix = {"FRA": {"carbon_intensity": 56.0391, "country_name": "France", "year": 2023, "iso_code": "FRA"},
           "XXX": {"carbon_intensity": 1.0, "country_name": "Nowhere", "year": 2023}}
    table = gen_country_table.build_table(mix, "9.9")
    assert table["zones"]["FR"] == {"g_per_kwh": 56.039, "iso3": "FRA", "name": "France", "year": 2023}
    assert table["zones"]["WORLD"]["g_per_kwh"] == 481.0
    assert table["_meta"]["skipped_iso3"] == ["XXX"] and table["_meta"]["generated_from"] == "codecarbon 9.9"
    json.loads(gen_country_table.render(table))


def test_committed_table_matches_generator_output_where_codecarbon_is_installed():
    if importlib.util.find_spec("codecarbon") is None:
        pytest.skip("the codecarbon extra is not installed")
    committed = json.loads((REPO / "agent/carbon/data/countries.json").read_text(encoding="utf-8"))
    version = metadata.version("codecarbon")
    if committed["_meta"]["generated_from"] != f"codecarbon {version}":
        pytest.skip(f"table generated from {committed['_meta']['generated_from']}, installed {version}: "
                    "run tools/gen_country_table.py to refresh")
    path, _ = gen_country_table.codecarbon_source()
    fresh = gen_country_table.render(gen_country_table.build_table(json.loads(path.read_text()), version))
    assert (REPO / "agent/carbon/data/countries.json").read_text(encoding="utf-8") == fresh
