#!/usr/bin/env python3
"""Regenerate agent/carbon/data/countries.json from an installed CodeCarbon.

CodeCarbon (the ``wattmeter[codecarbon]`` extra) ships ``global_energy_mix.json``: Ember and
Energy Institute figures processed by Our World in Data (CC-BY-4.0), one row per ISO-3 country
with a lifecycle ``carbon_intensity`` in g CO2e/kWh and the ``year`` it describes.

The script never imports codecarbon (that pulls pandas); it only locates the package's data
file. Usage::

    python tools/gen_country_table.py            # rewrite the committed table
    python tools/gen_country_table.py --check    # exit 1 if the committed table is stale
    python tools/gen_country_table.py --source path/to/global_energy_mix.json --stdout
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "agent" / "carbon" / "data" / "countries.json"
DATA_REL = ("data", "private_infra", "global_energy_mix.json")

# Not in CodeCarbon's file: the 2023 world average from Ember's Global Electricity Review 2024.
WORLD = {"name": "World", "iso3": "WLD", "g_per_kwh": 481.0, "year": 2023}

ISO3_TO_ISO2 = {
    "ABW": "AW", "AFG": "AF", "AGO": "AO", "ALB": "AL", "ARE": "AE", "ARG": "AR", "ARM": "AM",
    "ASM": "AS", "ATG": "AG", "AUS": "AU", "AUT": "AT", "AZE": "AZ", "BDI": "BI", "BEL": "BE",
    "BEN": "BJ", "BFA": "BF", "BGD": "BD", "BGR": "BG", "BHR": "BH", "BHS": "BS", "BIH": "BA",
    "BLR": "BY", "BLZ": "BZ", "BMU": "BM", "BOL": "BO", "BRA": "BR", "BRB": "BB", "BRN": "BN",
    "BTN": "BT", "BWA": "BW", "CAF": "CF", "CAN": "CA", "CHE": "CH", "CHL": "CL", "CHN": "CN",
    "CIV": "CI", "CMR": "CM", "COD": "CD", "COG": "CG", "COK": "CK", "COL": "CO", "COM": "KM",
    "CPV": "CV", "CRI": "CR", "CUB": "CU", "CYM": "KY", "CYP": "CY", "CZE": "CZ", "DEU": "DE",
    "DJI": "DJ", "DMA": "DM", "DNK": "DK", "DOM": "DO", "DZA": "DZ", "ECU": "EC", "EGY": "EG",
    "ERI": "ER", "ESH": "EH", "ESP": "ES", "EST": "EE", "ETH": "ET", "FIN": "FI", "FJI": "FJ",
    "FLK": "FK", "FRA": "FR", "FRO": "FO", "GAB": "GA", "GBR": "GB", "GEO": "GE", "GHA": "GH",
    "GIB": "GI", "GIN": "GN", "GLP": "GP", "GMB": "GM", "GNB": "GW", "GNQ": "GQ", "GRC": "GR",
    "GRD": "GD", "GRL": "GL", "GTM": "GT", "GUF": "GF", "GUM": "GU", "GUY": "GY", "HKG": "HK",
    "HND": "HN", "HRV": "HR", "HTI": "HT", "HUN": "HU", "IDN": "ID", "IND": "IN", "IRL": "IE",
    "IRN": "IR", "IRQ": "IQ", "ISL": "IS", "ISR": "IL", "ITA": "IT", "JAM": "JM", "JOR": "JO",
    "JPN": "JP", "KAZ": "KZ", "KEN": "KE", "KGZ": "KG", "KHM": "KH", "KIR": "KI", "KNA": "KN",
    "KOR": "KR", "KWT": "KW", "LAO": "LA", "LBN": "LB", "LBR": "LR", "LBY": "LY", "LCA": "LC",
    "LKA": "LK", "LSO": "LS", "LTU": "LT", "LUX": "LU", "LVA": "LV", "MAC": "MO", "MAR": "MA",
    "MDA": "MD", "MDG": "MG", "MDV": "MV", "MEX": "MX", "MKD": "MK", "MLI": "ML", "MLT": "MT",
    "MMR": "MM", "MNE": "ME", "MNG": "MN", "MOZ": "MZ", "MRT": "MR", "MSR": "MS", "MTQ": "MQ",
    "MUS": "MU", "MWI": "MW", "MYS": "MY", "NAM": "NA", "NCL": "NC", "NER": "NE", "NGA": "NG",
    "NIC": "NI", "NLD": "NL", "NOR": "NO", "NPL": "NP", "NRU": "NR", "NZL": "NZ", "OMN": "OM",
    "PAK": "PK", "PAN": "PA", "PER": "PE", "PHL": "PH", "PNG": "PG", "POL": "PL", "PRI": "PR",
    "PRK": "KP", "PRT": "PT", "PRY": "PY", "PSE": "PS", "PYF": "PF", "QAT": "QA", "REU": "RE",
    "ROU": "RO", "RUS": "RU", "RWA": "RW", "SAU": "SA", "SDN": "SD", "SEN": "SN", "SGP": "SG",
    "SHN": "SH", "SLB": "SB", "SLE": "SL", "SLV": "SV", "SOM": "SO", "SPM": "PM", "SRB": "RS",
    "SSD": "SS", "STP": "ST", "SUR": "SR", "SVK": "SK", "SVN": "SI", "SWE": "SE", "SWZ": "SZ",
    "SYC": "SC", "SYR": "SY", "TCA": "TC", "TCD": "TD", "TGO": "TG", "THA": "TH", "TJK": "TJ",
    "TKM": "TM", "TLS": "TL", "TON": "TO", "TTO": "TT", "TUN": "TN", "TUR": "TR", "TWN": "TW",
    "TZA": "TZ", "UGA": "UG", "UKR": "UA", "URY": "UY", "USA": "US", "UZB": "UZ", "VCT": "VC",
    "VEN": "VE", "VGB": "VG", "VIR": "VI", "VNM": "VN", "VUT": "VU", "WSM": "WS", "YEM": "YE",
    "ZAF": "ZA", "ZMB": "ZM", "ZWE": "ZW",
}


def codecarbon_source() -> tuple[Path, str]:
    """Path of the installed CodeCarbon's energy-mix file, and CodeCarbon's version."""
    spec = importlib.util.find_spec("codecarbon")  # locates without importing (no pandas)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("codecarbon is not installed: pip install 'wattmeter[codecarbon]'")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*DATA_REL)
    from importlib import metadata

    try:
        version = metadata.version("codecarbon")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def build_table(mix: dict[str, Any], codecarbon_version: str) -> dict[str, Any]:
    """The countries table, from CodeCarbon's global_energy_mix mapping. Pure: tests call it."""
    zones: dict[str, Any] = {}
    skipped = []
    for iso3, row in sorted(mix.items()):
        iso2 = ISO3_TO_ISO2.get(iso3)
        intensity = row.get("carbon_intensity") if isinstance(row, dict) else None
        if iso2 is None or not isinstance(intensity, (int, float)):
            skipped.append(iso3)
            continue
        zones[iso2] = {
            "name": row.get("country_name", iso3),
            "iso3": iso3,
            "g_per_kwh": round(float(intensity), 3),
            "year": int(row.get("year", 0)),
        }
    zones["WORLD"] = dict(WORLD)
    years = sorted({z["year"] for z in zones.values()})
    return {
        "_meta": {
            "table": "countries",
            "unit": "g CO2e/kWh",
            "metric": "lifecycle carbon intensity of electricity generation, yearly average",
            "source": "Ember Yearly Electricity Data and Energy Institute Statistical Review of World "
                      "Energy, processed by Our World in Data, as shipped in CodeCarbon's "
                      "global_energy_mix.json; WORLD from Ember Global Electricity Review 2024",
            "source_url": "https://ourworldindata.org/grapher/carbon-intensity-electricity",
            "year": max(years),
            "years_present": years,
            "licence": "CC-BY-4.0 (Ember, Our World in Data); CodeCarbon packaging MIT",
            "generator": "tools/gen_country_table.py",
            "generated_from": f"codecarbon {codecarbon_version}",
            "skipped_iso3": skipped,
        },
        "zones": zones,
    }


def render(table: dict[str, Any]) -> str:
    """Stable text: metadata indented, then one zone per line (small, readable diffs)."""
    meta = json.dumps(table["_meta"], indent=2, sort_keys=True, ensure_ascii=False)
    rows = [f'  {json.dumps(k)}: {json.dumps(v, sort_keys=True, ensure_ascii=False)}'
            for k, v in sorted(table["zones"].items())]
    meta = meta.replace("\n", "\n  ")
    return '{\n  "_meta": ' + meta + ',\n  "zones": {\n  ' + ",\n  ".join(rows) + "\n  }\n}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, help="a global_energy_mix.json (default: installed codecarbon's)")
    ap.add_argument("--version", default=None, help="codecarbon version to record with --source")
    ap.add_argument("--check", action="store_true", help="compare with the committed table; exit 1 if stale")
    ap.add_argument("--stdout", action="store_true", help="print instead of writing the table")
    args = ap.parse_args(argv)
    if args.source:
        path, version = args.source, args.version or "unknown"
    else:
        path, version = codecarbon_source()
    text = render(build_table(json.loads(path.read_text(encoding="utf-8")), version))
    if args.check:
        same = TABLE.read_text(encoding="utf-8") == text
        print("countries.json is up to date" if same else f"countries.json differs from {path}")
        return 0 if same else 1
    if args.stdout:
        sys.stdout.write(text)
    else:
        TABLE.write_text(text, encoding="utf-8")
        print(f"wrote {TABLE} ({len(text)} bytes) from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
