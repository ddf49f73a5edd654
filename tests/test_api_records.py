"""The Python API takes the settings `run` has (records=, csv=, zone=, cloud=, pue=): each window's
record is the one `run` writes, readable by `wattmeter report`; bad values are a ValueError with
`run`'s one-line message, naming the argument instead of the flag."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from wattmeter.cli import main
from wattmeter.config import SettingValueError
from wattmeter.errors import ConfigError
from wattmeter.meter import Meter, measure


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No WATTMETER_* from the caller, and a working directory without a config file."""
    import os

    for k in list(os.environ):
        if k.startswith("WATTMETER_") or k == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_measure_with_records_writes_runs_record_that_report_reads(tmp_path, capsys):
    rec = tmp_path / "runs.jsonl"
    meter = Meter(fake_gpus=1).start()
    try:
        with measure("epoch", meter=meter, records=rec, zone="FR", pue=1.2, labels={"team": "nlp"}):
            time.sleep(0.3)
    finally:
        meter.close()
    [record] = lines(rec)
    assert record["schema"] == "wattmeter.run/1" and record["job"] == "epoch"
    assert record["status"] == "completed" and record["checkpoint"] is False
    assert record["labels"] == {"team": "nlp"} and record["simulated"] is True and record["gpu_count"] == 1
    carbon = record["carbon"]
    assert carbon["zone"] == "FR" and carbon["pue"] == 1.2
    # location-based CO2e = kWh x PUE x intensity, by hand from the record's own figures
    kwh = record["energy_j"]["total"] / 3.6e6
    assert carbon["emissions_g"]["location"] == pytest.approx(kwh * 1.2 * carbon["intensity_g_per_kwh"], rel=1e-3)
    assert record["energy_j"]["total"] > 0

    assert main(["report", str(rec), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    text = json.dumps(out)
    assert record["run_id"] in text and "epoch" in text


def test_meter_records_every_measured_window_and_a_failed_block_says_so(tmp_path):
    rec = tmp_path / "runs.jsonl"
    meter = Meter(fake_gpus=1, records=str(rec)).start()

    @meter.measure("step")
    def step() -> None:
        time.sleep(0.05)

    try:
        step()
        step()
        with pytest.raises(RuntimeError, match="boom"):
            with meter.measure("broken"):
                raise RuntimeError("boom")
    finally:
        meter.close()
    records = lines(rec)
    assert [(r["job"], r["status"]) for r in records] == [("step", "completed"), ("step", "completed"),
                                                            ("broken", "failed")]
    assert len({r["run_id"] for r in records}) == 3
    # no zone anywhere: the world average, labelled so, as in `run`
    assert records[0]["carbon"]["intensity_source"] == "table:world-default"


def test_csv_only_and_no_records_without_the_argument(tmp_path, monkeypatch):
    # WATTMETER_RECORDS is `run`'s: a library call never starts writing files because of it
    monkeypatch.setenv("WATTMETER_RECORDS", str(tmp_path / "env.jsonl"))
    meter = Meter(fake_gpus=1).start()
    try:
        with meter.measure("plain"):
            pass
        with meter.measure("tabled", csv=tmp_path / "runs.csv"):
            pass
    finally:
        meter.close()
    assert not (tmp_path / "env.jsonl").exists()
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert rows[0].startswith("run_id,job,") and rows[1].split(",")[1] == "tabled" and len(rows) == 2


def test_carbon_keywords_beat_the_environment_which_beats_the_file(tmp_path, monkeypatch):
    (tmp_path / "wattmeter.toml").write_text('zone = "DE"\npue = 1.4\n')
    meter = Meter(fake_gpus=1).start()
    try:
        with meter.measure("w") as w:
            time.sleep(0.05)
        result = w.result()
        assert (meter.carbon_of(result).zone, meter.carbon_of(result).pue) == ("DE", 1.4)    # file
        monkeypatch.setenv("WATTMETER_ZONE", "FR")
        monkeypatch.setenv("WATTMETER_PUE", "0.5")     # bad, but pue= replaces it: never checked
        got = measure("w", meter=meter, pue=1.1).recorder.carbon_of(result)
        assert (got.zone, got.pue) == ("FR", 1.1)                                           # env, kwarg
        assert measure("w", meter=meter, zone="GB", pue=1.1).recorder.carbon_of(result).zone == "GB"
    finally:
        meter.close()


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip().removeprefix("wattmeter: error: ")


@pytest.mark.parametrize("kwargs, flags, flag_text, kw_text", [
    ({"pue": 0.5}, ["--pue", "0.5"], "--pue 0.5", "pue=0.5"),
    ({"pue": "x"}, ["--records", "r.jsonl"], None, None),
])
def test_bad_values_are_value_errors_with_runs_message(tmp_path, capsys, kwargs, flags, flag_text, kw_text):
    with pytest.raises(ValueError) as err:
        measure("w", **kwargs)
    assert isinstance(err.value, SettingValueError) and isinstance(err.value, ConfigError)
    message = str(err.value)
    assert "\n" not in message
    if flag_text is None:
        assert message == "pue='x': expected a number such as 1.2"
        return
    cli = _cli_error(capsys, ["config", *flags])
    assert cli.startswith(flag_text) and message == kw_text + cli[len(flag_text):]
    assert message.startswith("pue=0.5 is below 1; PUE is facility energy / IT energy")


def test_a_bad_records_path_names_the_argument_like_run_names_its_flag(tmp_path, capsys):
    bad = tmp_path / "no" / "r.jsonl"
    with pytest.raises(ValueError) as err:
        Meter(fake_gpus=1, records=bad)
    assert str(err.value) == (f"records={str(bad)!r}: cannot write (directory {tmp_path / 'no'} does not exist); "
                              f"pass records= with a writable file")
    cli = _cli_error(capsys, ["run", "--records", str(bad), "--", "true"])
    assert cli == (f"--records {bad}: cannot write (directory {tmp_path / 'no'} does not exist); "
                   f"pass --records with a writable file")


def test_an_unknown_zone_is_refused_before_any_sensor_opens():
    with pytest.raises(ValueError, match=r"^zone='FRR': .*FR"):
        Meter(fake_gpus=1, zone="FRR")


def test_a_window_opened_by_hand_is_recorded_on_request(tmp_path):
    rec = tmp_path / "runs.jsonl"
    with Meter(fake_gpus=1, records=rec) as meter:
        w = meter.window("manual", labels={"k": "v"})
        time.sleep(0.05)
        w.end()
        assert not rec.exists()            # only measure() records by itself
        meter.write_record(w)
    [record] = lines(rec)
    assert (record["job"], record["labels"], record["status"], record["exit_code"]) == ("manual", {"k": "v"},
                                                                                         "completed", None)
    assert record["energy_j"]["total"] == pytest.approx(w.result().total_energy_j, abs=1e-6)


@pytest.mark.parametrize("value, message", [
    (1e-7, "interval_s=1e-07: is below 0.01 s, the fastest cadence a sensor supports; give at least 0.01 (default 0.1)"),
    (float("inf"), "interval_s=inf: is not finite; expected seconds, e.g. 0.1 (at least 0.01)"),
])
def test_interval_is_checked_like_the_flag(value, message):
    with pytest.raises(ValueError) as err:
        Meter(fake_gpus=1, interval_s=value)
    assert str(err.value) == message


def test_a_broken_config_file_is_a_value_error_naming_the_key(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.wattmeter]\nzonee = "FR"\n')
    with pytest.raises(ValueError) as err:
        measure("w", zone="FR")
    assert str(err.value) == f"{tmp_path / 'pyproject.toml'}: unknown key 'zonee'; did you mean 'zone'?"
    measure("w")          # no settings given: no config file is read, nothing to refuse
