"""Value and cost columns in the csv and codecarbon report formats, with golden numbers by hand."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os

import pytest

from wattmeter.carbon.codecarbon_csv import CODECARBON_COLUMNS
from wattmeter.cli import main

# The table price of US-CA (U.S. EIA 2023, commercial): 0.2391 USD/kWh. FR has no table price.
CA_USD = 0.2391
EXTRA = ["value_samples", "value_samples_per_kwh", "value_samples_per_kg_co2e",
         "value_tokens", "value_tokens_per_kwh", "value_tokens_per_kg_co2e",
         "price_per_kwh", "currency", "price_source", "cost"]


def run(run_id: str, job: str, start: float, energy_j: float, zone: str, pue: float, grams: float,
        value: dict | None = None, generation: int = 0) -> dict:
    return {"schema": "wattmeter.run/1", "run_id": run_id, "job": job, "hostname": "node-1", "status": "ok",
            "checkpoint": False, "start_unix": start, "end_unix": start + 3600.0, "duration_s": 3600.0,
            "energy_j": {"gpu": energy_j, "cpu": 0.0, "ram": 0.0, "total": energy_j}, "gpu_count": 1,
            "tokens": {"prompt": 0, "generation": generation}, "value": value or {},
            "carbon": {"zone": zone, "pue": pue, "intensity_g_per_kwh": 100.0, "emissions_g": {"location": grams}}}


@pytest.fixture
def records(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("WATTMETER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "runs.jsonl"
    runs = [
        # train #1: 7.2 MJ = 2 kWh, 500 g, 50,000 samples, in US-CA at PUE 1.2
        run("aaaa00000001", "train", 1.7e9, 7.2e6, "US-CA", 1.2, 500.0, {"samples": 50_000}),
        # train #2: 3.6 MJ = 1 kWh, 300 g, 20,000 samples, in US-CA at PUE 1.2
        run("aaaa00000002", "train", 1.7e9 + 7200, 3.6e6, "US-CA", 1.2, 300.0, {"samples": 20_000}),
        # serve: 1.8 MJ = 0.5 kWh, 28 g, 1,000,000 generated tokens, in FR (no table price)
        run("bbbb00000001", "serve", 1.7e9 + 3600, 1.8e6, "FR", 1.0, 28.0, generation=1_000_000),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    return path


def report_rows(capsys, *argv: str) -> tuple[list[str], list[dict]]:
    assert main(["report", *argv]) == 0
    reader = csv.DictReader(io.StringIO(capsys.readouterr().out))
    return list(reader.fieldnames or []), list(reader)


def num(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def test_csv_value_and_table_cost_columns_golden(records, capsys) -> None:
    header, rows = report_rows(capsys, str(records), "-f", "csv")
    assert header[-len(EXTRA):] == EXTRA
    jobs = {r["run_id"]: r for r in rows if r["level"] == "job"}
    t1, t2, s = jobs["aaaa00000001"], jobs["aaaa00000002"], jobs["bbbb00000001"]
    # train #1: 50,000 / 2 kWh = 25,000 per kWh; / 0.5 kg = 100,000 per kg; 2 kWh x 1.2 x 0.2391 = 0.57384 USD
    assert num(t1["value_samples"]) == 50_000
    assert num(t1["value_samples_per_kwh"]) == pytest.approx(25_000.0)
    assert num(t1["value_samples_per_kg_co2e"]) == pytest.approx(100_000.0)
    assert (num(t1["price_per_kwh"]), t1["currency"], t1["price_source"]) == (CA_USD, "USD", "table:eia-2023")
    assert num(t1["cost"]) == pytest.approx(0.57384)
    assert t1["value_tokens"] == ""                                   # no tokens: empty, not zero
    # train #2: 20,000 / 1 kWh; / 0.3 kg = 66,666.67; 1 x 1.2 x 0.2391 = 0.28692 USD
    assert num(t2["value_samples_per_kwh"]) == pytest.approx(20_000.0)
    assert num(t2["value_samples_per_kg_co2e"]) == pytest.approx(20_000 / 0.3)
    assert num(t2["cost"]) == pytest.approx(0.28692)
    # serve: tokens count automatically; 1e6 / 0.5 kWh = 2e6 per kWh; / 0.028 kg; FR has no price
    assert num(s["value_tokens"]) == 1_000_000
    assert num(s["value_tokens_per_kwh"]) == pytest.approx(2_000_000.0)
    assert num(s["value_tokens_per_kg_co2e"]) == pytest.approx(1e6 / 0.028)
    assert (s["price_per_kwh"], s["currency"], s["cost"], s["value_samples"]) == ("", "", "", "")
    groups = {r["group"]: r for r in rows if r["level"] == "group:job"}
    # group train: 70,000 samples over 3 kWh and 0.8 kg; cost 0.57384 + 0.28692 = 0.86076 USD
    g = groups["train"]
    assert num(g["value_samples"]) == 70_000
    assert num(g["value_samples_per_kwh"]) == pytest.approx(70_000 / 3)
    assert num(g["value_samples_per_kg_co2e"]) == pytest.approx(87_500.0)
    assert (num(g["cost"]), g["currency"], num(g["price_per_kwh"])) == (pytest.approx(0.86076), "USD", CA_USD)
    assert groups["serve"]["cost"] == "" and groups["serve"]["price_source"] == ""
    # total: 70,000 samples and 1e6 tokens over 3.5 kWh and 0.828 kg; one run has no price, so
    # the total cost is left empty and says why (a partial sum would read as the whole cost)
    total = rows[-1]
    assert total["level"] == "total"
    assert num(total["value_samples_per_kwh"]) == pytest.approx(20_000.0)
    assert num(total["value_tokens_per_kwh"]) == pytest.approx(1e6 / 3.5)
    assert num(total["value_tokens_per_kg_co2e"]) == pytest.approx(1e6 / 0.828)
    assert total["cost"] == "" and total["price_source"] == "1 run(s) without a price"


def test_csv_flag_price_prices_every_run(records, capsys) -> None:
    _, rows = report_rows(capsys, str(records), "-f", "csv", "--price-per-kwh", "0.1EUR")
    jobs = {r["run_id"]: r for r in rows if r["level"] == "job"}
    # cost is facility energy: 2 x 1.2 x 0.1 = 0.24; 1 x 1.2 x 0.1 = 0.12; 0.5 x 1.0 x 0.1 = 0.05 EUR
    assert [num(jobs[k]["cost"]) for k in sorted(jobs)] == [pytest.approx(0.24), pytest.approx(0.12),
                                                             pytest.approx(0.05)]
    assert {(r["currency"], r["price_source"]) for r in jobs.values()} == {("EUR", "--price-per-kwh")}
    assert num(rows[-1]["cost"]) == pytest.approx(0.41) and rows[-1]["currency"] == "EUR"


def test_csv_figures_equal_the_json_decisions(records, capsys) -> None:
    _, rows = report_rows(capsys, str(records), "-f", "csv")
    assert main(["report", str(records), "-f", "json"]) == 0
    decisions = {j["job"]: j for j in json.loads(capsys.readouterr().out)["decisions"]["jobs"]}
    groups = {r["group"]: r for r in rows if r["level"] == "group:job"}
    for job, d in decisions.items():
        for unit, per in d["value_per_kwh"].items():
            assert num(groups[job][f"value_{unit}_per_kwh"]) == pytest.approx(per)
        for unit, per in d["value_per_kg_co2e"].items():
            assert num(groups[job][f"value_{unit}_per_kg_co2e"]) == pytest.approx(per)
    assert num(groups["train"]["cost"]) == pytest.approx(decisions["train"]["cost"])


def test_codecarbon_keeps_its_columns_first_and_adds_value_and_cost(records, capsys) -> None:
    header, rows = report_rows(capsys, str(records), "-f", "codecarbon")
    assert header == CODECARBON_COLUMNS + EXTRA           # trailing: CodeCarbon's readers still parse it
    by_run = {r["run_id"]: r for r in rows}
    t1 = by_run["aaaa00000001"]
    assert num(t1["energy_consumed"]) == pytest.approx(2.4)             # CodeCarbon's own: kWh x PUE
    assert num(t1["value_samples_per_kwh"]) == pytest.approx(25_000.0)  # ours: per IT kWh, as the table
    assert num(t1["cost"]) == pytest.approx(0.57384) and t1["currency"] == "USD"
    assert num(by_run["bbbb00000001"]["value_tokens_per_kwh"]) == pytest.approx(2_000_000.0)
    assert len(rows) == 3                                               # runs only: no group or total rows


def test_codecarbon_output_reads_as_codecarbon_emissions(records, capsys, tmp_path) -> None:
    """Read back the way CodeCarbon reads its own emissions.csv (pandas), then into its EmissionsData."""
    pd = pytest.importorskip("pandas")
    emissions_data = pytest.importorskip("codecarbon.output_methods.emissions_data")
    out = tmp_path / "emissions.csv"
    assert main(["report", str(records), "-f", "codecarbon", "-o", str(out)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns[:len(CODECARBON_COLUMNS)]) == CODECARBON_COLUMNS
    names = {f.name for f in dataclasses.fields(emissions_data.EmissionsData)}
    row = df.loc[df.run_id == "aaaa00000001"].iloc[0]
    data = emissions_data.EmissionsData(**{k: row[k] for k in CODECARBON_COLUMNS if k in names})
    assert data.energy_consumed == pytest.approx(2.4) and data.emissions == pytest.approx(0.5)
    assert row["cost"] == pytest.approx(0.57384)
