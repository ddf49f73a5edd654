"""`wattmeter run` end to end in subprocesses, with fake GPUs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ENV.pop("CUDA_VISIBLE_DEVICES", None)
ENV.pop("WATTMETER_FAKE_NVML", None)


def wm(*args: str, timeout: float = 60, cwd: str | None = None, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "wattmeter", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env or ENV)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_meters_child_and_writes_record(tmp_path):
    rec = tmp_path / "r.jsonl"
    p = wm("run", "--fake-gpus", "2", "--records", str(rec), "--job", "train", "--label", "team=ml",
           "--label", "project=x", "--json", "--", sys.executable, "-c", "import time; time.sleep(1.5)")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    [r] = records(rec)
    assert r["run_id"] == out["run_id"]
    assert r["job"] == "train" and r["labels"] == {"team": "ml", "project": "x"}
    assert r["status"] == "completed" and r["exit_code"] == 0
    assert r["simulated"] is True
    assert r["gpu_count"] == 2
    assert r["energy_j"]["gpu"] > 100      # two idle H100s for 1.5 s burn well over 100 J
    assert 1.4 < r["duration_s"] < 10
    assert {d["source"] for d in r["devices"] if d["component"] == "gpu"} == {"counter"}
    assert "SIMULATED" in p.stderr


def test_child_exit_code_is_propagated_and_crash_recorded(tmp_path):
    rec = tmp_path / "r.jsonl"
    p = wm("run", "--fake-gpus", "1", "--records", str(rec), "--", sys.executable, "-c",
           "raise SystemExit(3)")
    assert p.returncode == 3
    [r] = records(rec)
    assert r["status"] == "failed" and r["exit_code"] == 3


def test_command_not_found_exits_127_and_still_writes_record(tmp_path):
    rec = tmp_path / "r.jsonl"
    p = wm("run", "--fake-gpus", "1", "--records", str(rec), "--", "no-such-command-xyz")
    assert p.returncode == 127
    assert "no-such-command-xyz" in p.stderr
    assert "Traceback" not in p.stderr
    [r] = records(rec)
    assert r["status"] == "not_found" and r["exit_code"] == 127


def test_sigterm_is_forwarded_and_record_still_written(tmp_path):
    rec = tmp_path / "r.jsonl"
    marker = tmp_path / "got-term"
    child = (f"import signal, sys, time\n"
             f"def h(s, f):\n open({str(marker)!r}, 'w').write('term'); sys.exit(143)\n"
             f"signal.signal(signal.SIGTERM, h)\n"
             f"print('ready', flush=True)\n"
             f"time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "wattmeter", "run", "--fake-gpus", "1", "--records", str(rec),
                             "--", sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert marker.read_text() == "term"          # the child got the signal
    assert proc.returncode == 143
    [r] = records(rec)
    assert r["status"] == "failed" and r["exit_code"] == 143
    assert r["energy_j"]["gpu"] > 0


def test_child_killed_by_signal_is_recorded_as_killed(tmp_path):
    rec = tmp_path / "r.jsonl"
    p = wm("run", "--fake-gpus", "1", "--records", str(rec), "--", sys.executable, "-c",
           "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert p.returncode == 128 + 9
    [r] = records(rec)
    assert r["status"] == "killed"


def test_checkpoints_survive_sigkill_of_the_agent(tmp_path):
    rec = tmp_path / "r.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "wattmeter", "run", "--fake-gpus", "1", "--records", str(rec),
                             "--checkpoint-interval", "0.5", "--", sys.executable, "-c", "import time; time.sleep(30)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not rec.exists() or len(records(rec)) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    rs = records(rec)
    assert len(rs) >= 3
    assert all(r["checkpoint"] and r["status"] == "running" for r in rs)
    assert len({r["run_id"] for r in rs}) == 1
    energies = [r["energy_j"]["gpu"] for r in rs]
    assert energies == sorted(energies) and energies[-1] > 0


def test_csv_output(tmp_path):
    rec, csv_path = tmp_path / "r.jsonl", tmp_path / "r.csv"
    for _ in range(2):
        p = wm("run", "--fake-gpus", "1", "--records", str(rec), "--csv", str(csv_path), "--quiet", "--", "true")
        assert p.returncode == 0, p.stderr
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("run_id,job,hostname")
    assert len(lines) == 3


def test_context_from_environment_and_local_rank_selects_one_gpu(tmp_path):
    rec = tmp_path / "r.jsonl"
    env = {**ENV, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "SLURM_JOB_ID": "77"}
    p = wm("run", "--fake-gpus", "2", "--records", str(rec), "--", "true", env=env)
    assert p.returncode == 0, p.stderr
    [r] = records(rec)
    assert r["context"] == {"rank": "1", "local_rank": "1", "world_size": "2", "slurm_job_id": "77"}
    # Each rank meters only its own GPU, so N ranks on N GPUs never double count.
    assert r["gpu_count"] == 1
    assert r["devices"][0]["labels"]["gpu"] == "1"


def test_cuda_visible_devices_by_uuid(tmp_path):
    rec = tmp_path / "r.jsonl"
    p = wm("run", "--fake-gpus", "3", "--records", str(rec), "--quiet", "--json", "--", "true")
    uuids = [d["labels"]["uuid"] for d in json.loads(p.stdout)["devices"] if d["component"] == "gpu"]
    env = {**ENV, "CUDA_VISIBLE_DEVICES": uuids[2]}
    p = wm("run", "--fake-gpus", "3", "--records", str(rec), "--quiet", "--json", "--", "true", env=env)
    gpus = [d for d in json.loads(p.stdout)["devices"] if d["component"] == "gpu"]
    assert [g["labels"]["uuid"] for g in gpus] == [uuids[2]]


def test_config_precedence_flag_over_env_over_file(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.wattmeter]\njob = "from-file"\nrecords = "file.jsonl"\n')
    p = wm("run", "--fake-gpus", "1", "--quiet", "--", "true", cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert records(tmp_path / "file.jsonl")[0]["job"] == "from-file"
    p = wm("run", "--fake-gpus", "1", "--quiet", "--", "true", cwd=str(tmp_path),
           env={**ENV, "WATTMETER_JOB": "from-env"})
    assert records(tmp_path / "file.jsonl")[1]["job"] == "from-env"
    p = wm("run", "--fake-gpus", "1", "--quiet", "--job", "from-flag", "--", "true", cwd=str(tmp_path),
           env={**ENV, "WATTMETER_JOB": "from-env"})
    assert records(tmp_path / "file.jsonl")[2]["job"] == "from-flag"


def test_no_gpu_falls_back_with_clear_message(tmp_path):
    rec = tmp_path / "r.jsonl"
    p = wm("run", "--records", str(rec), "--", "true")
    assert p.returncode == 0, p.stderr
    [r] = records(rec)
    if r["gpu_count"] == 0:   # this machine has no GPU: CPU/RAM only, said plainly
        assert "No GPU metering" in p.stderr and "CPU and RAM only" in p.stderr
        assert r["energy_j"]["cpu"] >= 0 and r["simulated"] is False


BAD = [
    (["run", "--bogus", "--", "true"], "--bogus"),
    (["run", "--"], "no command"),
    (["run"], "no command"),
    (["run", "--interval", "0", "--", "true"], "--interval"),
    (["run", "--interval", "-1", "--", "true"], "--interval"),
    (["run", "--records", "/nonexistent-dir/x.jsonl", "--", "true"], "/nonexistent-dir/x.jsonl"),
    (["run", "--fake-nvml", "/nonexistent.toml", "--", "true"], "/nonexistent.toml"),
    (["run", "--fake-gpus", "zero", "--", "true"], "--fake-gpus"),
    (["run", "--label", "oops", "--", "true"], "oops"),
    (["run", "--json", ".", "--", "true"], "--json ."),
    (["run", "--json", "/nonexistent-dir/r.json", "--", "true"], "--json /nonexistent-dir/r.json"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    p = wm(*args, cwd=str(tmp_path))
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert needle in lines[0]
    assert "Traceback" not in p.stderr


def test_malformed_scenario_names_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[gpu]]\nmodel = "NVIDIA H100 80GB HBM3"\n[gpu.trace]\nkind = "sqare"\n')
    p = wm("run", "--fake-nvml", str(bad), "--", "true", cwd=str(tmp_path))
    assert p.returncode == 2
    assert "trace.kind" in p.stderr and "sqare" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_doctor_says_what_each_gpus_energy_comes_from_judged_from_its_data(tmp_path):
    # A counter GPU whose field 186 is a 100 ms point sample stamped with the read time: doctor
    # reads it for a while, and says edges go on the counter's own steps, and why.
    scen = tmp_path / "coarse.toml"
    scen.write_text('[[gpu]]\nmodel = "NVIDIA H100 80GB HBM3"\n[gpu.sensor]\nenergy_counter = true\n'
                    'instant_kind = "sample"\ninstant_refresh_s = 0.1\nfield_timestamp = "read"\n'
                    '[gpu.trace]\nkind = "square"\nhigh_w = 650.0\nlow_w = 90.0\nhigh_s = 0.05\nlow_s = 0.07\n')
    p = wm("doctor", "--fake-nvml", str(scen))
    assert p.returncode == 0, p.stderr
    assert "counter from energy counter" in p.stdout and "too coarse to split a counter span" in p.stdout
    p = wm("doctor", "--fake-gpus", "1")       # the default H100: 20 ms boxes stamped at refresh
    assert "edges shaped by field 186" in p.stdout and "too coarse" not in p.stdout


def test_doctor_reports_each_sensor():
    p = wm("doctor", "--fake-gpus", "1")
    assert p.returncode == 0, p.stderr
    assert "nvml" in p.stdout
    p = wm("doctor", "--json")
    data = json.loads(p.stdout)
    by = {s["sensor"]: s for s in data["sensors"]}
    for s in by.values():
        assert s["ok"] or s.get("reason") or s.get("errors")
