"""Fleet series that add up (issue 9), end to end: a real Prometheus scrapes one `wattmeter serve`
and a real Pushgateway that two `wattmeter run --pushgateway` jobs push to, all on the same fake
GPU drawing a constant 200 W. The dashboard's fleet power panels must read 200 W (not 600 W), the
jobs' energy totals must equal their records, and a finished run must leave no power series."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from e2e_servers import (PROMETHEUS_NAMES, PUSHGATEWAY_NAMES, Prometheus, Pushgateway, WattmeterServe,
                         require_binary, wait_until)

ROOT = Path(__file__).resolve().parents[1]
TRUE_POWER_W = 200.0
JOBS = tuple(f"job-{x}-{uuid.uuid4().hex[:6]}" for x in "ab")


def _panel(title: str) -> str:
    """The query of a fleet dashboard panel, with Grafana's variables filled in for this test."""
    dash = json.loads((ROOT / "deploy/grafana/dashboards/wattmeter-fleet.json").read_text())

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    expr = next(p["targets"][0]["expr"] for p in walk(dash["panels"]) if p.get("title") == title)
    return expr.replace("$__rate_interval", "5s").replace('"$hostname"', '".*"')


def _start_run(tmp_path: Path, job: str, gateway: str, scenario: Path) -> tuple[subprocess.Popen, Path]:
    records = tmp_path / f"{job}.jsonl"
    argv = [sys.executable, "-m", "wattmeter", "run", "--job", job, "--fake-nvml", str(scenario), "--cpu", "model",
            "--records", str(records), "--pushgateway", gateway, "--push-interval", "0.5", "--quiet",
            "--", sys.executable, "-c", "import time; time.sleep(8)"]
    return subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), records


def _record(path: Path) -> dict:
    return [r for r in map(json.loads, path.read_text().splitlines()) if not r["checkpoint"]][-1]


@pytest.mark.e2e
def test_serve_plus_two_pushed_runs_on_one_gpu_add_up(tmp_path: Path) -> None:
    prom_bin = require_binary(PROMETHEUS_NAMES, "prometheus")
    gw_bin = require_binary(PUSHGATEWAY_NAMES, "prometheus-pushgateway")
    scenario = tmp_path / "steady.toml"
    # A GPU without an energy counter: the meter integrates sampled power every 50 ms, so the
    # daemon's counter is smooth enough for a 5 s rate to be held to 2 % (a counter GPU is read
    # every 4 s, and a 5 s rate of 4 s steps swings by far more than 2 %; see COUNTER_PERIOD_S).
    scenario.write_text('[[gpu]]\nmodel = "NVIDIA A100-SXM4-40GB"\n'
                        f'[gpu.trace]\nkind = "constant"\npower_w = {TRUE_POWER_W}\n'
                        '[gpu.sensor]\nenergy_counter = false\ninstant_field = false\npower_usage = "instant"\n')
    gw = Pushgateway(gw_bin, tmp_path / "gw")
    serve = prom = None
    runs: list[tuple[subprocess.Popen, Path]] = []
    try:
        serve = WattmeterServe(["--fake-nvml", str(scenario), "--cpu", "model"], tmp_path / "serve")
        prom = Prometheus(prom_bin, tmp_path / "prom", [
            {"job_name": "wattmeter", "static_configs": [{"targets": [f"127.0.0.1:{serve.port}"]}]},
            # Keep only this test's groups: on a shared machine a stray run of another test can
            # push to a port that this gateway reused.
            {"job_name": "pushgateway", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{gw.port}"]}],
             "metric_relabel_configs": [{"source_labels": ["job"], "regex": f"{JOBS[0]}|{JOBS[1]}|pushgateway",
                                         "action": "keep"}]}])
        runs = [_start_run(tmp_path, job, gw.url, scenario) for job in JOBS]
        # Both runs are live in Prometheus: their power gauges are scraped from the gateway.
        wait_until(lambda: len(prom.query('wattmeter_job_power_watts{component="gpu"}')) == 2, 60,
                   "both runs' pushed power to be scraped")
        time.sleep(6)      # a full 5 s rate window with every process running
        for title in ("GPU power", "GPU power per node", "GPU power per GPU"):
            fleet_w = prom.value(_panel(title))
            assert abs(fleet_w - TRUE_POWER_W) <= 0.02 * TRUE_POWER_W, (title, fleet_w)
        assert prom.value(_panel("GPU power sensor (NVML gauge)")) == pytest.approx(TRUE_POWER_W, rel=0.02)
        # Each running job reports its GPU's power at job level, beside (never inside) the node panels.
        for r in prom.query('wattmeter_job_power_watts{component="gpu"}'):
            assert float(r["value"][1]) == pytest.approx(TRUE_POWER_W, rel=0.05), r

        for proc, _ in runs:
            assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        ended = time.time()
        time.sleep(2.5)    # the gateway already holds the final pushes; one more 1 s scrape sees them
        for job, (_, path) in zip(JOBS, runs):
            record = _record(path)
            run_id = record["run_id"]
            for component, energy_j in record["energy_j"].items():
                if component not in ("gpu", "cpu", "ram"):
                    continue
                pushed = prom.value(f'wattmeter_job_energy_joules_total{{job="{job}",run_id="{run_id}",'
                                    f'component="{component}"}}')
                assert pushed == pytest.approx(energy_j, rel=1e-9, abs=1e-6), (job, component)
            # Nothing of a finished run is left in a power panel (or anywhere as a gauge).
            assert prom.query(f'wattmeter_job_power_watts{{run_id="{run_id}"}}') == []
            names = {r["metric"]["__name__"] for r in prom.query(f'{{run_id="{run_id}"}}')}
            assert names and all(n.startswith("wattmeter_job_") or n.startswith("push_") for n in names), names
        assert time.time() - ended < 30
        # The fleet still reads the daemon's one GPU once.
        assert abs(prom.value(_panel("GPU power")) - TRUE_POWER_W) <= 0.02 * TRUE_POWER_W
    finally:
        for proc, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if prom is not None:
            prom.stop()
        if serve is not None:
            serve.stop()
        gw.stop()
