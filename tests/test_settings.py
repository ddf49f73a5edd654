"""The one settings engine: precedence, `wattmeter config`, and wrong input said to be wrong
(exit 2, one line, the bad value and the closest good one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wattmeter.cli import main
from wattmeter.config import Settings, load_file_config
from wattmeter.errors import ConfigError

CLEAN = {k: v for k, v in os.environ.items()
         if not k.startswith("WATTMETER_") and k != "CUDA_VISIBLE_DEVICES"}


def wm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wattmeter", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env={**CLEAN, **(env or {})})


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and exactly one line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["run", "--", "true"], ["doctor"], ["estimate", "--gpu", "H100", "--hours", "1"],
                                     ["config"]])
def test_unknown_config_key_names_the_closest(tmp_path, command):
    (tmp_path / "pyproject.toml").write_text('[tool.wattmeter]\nzonee = "FR"\n')
    line = one_error(wm(*command, cwd=tmp_path))
    assert line.endswith("pyproject.toml: unknown key 'zonee'; did you mean 'zone'?"), line


def test_unknown_key_in_carbon_subtable(tmp_path):
    (tmp_path / "wattmeter.toml").write_text('[carbon]\npeu = 1.2\n')
    assert "unknown key 'carbon.peu'; did you mean 'pue'?" in one_error(wm("config", cwd=tmp_path))


def test_wrong_value_type_is_refused(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.wattmeter]\nrecords = 42\n')
    line = one_error(wm("run", "--", "true", cwd=tmp_path))
    assert "key 'records' = 42: expected text in quotes, not int" in line
    assert not (tmp_path / "42").exists()


@pytest.mark.parametrize("command", [["run", "--", "true"], ["doctor"], ["estimate", "--gpu", "H100", "--hours", "1"]])
def test_config_file_not_utf8_or_not_a_table(tmp_path, command):
    (tmp_path / "pyproject.toml").write_bytes(b'[tool.wattmeter]\nzone = "\xff"\n')
    assert "not UTF-8 text" in one_error(wm(*command, cwd=tmp_path))
    (tmp_path / "pyproject.toml").write_text("[tool]\nwattmeter = 3\n")
    assert "'tool.wattmeter' must be a table ([tool.wattmeter]), not int" in one_error(wm(*command, cwd=tmp_path))


def test_precedence_flag_env_file_default_and_origins(tmp_path):
    (tmp_path / "wattmeter.toml").write_text('zone = "DE"\nrecords = "file.jsonl"\ninterval = 0.2\n')
    table, name = load_file_config(tmp_path)
    s = Settings(env={"WATTMETER_RECORDS": "env.jsonl", "WATTMETER_INTERVAL": "0.3"}, file_config=table,
                 file_name=name)
    assert s.get("interval", "0.4", 0.1, float) == 0.4 and s.origins["interval"] == "flag --interval"
    assert s.get("records", None, "d.jsonl", str) == "env.jsonl" and s.origins["records"] == "env WATTMETER_RECORDS"
    assert s.get("zone", None, None, str) == "DE" and s.origins["zone"].endswith("wattmeter.toml key 'zone'")
    assert s.get("csv", None, "dflt", str) == "dflt" and s.origins["csv"] == "default"


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"^WATTMETER_INTERVAL 'x': expected seconds"):
        Settings(env={"WATTMETER_INTERVAL": "x"}, file_config={}).get("interval", None, 0.1,
                                                                      __import__("wattmeter.config").config.interval_s)


def test_config_command_prints_values_and_sources(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.wattmeter]\nzone = "FR"\n')
    proc = wm("config", "--json", "--pue", "1.3", cwd=tmp_path, env={"WATTMETER_RECORDS": "runs.jsonl"})
    assert proc.returncode == 0, proc.stderr
    got = {r["key"]: (r["value"], r["source"]) for r in json.loads(proc.stdout)["settings"]}
    assert got["zone"] == ("FR", f"file {tmp_path / 'pyproject.toml'} key 'zone'")
    assert got["pue"] == (1.3, "flag --pue")
    assert got["records"] == ("runs.jsonl", "env WATTMETER_RECORDS")
    assert got["interval"] == (0.1, "default")
    text = wm("config", cwd=tmp_path).stdout
    assert "[carbon]" in text and "flag" not in text.split("[carbon]")[0]


def test_no_gpu_flag_beats_fake_gpus_from_the_environment(tmp_path):
    rec = tmp_path / "r.jsonl"
    proc = wm("run", "--no-gpu", "--records", str(rec), "--", sys.executable, "-c", "pass", cwd=tmp_path,
              env={"WATTMETER_FAKE_GPUS": "2"})
    assert proc.returncode == 0, proc.stderr
    record = json.loads(rec.read_text().splitlines()[-1])
    assert record["gpu_count"] == 0 and not record.get("simulated")
    assert "SIMULATED" not in proc.stderr
    proc = wm("run", "--no-gpu", "--records", str(rec), "--", sys.executable, "-c", "pass", cwd=tmp_path,
              env={"WATTMETER_FAKE_NVML": "h100x2"})
    assert proc.returncode == 0 and "SIMULATED" not in proc.stderr
    both = wm("run", "--no-gpu", "--fake-gpus", "2", "--", "true", cwd=tmp_path)
    assert one_error(both) == "wattmeter: error: --no-gpu and --fake-gpus both given; choose one"


def test_fake_gpus_flag_beats_a_scenario_from_the_environment(tmp_path):
    rec = tmp_path / "r.jsonl"
    proc = wm("run", "--fake-gpus", "3", "--records", str(rec), "--", sys.executable, "-c", "pass", cwd=tmp_path,
              env={"WATTMETER_FAKE_NVML": "does-not-exist.toml"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(rec.read_text().splitlines()[-1])["gpu_count"] == 3


@pytest.mark.parametrize("args, message", [
    (["--fake-gpus", "2", "--gpus", "5"],
     "wattmeter: error: --gpus 5: this machine has 2 GPU(s), indices 0..1; e.g. --gpus 0"),
    (["--fake-gpus", "65"],
     "wattmeter: error: --fake-gpus '65': is above the fake NVML's maximum of 64 GPUs; give 1..64"),
    (["--interval", "1e-7"],
     "wattmeter: error: --interval '1e-7': is below 0.01 s, the fastest cadence a sensor supports; "
     "give at least 0.01 (default 0.1)"),
    (["--interval", "0"], "wattmeter: error: --interval '0': is below 0.01 s"),
    (["--interval", "inf"], "wattmeter: error: --interval 'inf': is not finite; expected seconds"),
])
def test_impossible_sensor_requests(tmp_path, args, message):
    proc = wm("run", *args, "--records", str(tmp_path / "r.jsonl"), "--", "true", cwd=tmp_path)
    assert one_error(proc).startswith(message)
    assert not (tmp_path / "r.jsonl").exists()     # refused before the child ran


@pytest.mark.parametrize("hours", ["inf", "nan", "-1"])
def test_estimate_hours_must_be_finite_and_positive(tmp_path, hours, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["estimate", "--gpu", "H100", "--hours", hours]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"wattmeter: error: --hours {float(hours):g} must be a finite number above 0, e.g. --hours 100"


def test_doctor_help_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Probe every sensor" in out and "how to fix it" in out


def test_a_bad_csv_path_names_csv_not_records(tmp_path):
    proc = wm("run", "--records", str(tmp_path / "r.jsonl"), "--csv", str(tmp_path / "no" / "x.csv"), "--", "true",
              cwd=tmp_path)
    assert one_error(proc) == (f"wattmeter: error: --csv {tmp_path / 'no' / 'x.csv'}: cannot write (directory "
                               f"{tmp_path / 'no'} does not exist); pass --csv with a writable file")
    assert not (tmp_path / "r.jsonl").exists()


def test_interval_floor_is_the_samplers() -> None:
    """The settings' --interval floor is the one the sampler enforces (kept apart so that
    config does not import the ledger)."""
    from wattmeter import config, sampler

    assert config.MIN_INTERVAL_S == sampler.MIN_INTERVAL_S
