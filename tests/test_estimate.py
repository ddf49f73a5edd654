"""``wattmeter estimate``: board power or measured power, golden numbers, linearity, bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wattmeter.carbon.config import CarbonConfig
from wattmeter.carbon.estimate import calibrate, estimate, lookup_gpu
from wattmeter.carbon.records import load_records
from wattmeter.cli import main
from wattmeter.errors import UsageError

RECORDS = Path(__file__).resolve().parent / "fixtures" / "records" / "realistic.jsonl"
FR = CarbonConfig(zone="FR").validate()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("WATTMETER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)     # no stray wattmeter.toml / pyproject.toml config


def test_golden_8_h100_for_100_h_in_france_at_70_percent():
    est = estimate(lookup_gpu("H100"), 8, 100, 0.7, FR)
    # 8 x 700 W x 0.7 x 100 h = 392 kWh; x 56.039 g/kWh x PUE 1.0 = 21,967.288 g
    assert est.basis == "board power" and est.power_w_per_gpu == pytest.approx(490)
    assert est.result.energy_kwh == pytest.approx(392.0)
    assert est.result.emissions_g["location"] == pytest.approx(21_967.288)


def test_cloud_pue_and_embodied_scope():
    config = CarbonConfig(cloud="aws:us-east-1", embodied_kg_per_gpu=150).validate()
    est = estimate(lookup_gpu("A100"), 4, 10, 1.0, config)
    # 4 x 400 W x 10 h = 16 kWh; x 1.135 x 415.755 = 7,550.11 g; embodied 40 GPU-h x 150 kg / 35,064 h
    assert est.result.emissions_g["location"] == pytest.approx(16 * 1.135 * 415.755)
    assert est.result.emissions_g["embodied"] == pytest.approx(40 * 150_000 / 35_064)


def test_calibration_uses_measured_average_power_of_the_family():
    cal = calibrate(load_records([RECORDS]), lookup_gpu("H100 PCIe"))
    # H100 devices in the fixture: 8 x 550 W x 1 h, 1 x 400 W x 0.5 h, 1 x 380 W x 1 h, 4 x 620 W x 2 h
    joules = 8 * 550 * 3600 + 400 * 1800 + 380 * 3600 + 4 * 620 * 7200
    seconds = 8 * 3600 + 1800 + 3600 + 4 * 7200
    assert cal.power_w == pytest.approx(joules / seconds) and (cal.runs, cal.devices) == (4, 14)
    est = estimate(lookup_gpu("H100"), 2, 10, 0.5, FR, cal)
    assert est.basis == "measured" and est.result.energy_kwh == pytest.approx(2 * 10 * cal.power_w / 1000)
    assert calibrate(load_records([RECORDS]), lookup_gpu("L4")) is None   # L4 must not match L40 or A100


@given(st.integers(1, 64), st.floats(0.01, 1e4), st.floats(0.01, 1.0))
def test_estimate_is_linear_in_count_and_hours(count, hours, utilisation):
    one = estimate(lookup_gpu("L40S"), 1, 1.0, utilisation, FR).result.emissions_g["location"]
    many = estimate(lookup_gpu("L40S"), count, hours, utilisation, FR).result.emissions_g["location"]
    assert many == pytest.approx(one * count * hours, rel=1e-9)


@pytest.mark.parametrize("name,expected", [("h100", "H100 SXM"), ("H100-PCIe", "H100 PCIe"),
                                           ("a100 pcie 80gb", "A100 PCIe 80GB"), ("mi300", "MI300X")])
def test_gpu_names_are_forgiving(name, expected):
    assert lookup_gpu(name).name == expected


def test_unknown_gpu_names_the_closest():
    with pytest.raises(UsageError, match=r"unknown GPU model 'H1000'; closest: H100"):
        lookup_gpu("H1000")


def test_cli_text_says_which_power_it_used(capsys):
    assert main(["estimate", "--gpu", "H100", "--count", "8", "--hours", "100", "--zone", "FR",
                 "--utilisation", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "board power" in out and "392.00 kWh" in out and "21,967.3 g CO2e" in out
    assert main(["estimate", "--gpu", "H100", "--count", "8", "--hours", "100", "--zone", "FR",
                 "--calibrate", str(RECORDS)]) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "NVIDIA H100 80GB HBM3" in out


def test_cli_json_and_world_default(capsys):
    assert main(["estimate", "--gpu", "T4", "--hours", "10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["carbon"]["intensity_source"] == "table:world-default"
    assert data["carbon"]["emissions_g"]["location"] == pytest.approx(0.7 * 481)


@pytest.mark.parametrize("argv,fragment", [
    (["--gpu", "H1000", "--hours", "1"], "closest: H100"),
    (["--gpu", "H100", "--hours", "0"], "--hours 0 must be a finite number above 0"),
    (["--gpu", "H100", "--hours", "1", "--count", "0"], "--count 0 must be at least 1"),
    (["--gpu", "H100", "--hours", "1", "--utilisation", "1.5"], "outside (0, 1]"),
    (["--gpu", "H100", "--hours", "1", "--zone", "XY"], "unknown zone 'XY'"),
    (["--gpu", "H100", "--hours", "1", "--calibrate", "absent.jsonl"], "does not exist"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, fragment, capsys):
    rc = main(["estimate", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and err.count("\n") == 1 and "Traceback" not in err
