"""`wattmeter report` and `estimate --calibrate` on records that are wrong, absurd or simulated:
said once, exit 2 where nothing usable is left, and simulated runs marked in every format."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from wattmeter.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "records" / "realistic.jsonl"


def good_lines() -> list[dict]:
    out = []
    for raw in FIXTURE.read_bytes().splitlines():
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("run_id") and str(obj.get("schema", "wattmeter.run/")).startswith(
                "wattmeter.run/"):
            out.append(obj)
    return out


def write(path: Path, records: list[dict], extra: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_nan_huge_and_negative_values_are_skipped_and_named(tmp_path, capsys):
    base = good_lines()[-1]
    bad = [json.dumps(dict(base, run_id="nan1", energy_j={"gpu": float("nan"), "total": 1.0})) + "\n",
           json.dumps(dict(base, run_id="big1", duration_s=10.0, gpu_count=1,
                           energy_j={"gpu": 1e300, "total": 1e300})) + "\n",
           json.dumps(dict(base, run_id="neg1", energy_j={"gpu": -5.0, "total": -5.0})) + "\n",
           json.dumps(dict(base, run_id="hot1", duration_s=10.0, gpu_count=2,
                           energy_j={"gpu": 250_000.0, "total": 250_000.0})) + "\n"]
    path = write(tmp_path / "r.jsonl", [base], bad)
    code, out, err = run(capsys, "report", str(path), "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert [j["run_id"] for j in doc["jobs"]] == [base["run_id"]]       # the good run is kept
    reasons = {s["line"]: s["reason"] for s in doc["skipped"]}
    assert reasons == {2: "energy_j.gpu is not a finite number (nan)",
                       3: "average GPU power 1e+299 W is above 10000 W per GPU",
                       4: "energy_j.gpu is negative (-5 J)",
                       5: "average GPU power 1.25e+04 W is above 10000 W per GPU"}
    assert err.startswith("wattmeter: warning: skipped 4 malformed line(s): ")
    assert f"{path}:2: energy_j.gpu is not a finite number (nan)" in err


@pytest.mark.parametrize("content, reason", [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\n", "binary data, not a JSON line"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "not UTF-8 text"),
    (b'{"level": "info", "msg": "started"}\n{"level": "info", "msg": "done"}\n', "no run_id"),
    (b"time,energy\n1,2\n", "invalid JSON (Expecting value)"),
])
def test_report_on_a_file_without_records_is_exit_2(tmp_path, capsys, content, reason):
    path = tmp_path / "not-records.bin"
    path.write_bytes(content)
    code, out, err = run(capsys, "report", str(path))
    assert code == 2 and out == ""
    assert err == (f"wattmeter: error: records file '{path}' holds no run records (line 1: {reason}); "
                   "pass a JSONL file written by 'wattmeter run --records'\n")


def test_group_by_a_label_no_record_has(tmp_path, capsys):
    code, out, err = run(capsys, "report", str(FIXTURE), "--group-by", "teem")
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == ("wattmeter: error: --group-by teem: no record has a label 'teem'; "
                                            "use job, host, day or a label: project, team (closest: team)")
    code, out, _ = run(capsys, "report", str(FIXTURE), "--group-by", "team")
    assert code == 0 and "Totals by team" in out


def test_every_number_has_three_significant_figures(capsys):
    code, out, _ = run(capsys, "report", str(FIXTURE))
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("llama-finetune  a1b2"))
    cells = row.split()
    # GPU Wh, CPU Wh, RAM Wh, kWh, g CO2e location (fixture: 4,400 Wh GPU, 4.63 kWh)
    assert cells[7:12] == ["4,400", "200", "30.0", "4.63", "285"]
    assert "figures are rounded to three significant figures" in out


@pytest.fixture
def mixed(tmp_path) -> Path:
    real = good_lines()[-1]
    sim = dict(real, run_id="5151515151", job="sim-job", simulated=True, gpu_models=["NVIDIA H100 80GB HBM3"],
               gpu_count=1)
    return write(tmp_path / "mixed.jsonl", [real, sim])


def test_simulated_runs_are_marked_in_every_format(mixed, capsys):
    _, table, _ = run(capsys, "report", str(mixed))
    assert "SIMULATED: 1 run(s) metered fake GPUs" in table.splitlines()[1]
    sim_row = next(line for line in table.splitlines() if line.startswith("sim-job"))
    assert "SIMULATED" in sim_row
    _, md, _ = run(capsys, "report", str(mixed), "--format", "markdown")
    assert "SIMULATED: 1 run(s)" in md and any("sim-job" in line and "SIMULATED" in line for line in md.splitlines())
    _, js, _ = run(capsys, "report", str(mixed), "--format", "json")
    doc = json.loads(js)
    assert doc["simulated_runs"] == 1
    assert {j["job"]: j["simulated"] for j in doc["jobs"]}["sim-job"] is True
    _, text, _ = run(capsys, "report", str(mixed), "--format", "csv")
    rows = {r["run_id"]: r for r in csv.DictReader(io.StringIO(text)) if r["level"] == "job"}
    assert rows["5151515151"]["simulated"] == "True"
    _, cc, _ = run(capsys, "report", str(mixed), "--format", "codecarbon")
    rows = {r["run_id"]: r for r in csv.DictReader(io.StringIO(cc))}
    assert rows["5151515151"]["gpu_model"] == "1 x NVIDIA H100 80GB HBM3 (SIMULATED: fake NVML)"
    assert "SIMULATED" not in next(r for k, r in rows.items() if k != "5151515151")["gpu_model"]


def test_plot_title_says_simulated(mixed, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    titles: list[str] = []
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(self, *a, **kw):
        titles.extend(ax.get_title() for ax in self.axes)
        return real_savefig(self, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    out = tmp_path / "p.png"
    assert main(["report", str(mixed), "--plot", str(out)]) == 0
    assert out.stat().st_size > 0
    assert "SIMULATED: 1 of 2 run(s) metered fake GPUs" in titles[0]


def test_calibrate_ignores_simulated_runs_unless_asked(tmp_path, capsys):
    dev = {"key": "gpu0", "component": "gpu", "energy_j": 3_600_000.0, "labels": {"model": "NVIDIA H100 80GB HBM3"}}
    sim = {"schema": "wattmeter.run/1", "run_id": "s1", "duration_s": 3600.0, "simulated": True,
           "energy_j": {"gpu": 3_600_000.0, "total": 3_600_000.0}, "gpu_count": 1, "devices": [dev]}
    path = write(tmp_path / "sim.jsonl", [sim])
    code, out, err = run(capsys, "estimate", "--gpu", "H100", "--hours", "1", "--calibrate", str(path), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["power_basis"] == "board power"
    assert "1 simulated run(s) in" in err and "--include-simulated uses them" in err
    code, out, _ = run(capsys, "estimate", "--gpu", "H100", "--hours", "1", "--calibrate", str(path),
                       "--include-simulated", "--json")
    doc = json.loads(out)
    assert doc["power_basis"] == "measured (SIMULATED GPUs)" and doc["power_w_per_gpu"] == pytest.approx(1000.0)
    assert doc["calibration"]["simulated_runs"] == 1
    code, text, _ = run(capsys, "estimate", "--gpu", "H100", "--hours", "1", "--calibrate", str(path),
                        "--include-simulated")
    assert "SIMULATED: 1 of these run(s) metered fake GPUs" in text


@pytest.mark.parametrize("value, text", [
    (0.001234, "0.00123"), (0.5, "0.500"), (1.0, "1.00"), (9.996, "10.0"), (42.42, "42.4"), (99.96, "100"),
    (285.4, "285"), (999.6, "1,000"), (4400.4, "4,400"), (12345.0, "12,300"), (0.0, "0"), (None, "-"),
])
def test_three_significant_figures_at_the_decade_edges(value, text):
    from wattmeter.carbon.report_render import _f

    assert _f(value) == text


@pytest.mark.parametrize("value, text", [
    (0.09996, "0.100"), (0.0999, "0.0999"), (0.9996, "1.00"), (0.99949, "0.999"), (0.000123456, "0.000123"),
    (0.00099951, "0.00100"), (-0.0123456, "-0.0123"), (0.00009999, "0.000100"), (0.00001234, "0.0000123"),
])
def test_three_significant_figures_below_one(value, text):
    from wattmeter.carbon.report_render import _f

    assert _f(value) == text


def test_the_shortcuts_give_what_the_general_rule_gives():
    """_f takes shortcuts for 1e-4 <= |x| < 999.5; the general rule is: round to three significant
    figures, then print as many decimals as that rounded value needs (none, with thousands
    separators, from 100 up)."""
    import math
    import random

    from wattmeter.carbon.report_render import _f

    def general(value: float) -> str:
        rounded = float("%.3g" % value)
        places = 2 - math.floor(math.log10(abs(rounded)))
        return f"{rounded:,.0f}" if places <= 0 else "%.*f" % (places, rounded)

    rng = random.Random(8)
    edges = [s * m * 10.0 ** k for k in range(-6, 4) for m in (1.0, 0.9995, 0.99949, 0.999951, 0.5) for s in (1, -1)]
    values = edges + [rng.uniform(-1, 1) * 10 ** rng.uniform(-6, 4) for _ in range(20_000)]
    assert [v for v in values if _f(v) != general(v)] == []
