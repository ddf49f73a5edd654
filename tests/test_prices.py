"""The per-zone price table: every row sourced and dated, keyed by a real zone, and used for cost."""
from __future__ import annotations

import json
import os

import pytest

from wattmeter.carbon.prices import price_zones, table_price
from wattmeter.carbon.tables import load_table
from wattmeter.carbon.zones import resolve_zone
from wattmeter.cli import main


def test_every_row_names_a_dataset_with_source_year_and_url() -> None:
    table = load_table("prices")
    sources = table["_meta"]["sources"]
    for name, meta in sources.items():
        assert meta["source"] and meta["source_url"].startswith("https://") and meta["licence"], name
        assert isinstance(meta["year"], int) and 2000 < meta["year"] < 2100, name
    for zone, row in table["zones"].items():
        assert row["dataset"] in sources, zone
        assert 0.0 < row["price_per_kwh"] < 1.0 and row["currency"] in ("USD", "EUR"), zone


def test_every_priced_zone_is_a_zone_the_carbon_tables_know() -> None:
    for zone in price_zones():
        assert resolve_zone(zone).key == zone


def test_us_states_from_eia_electric_power_annual_2023_commercial() -> None:
    """Spot checks against EIA's Electric Power Annual 2023 (released 2024-10-17), average revenue
    per kWh by state, commercial column, in cents: Hawaii 39.03, North Dakota 7.38, New Jersey
    14.0, District of Columbia 16.94, Wisconsin 12.76."""
    for zone, cents in (("US-HI", 39.03), ("US-ND", 7.38), ("US-NJ", 14.0), ("US-DC", 16.94), ("US-WI", 12.76)):
        price = table_price(zone)
        assert price.per_kwh == pytest.approx(cents / 100) and price.currency == "USD", zone
        assert (price.source, price.year) == ("table:eia-2023", 2023)
    us = [z for z in price_zones() if z.startswith("US-")]
    assert len(us) == 50                        # 49 states and DC; Wyoming is not in the table yet
    assert table_price("US-WY") is None         # no price rather than an invented one


def test_a_new_zone_prices_a_report(tmp_path, capsys, monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("WATTMETER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    # 3.6 MJ = 1 kWh (1 kW for an hour) at PUE 1.5 in Hawaii: 1.5 kWh x 0.3903 USD = 0.58545 USD
    record = {"run_id": "hi0000000001", "job": "train", "hostname": "h", "start_unix": 1.7e9, "end_unix": 1.7e9 + 3600,
              "duration_s": 3600.0, "gpu_count": 1, "energy_j": {"gpu": 3.6e6, "total": 3.6e6},
              "carbon": {"zone": "US-HI", "pue": 1.5, "emissions_g": {"location": 1000.0}}}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert main(["report", str(path), "--format", "json"]) == 0
    job = json.loads(capsys.readouterr().out)["decisions"]["jobs"][0]
    assert job["cost"] == pytest.approx(0.58545) and job["currency"] == "USD"
