"""`wattmeter run --pushgateway` and `--metrics-port`: pushes, grouping keys, gateway outages,
and (e2e) a real Pushgateway scraped by a real Prometheus."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from wattmeter.errors import UsageError
from wattmeter.exporters.pushgateway import Pusher, validate_gateway_url

from e2e_servers import (PROMETHEUS_NAMES, PUSHGATEWAY_NAMES, Prometheus, Pushgateway, free_port, http_get,
                         require_binary, wait_until)


class _Gateway:
    """A stand-in gateway that records PUTs (path, body) and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(("PUT", self.path, body))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("wattmeter_job_energy_joules", "t", ["job", "component"], registry=reg).labels("train", "gpu").inc(5)
    return reg


def test_push_uses_a_grouping_key_unique_to_the_run() -> None:
    gw = _Gateway()
    try:
        pusher = Pusher(gw.url, "train", {"run_id": "abc123", "instance": "node-a"}, _registry())
        assert pusher.push()
        method, path, body = gw.requests[0]
        assert method == "PUT"                                  # replaces the whole group
        assert path == "/metrics/job/train/instance/node-a/run_id/abc123"   # key order: prometheus_client sorts
        assert b'wattmeter_job_energy_joules_total{component="gpu",job="train"} 5.0' in body
        assert pusher.health()[0].up is True
    finally:
        gw.close()


def test_gateway_down_is_counted_never_raised() -> None:
    pusher = Pusher(f"http://127.0.0.1:{free_port()}", "train", {"run_id": "x", "instance": "h"}, _registry(),
                    timeout_s=1.0)
    assert pusher.push() is False
    assert pusher.close(attempts=2, backoff_s=0.01) is False
    h = pusher.health()[0]
    assert h.up is False and h.errors == {"unreachable": 3}


def test_gateway_error_status_is_counted_by_code() -> None:
    gw = _Gateway(status=500)
    try:
        pusher = Pusher(gw.url, "train", {"run_id": "x", "instance": "h"}, _registry())
        assert pusher.push() is False and pusher.errors == {"http_500": 1}
        gw.status = 200
        assert pusher.push() is True                            # retried on the next push
    finally:
        gw.close()


def test_periodic_pushes_and_final_push() -> None:
    gw = _Gateway()
    try:
        pusher = Pusher(gw.url, "train", {"run_id": "x", "instance": "h"}, _registry(), interval_s=0.2).start()
        wait_until(lambda: len(gw.requests) >= 3, 30, "three periodic pushes")
        pusher.request()
        assert pusher.close() is True
    finally:
        gw.close()


@pytest.mark.parametrize("url", ["ftp://gw:9091", "http://", "http://gw:notaport", "http://gw:9091/?x=1",
                                 "gw 9091", ""])
def test_bad_gateway_urls(url: str) -> None:
    with pytest.raises(UsageError, match="--pushgateway"):
        validate_gateway_url(url)


def test_bare_host_port_is_accepted_as_http() -> None:
    assert validate_gateway_url("pushgateway:9091") == "http://pushgateway:9091"


# -- through `wattmeter run` ---------------------------------------------------------------------------
def _run(tmp_path: Path, *flags: str, child: str = "pass", timeout_s: float = 120,
         gpus: tuple[str, ...] = ("--fake-gpus", "1")) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "wattmeter", "run", "--job", "e2e-job", *gpus, "--cpu", "model",
            "--records", str(tmp_path / "records.jsonl"), *flags, "--", sys.executable, "-c", child]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=tmp_path)


def _final_record(tmp_path: Path) -> dict:
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    return [r for r in records if not r["checkpoint"]][-1]


def test_run_survives_a_gateway_that_is_down(tmp_path: Path) -> None:
    out = _run(tmp_path, "--pushgateway", f"http://127.0.0.1:{free_port()}", "--push-interval", "0.5",
               child="import time; time.sleep(1.5)")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert _final_record(tmp_path)["status"] == "completed"


def test_run_exit_code_is_the_childs_with_a_gateway_down(tmp_path: Path) -> None:
    out = _run(tmp_path, "--pushgateway", f"http://127.0.0.1:{free_port()}", child="raise SystemExit(3)")
    assert out.returncode == 3


def test_run_metrics_port_serves_the_job_while_it_runs(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "wattmeter", "run", "--job", "served", "--fake-gpus", "1", "--cpu", "model",
            "--records", str(tmp_path / "r.jsonl"), "--metrics-port", "0", "--",
            sys.executable, "-c", "import time; time.sleep(60)"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()   # type: ignore[arg-type]
    try:
        url = wait_until(lambda: next((m.group(1) for ln in list(lines)
                                       for m in [re.search(r"(http://127\.0\.0\.1:\d+)/metrics", ln)] if m), None),
                         60, "the job's metrics URL")

        def job_energy() -> float:
            status, body = http_get(f"{url}/metrics")
            return sum(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
                       if s.name == "wattmeter_job_energy_joules_total" and s.labels["job"] == "served"
                       and s.labels["component"] == "gpu") if status == 200 else 0.0

        assert wait_until(lambda: job_energy() > 0, 60, "job energy to grow") > 0

        def http_errors() -> dict[str, float]:
            body = http_get(f"{url}/metrics")[1].decode()
            return {s.labels["error"]: s.value for f in text_string_to_metric_families(body) for s in f.samples
                    if s.name == "wattmeter_job_http_errors_total" and s.labels["job"] == "served"}

        # Refusals are counted from 0 (an alert sees the first); a request with an oversized body
        # is refused and counted.
        assert http_errors() == {"read_timeout": 0, "connection_limit": 0, "body_too_large": 0}
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
            assert conn.recv(200).startswith(b"HTTP/1.")
        assert wait_until(lambda: http_errors().get("body_too_large", 0) >= 1, 30, "the refusal to be counted")
    finally:
        proc.terminate()
        proc.wait(60)


# -- end to end: a real Pushgateway scraped by a real Prometheus ------------------------------------------------
@pytest.mark.e2e
def test_run_pushes_to_a_real_pushgateway_that_prometheus_scrapes(tmp_path: Path) -> None:
    prom_bin = require_binary(PROMETHEUS_NAMES, "prometheus")
    gw_bin = require_binary(PUSHGATEWAY_NAMES, "prometheus-pushgateway")
    gw = Pushgateway(gw_bin, tmp_path / "gw")
    prom = None
    try:
        prom = Prometheus(prom_bin, tmp_path / "prom", [{
            "job_name": "pushgateway", "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{gw.port}"]}]}])
        scenario = tmp_path / "steady.toml"
        scenario.write_text('[[gpu]]\nmodel = "NVIDIA H100 80GB HBM3"\n'
                            '[gpu.trace]\nkind = "constant"\npower_w = 200.0\n')
        out = _run(tmp_path, "--pushgateway", gw.url, "--push-interval", "0.5", child="import time; time.sleep(3)",
                   gpus=("--fake-nvml", str(scenario)))
        assert out.returncode == 0, out.stderr
        record = _final_record(tmp_path)
        run_id = record["run_id"]
        group = [g for g in gw.groups() if g["labels"].get("run_id") == run_id]
        assert len(group) == 1 and group[0]["labels"]["job"] == "e2e-job"
        assert group[0]["labels"]["instance"] == record["hostname"]
        sel = f'wattmeter_job_energy_joules_total{{job="e2e-job",run_id="{run_id}",component="gpu"}}'
        result = wait_until(lambda: prom.query(sel), 60, "Prometheus to scrape the pushed series")
        pushed_gpu_j = float(result[0]["value"][1])
        # The final push carries the job's window as in its record when run.py hands the result
        # to JobExporter.finish(); otherwise the meter's total at stop, which differs from the
        # window by at most the meter's edges (a counter read, the stop tail: < 1.5 s at 200 W).
        assert abs(pushed_gpu_j - record["energy_j"]["gpu"]) <= 200.0 * 1.5
        # Job-scoped only: a run never pushes the daemon's host-level names (they would double count).
        names = {r["metric"]["__name__"] for r in prom.query(f'{{run_id="{run_id}"}}')}
        assert names and all(n.startswith(("wattmeter_job_", "push_")) for n in names), names
    finally:
        if prom is not None:
            prom.stop()
        gw.stop()


def test_finish_freezes_the_job_series_to_the_window_result() -> None:
    from wattmeter.clock import VirtualClock
    from wattmeter.exporters.jobexport import JobExportOptions, start_job_exporter
    from wattmeter.exporters.records import RunIdentity
    from wattmeter.meter import Meter
    from wattmeter.model import Component, DeviceEnergy, Scope, Source, WindowResult
    from scripted import ScriptedSensor, constant

    clock = VirtualClock(start=0.0)
    meter = Meter([ScriptedSensor(*constant(100.0))], clock=clock)
    for _ in range(10):
        meter.poll()
        clock.advance(0.1)
    gw = _Gateway()
    options = JobExportOptions(pushgateway=gw.url, push_interval_s=60.0)
    ident = RunIdentity(run_id="r1", job="train", hostname="h", command="python")
    try:
        exporter = start_job_exporter(options, meter, ident, None)
        assert exporter is not None
        result = WindowResult("train", 0.0, 0.42, 0.0, 0.42, (DeviceEnergy(
            "gpu0", Component.GPU, Scope.HOST, Source.COUNTER, 42.0, 100.0, 100.0),))
        wait_until(lambda: gw.requests, 10, "the first push")
        running = gw.requests[0][2].decode()
        # While running: job-scoped names only, with the job's power gauge.
        names = {ln.split("{")[0].split(" ")[0] for ln in running.splitlines() if ln and not ln.startswith("#")}
        assert names == {"wattmeter_job_energy_joules_total", "wattmeter_job_power_watts"}, names
        assert 'wattmeter_job_power_watts{component="gpu",hostname="h",job="train"}' in running
        exporter.finish(result)
        exporter.close()
        body = gw.requests[-1][2]
        assert b'wattmeter_job_energy_joules_total{component="gpu",hostname="h",job="train"} 42.0' in body
        # The final push replaces the group: totals only, no gauge left to linger in a power panel.
        assert b"wattmeter_job_power_watts" not in body and b"# TYPE" in body
        assert start_job_exporter(JobExportOptions(), meter, ident, None) is None
    finally:
        gw.close()
