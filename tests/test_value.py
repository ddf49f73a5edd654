"""Return on environment and cost: value fields, run comparisons, prices, and `run --value`."""
from __future__ import annotations

import io
import json
import os
import sys

import pytest

from wattmeter.carbon.prices import parse_price, resolve_price, table_price
from wattmeter.cli import main
from wattmeter.decisions import DecisionWriter
from wattmeter.exporters.records import RecordSink
from wattmeter.errors import UsageError
from wattmeter.value import ValueCounter, compare_runs, parse_value_flag, parse_value_text, value_fields


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("WATTMETER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def rec(job: str, energy_j: float, value: dict | None = None, tokens: dict | None = None,
        grams: float | None = None) -> dict:
    return {"job": job, "energy_j": {"total": energy_j}, "value": value or {},
            "tokens": tokens or {"prompt": 0, "generation": 0},
            "carbon": {"emissions_g": {"location": grams}} if grams is not None else None}


def test_value_per_kwh_and_per_kg_golden() -> None:
    # 7.2 MJ = 2 kWh and 500 g CO2e; 50,000 samples -> 25,000 per kWh and 100,000 per kg.
    fields = value_fields(rec("train", 7.2e6, {"samples": 50_000}, grams=500.0))
    assert fields["value"] == {"samples": 50_000}
    assert fields["value_per_kwh"] == {"samples": pytest.approx(25_000.0)}
    assert fields["value_per_kg_co2e"] == {"samples": pytest.approx(100_000.0)}


def test_tokens_count_as_value_automatically() -> None:
    # 3.6 MJ = 1 kWh, 1.8M generated tokens -> 1.8M tokens per kWh.
    fields = value_fields(rec("serve", 3.6e6, tokens={"prompt": 900_000, "generation": 1_800_000}))
    assert fields["value_per_kwh"] == {"tokens": pytest.approx(1_800_000.0)}
    assert value_fields(rec("idle", 3.6e6)) == {}                      # no value at all: no fields


def test_compare_runs_of_the_same_job() -> None:
    # Last run: 118 kJ per 1k samples; the one before: 100 kJ per 1k samples -> 18 % more.
    runs = [rec("train", 1.0e6, {"samples": 10_000}), rec("train", 2.36e6, {"samples": 20_000})]
    assert compare_runs(runs) == ("train: this run used 18.0 % more energy per 1k samples than the last one "
                                  "(118,000.0 J vs 100,000.0 J)")
    better = [runs[1], rec("train", 0.5e6, {"samples": 10_000})]
    # 50 kJ vs 118 kJ per 1k samples: 1 - 50/118 = 57.6 % less
    assert "57.6 % less energy per 1k samples" in compare_runs(better)
    assert compare_runs(runs[:1]) is None


def test_value_flags_and_files() -> None:
    assert parse_value_flag("samples=1000") == ("samples", 1000.0)
    assert parse_value_flag("images=2.5e4") == ("images", 25_000.0)
    with pytest.raises(UsageError, match=r"--value 'samples=' has no number; give e.g. --value samples=1000"):
        parse_value_flag("samples=")
    with pytest.raises(UsageError, match="is not UNIT=N"):
        parse_value_flag("samples")
    with pytest.raises(UsageError, match="'many' is not a number"):
        parse_value_flag("samples=many")
    assert parse_value_text('{"samples": 10, "accuracy": 0.91}', "f") == {"samples": 10.0, "accuracy": 0.91}
    assert parse_value_text("samples=10\n# comment\nimages=3\n", "f") == {"samples": 10.0, "images": 3.0}


def test_value_counter() -> None:
    c = ValueCounter()
    c.add(100, unit="images")
    c.add(50, unit="images")
    assert c.totals() == {"images": 150.0}
    with pytest.raises(UsageError, match="not a number"):
        c.add("lots", unit="images")


def test_prices() -> None:
    p = parse_price("0.12")
    assert (p.per_kwh, p.currency) == (0.12, "USD") and p.cost(10.0) == pytest.approx(1.2)
    assert parse_price("0.25EUR").currency == "EUR"
    with pytest.raises(UsageError, match=r"--price-per-kwh 'cheap' is not a price"):
        parse_price("cheap")
    ca = table_price("US-CA")
    assert ca.per_kwh == 0.2391 and ca.currency == "USD" and ca.year == 2023 and ca.source == "table:eia-2023"
    assert table_price("FR") is None                                   # not in the table: no invented price
    assert resolve_price("0.3", "US-CA").per_kwh == 0.3                # the flag wins


def test_decision_writer_adds_value_and_projection(tmp_path) -> None:
    progress, values = tmp_path / "progress", tmp_path / "value.json"
    err = io.StringIO()
    w = DecisionWriter({"samples": 100.0}, str(values), str(progress), err=err)
    # The fields reach the file through RecordSink's enrich hook, checkpoints and final alike.
    sink = RecordSink(str(tmp_path / "r.jsonl"), enrich=w.extra_fields)
    # 10 % per 10 s at 300 W: 3,000 J per 10 %, so 30,000 J in all.
    for i in range(1, 5):
        progress.write_text(f"{i}/10")
        sink.write_record({"end_unix": 10.0 * i, "energy_j": {"total": 3000.0 * i}, "carbon": None,
                           "checkpoint": True})
    last = sink.last_record
    assert last["projection"]["projected_energy_j"] == pytest.approx(30_000.0)
    assert last["projection"]["projected_end_unix"] == pytest.approx(100.0)
    values.write_text('{"samples": 900}')
    progress.write_text("0.3")                                          # resumed from a checkpoint
    sink.write_record({"end_unix": 50.0, "energy_j": {"total": 15000.0}, "carbon": None})
    assert sink.last_record["value"] == {"samples": 1000.0}             # flag + file
    assert "progress file" in err.getvalue() and "went backwards from 0.4 to 0.3" in err.getvalue()
    progress.write_text("7")
    sink.write_record({"end_unix": 60.0, "energy_j": {"total": 18000.0}, "carbon": None})
    assert "progress file" in err.getvalue() and "'7' is outside [0, 1]" in err.getvalue()
    on_disk = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["value"] for r in on_disk] == [{"samples": 100.0}] * 4 + [{"samples": 1000.0}] * 2
    assert sink.enrich_error is None


JOB = """
import sys, time
open(sys.argv[1], "w").write("0.5")
time.sleep(1.6)     # past a checkpoint (they come at most once a second)
open(sys.argv[1], "w").write("1/1")
open(sys.argv[2], "w").write("images=40")
"""


def test_run_value_flag_file_and_projection(tmp_path, capfd) -> None:
    records = tmp_path / "r.jsonl"
    code = main(["run", "--fake-gpus", "1", "--cpu", "none", "--records", str(records), "--zone", "FR",
                 "--value", "samples=1000", "--value-file", str(tmp_path / "v.txt"),
                 "--progress-file", str(tmp_path / "p.txt"), "--checkpoint-interval", "0.5", "--",
                 sys.executable, "-c", JOB, str(tmp_path / "p.txt"), str(tmp_path / "v.txt")])
    assert code == 0
    final = [json.loads(line) for line in records.read_text().splitlines()][-1]
    kwh = final["energy_j"]["total"] / 3.6e6
    assert final["value"] == {"samples": 1000.0, "images": 40.0}
    assert final["value_per_kwh"]["samples"] == pytest.approx(1000.0 / kwh)
    kg = final["carbon"]["emissions_g"]["location"] / 1000.0
    assert final["value_per_kg_co2e"]["images"] == pytest.approx(40.0 / kg)
    # Checkpoint at 50 %, final at 100 %: the projection at completion is the energy metered.
    assert final["projection"]["fraction"] == 1.0
    assert final["projection"]["projected_energy_j"] == pytest.approx(final["energy_j"]["total"], abs=1e-3)
    checkpoints = [json.loads(line) for line in records.read_text().splitlines()][:-1]
    assert checkpoints and all(c["value"]["samples"] == 1000.0 for c in checkpoints)
    assert "per kWh" in capfd.readouterr().err


def test_run_value_without_number_exits_2_before_running(tmp_path, capsys) -> None:
    records = tmp_path / "r.jsonl"
    code = main(["run", "--fake-gpus", "1", "--cpu", "none", "--records", str(records), "--value", "samples=",
                 "--", "true"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--value 'samples=' has no number" in err
    assert not records.exists()


def _fixture_record(run_id: str, end_unix: float, energy_j: float, samples: float) -> dict:
    from pathlib import Path

    base = json.loads((Path(__file__).resolve().parent / "fixtures" / "records" / "realistic.jsonl")
                      .read_bytes().splitlines()[0].decode())
    base.update(run_id=run_id, job="train", end_unix=end_unix, checkpoint=False, status="completed",
                value={"samples": samples}, tokens={"prompt": 0, "generation": 0})
    base["energy_j"] = {**base["energy_j"], "total": energy_j}
    base["carbon"] = {**(base.get("carbon") or {}), "zone": "US-CA", "pue": 1.0,
                      "emissions_g": {"location": energy_j / 3.6e6 * 200.0}}
    return base


def test_report_shows_value_comparison_and_cost(tmp_path, capsys) -> None:
    path = tmp_path / "r.jsonl"
    # Run 1: 1.0 MJ for 10k samples; run 2: 2.36 MJ for 20k samples -> 18 % more per 1k samples.
    path.write_text("\n".join(json.dumps(r) for r in (_fixture_record("r1", 100.0, 1.0e6, 10_000),
                                                       _fixture_record("r2", 200.0, 2.36e6, 20_000))) + "\n")
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "train: this run used 18.0 % more energy per 1k samples than the last one" in out
    # 30,000 samples over 3.36 MJ = 0.9333 kWh -> 32,142.9 per kWh; cost at the US-CA table price
    # 0.2391 USD/kWh x 0.93333 kWh = 0.2232 USD.
    assert "samples: 30,000 (32,142.9/kWh" in out and "cost 0.2232 USD" in out
    assert main(["report", str(path), "--format", "json", "--price-per-kwh", "0.1EUR"]) == 0
    job = json.loads(capsys.readouterr().out)["decisions"]["jobs"][0]
    assert job["cost"] == pytest.approx(3.36e6 / 3.6e6 * 0.1) and job["currency"] == "EUR"
    assert job["value_per_kg_co2e"]["samples"] == pytest.approx(30_000 / (3.36e6 / 3.6e6 * 0.2))


def test_bad_price_flag_exits_2(capsys) -> None:
    code = main(["estimate", "--gpu", "H100", "--hours", "1", "--zone", "FR", "--price-per-kwh", "cheap"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--price-per-kwh 'cheap' is not a price" in err
