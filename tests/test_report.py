"""``wattmeter report`` over a realistic records file with checkpoints and malformed lines."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wattmeter.carbon.codecarbon_csv import CODECARBON_COLUMNS
from wattmeter.carbon.records import load_records
from wattmeter.carbon.report import build_report
from wattmeter.carbon.report_render import render
from wattmeter.carbon.zones import resolve_zone
from wattmeter.cli import main
from wattmeter.errors import UsageError

RECORDS = Path(__file__).resolve().parent / "fixtures" / "records" / "realistic.jsonl"
REPO = Path(__file__).resolve().parent.parent

# r1 "llama-finetune": 8 GPUs x 550 W + 200 W CPU + 30 W RAM for 3600 s = 16,668,000 J = 4.63 kWh,
# in FR (56.039 g/kWh) at PUE 1.1 -> 4.63 x 1.1 x 56.039 = 285.406627 g.
R1_KWH, R1_G = 4.63, 4.63 * 1.1 * 56.039


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("WATTMETER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def report():
    return build_report(load_records([RECORDS]), "job", [resolve_zone("FR"), resolve_zone("PL")])


def test_malformed_lines_are_skipped_counted_and_named():
    records = load_records([RECORDS])
    assert [s.line for s in records.skipped] == [4, 6, 9, 10, 12, 13]
    assert [s.reason.split(" (")[0] for s in records.skipped] == [
        "invalid JSON", "invalid JSON", "not a JSON object", "no run_id", "not UTF-8 text", "unknown schema 'other.thing/2'"]
    assert "realistic.jsonl:4: invalid JSON" in records.skipped_summary()
    assert len(records.records) == 6                        # nothing else lost


def test_last_line_per_run_wins_and_checkpoint_only_runs_stay(report):
    rows = {r.run_id: r for r in report.rows}
    r1 = rows["a1b2c3d4e5f6"]
    assert (r1.status, r1.checkpoint, r1.figures.energy_kwh) == ("completed", False, pytest.approx(R1_KWH))
    live = rows["c0ffee123456"]
    assert (live.status, live.checkpoint) == ("running", True)
    assert report.superseded == 2


def test_per_job_figures_by_hand(report):
    r1 = next(r for r in report.rows if r.run_id == "a1b2c3d4e5f6").figures
    assert r1.emissions_g["location"] == pytest.approx(R1_G)
    assert r1.energy_j == {"gpu": 15_840_000, "cpu": 720_000, "ram": 108_000, "total": 16_668_000}
    assert r1.gpu_hours == 8.0
    assert r1.g_per_gpu_hour == pytest.approx(R1_G / 8)
    assert r1.j_per_token == pytest.approx(16_668_000 / 52_428_800)      # training: input tokens
    serve = next(r for r in report.rows if r.run_id == "0f1e2d3c4b5a").figures
    assert serve.j_per_token == pytest.approx(837_000 / 2_400_000)       # generation tokens
    assert serve.wh_per_1k_tokens == pytest.approx(837_000 / 3600 / 2400)
    assert serve.emissions_g["market"] == pytest.approx(serve.emissions_g["location"] / 2)
    assert serve.g_per_1k_tokens == pytest.approx(serve.emissions_g["location"] / 2400)


def test_group_by_label_and_totals():
    report = build_report(load_records([RECORDS]), "team")
    groups = dict(report.groups)
    assert set(groups) == {"research", "platform", "(none)"}
    assert groups["research"].runs == 3 and groups["platform"].runs == 2
    assert groups["research"].emissions_g["embodied"] == pytest.approx(0.5 * 150_000 / 35_064)
    assert report.total.energy_j["total"] == pytest.approx(sum(g.energy_j["total"] for g in groups.values()))
    assert report.total.runs_without_carbon == 1
    by_day = dict(build_report(load_records([RECORDS]), "day").groups)
    assert list(by_day) == ["2024-05-01", "2024-05-02", "2024-05-03"]


def test_what_if_zones(report):
    assert report.what_if.per_run["a1b2c3d4e5f6"]["PL"] == pytest.approx(R1_KWH * 1.1 * 661.926)
    assert report.what_if.per_run["a1b2c3d4e5f6"]["FR"] == pytest.approx(R1_G)
    assert report.what_if.totals["FR"] == pytest.approx(sum(v["FR"] for v in report.what_if.per_run.values()))


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_human_formats_show_jobs_totals_and_what_if(report, fmt):
    text = render(report, fmt)
    for needle in ("llama-finetune", "Totals by job", "What if", "g/GPU-h", "Wh/1k TOK", " 285 ", "(checkpoint)"):
        assert needle in text
    if fmt == "markdown":
        assert "| JOB | RUN |" in text


def test_csv_and_json_round_trip(report):
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    jobs = [r for r in rows if r["level"] == "job"]
    assert len(jobs) == 6 and rows[-1]["level"] == "total"
    r1 = next(r for r in jobs if r["run_id"] == "a1b2c3d4e5f6")
    assert float(r1["emissions_location_g"]) == pytest.approx(R1_G)
    assert float(r1["whatif_PL_g"]) == pytest.approx(R1_KWH * 1.1 * 661.926)
    assert r1["labels"] == "project=llm;team=research"
    data = json.loads(render(report, "json"))
    assert len(data["jobs"]) == 6 and len(data["skipped"]) == 6 and data["what_if"]["zones"][0]["zone"] == "FR"


def test_codecarbon_format_uses_its_emissions_csv_schema(report):
    text = render(report, "codecarbon")
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == CODECARBON_COLUMNS
    rows = {r["run_id"]: r for r in reader}
    r1 = rows["a1b2c3d4e5f6"]
    assert float(r1["emissions"]) == pytest.approx(R1_G / 1000)           # kg
    assert float(r1["energy_consumed"]) == pytest.approx(R1_KWH * 1.1)     # kWh x PUE, as CodeCarbon does
    assert float(r1["gpu_power"]) == pytest.approx(8 * 550 * 1.1)
    assert (r1["country_iso_code"], r1["country_name"], r1["on_cloud"]) == ("FRA", "France", "N")
    assert (r1["project_name"], r1["timestamp"]) == ("llm", "2024-05-01T09:00:00")
    aws = rows["0f1e2d3c4b5a"]
    assert (aws["cloud_provider"], aws["cloud_region"], aws["on_cloud"]) == ("aws", "us-east-1", "Y")
    assert rows["beefcafe0007"]["emissions"] == ""                          # unknown, not zero


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_records([tmp_path / "nope.jsonl"])


def test_cli_report_prints_and_warns(capsys):
    rc = main(["report", str(RECORDS), "--group-by", "project", "--what-if", "FR,aws:eu-west-3"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "Totals by project" in out and "g in aws:eu-west-3" in out
    assert err.count("\n") == 1 and "skipped 6 malformed line(s)" in err and "realistic.jsonl:4" in err


@pytest.mark.parametrize("argv,fragment", [
    (["report", "missing.jsonl"], "records file 'missing.jsonl' does not exist"),
    (["report", str(RECORDS), "--what-if", "FR,Narnia"], "unknown zone 'Narnia'"),
    (["report", str(RECORDS), "--what-if", ","], "names no zone"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, fragment, capsys, monkeypatch, tmp_path):
    if argv[1] == "missing.jsonl":
        monkeypatch.chdir(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_writes_output_file(tmp_path, capsys):
    out = tmp_path / "emissions.csv"
    assert main(["report", str(RECORDS), "-f", "codecarbon", "-o", str(out)]) == 0
    header = out.read_text().splitlines()[0].split(",")
    # CodeCarbon's columns in its order, then wattmeter's value and cost columns (test_report_columns)
    assert header[:len(CODECARBON_COLUMNS)] == CODECARBON_COLUMNS
    assert header[len(CODECARBON_COLUMNS):] == ["value_tokens", "value_tokens_per_kwh", "value_tokens_per_kg_co2e",
                                                "price_per_kwh", "currency", "price_source", "cost"]


def test_real_subprocess_python_m_wattmeter_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "wattmeter", "report", str(RECORDS), "-f", "json"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["jobs"]) == 6
    bad = subprocess.run([sys.executable, "-m", "wattmeter", "report", str(tmp_path / "absent.jsonl")],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "power.png"
    assert main(["report", str(RECORDS), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_usage_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # simulate the extra not installed
    rc = main(["report", str(RECORDS), "--plot", str(tmp_path / "x.png")])
    assert rc == 2 and "pip install 'wattmeter[plot]'" in capsys.readouterr().err
