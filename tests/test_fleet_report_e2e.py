"""`report --prometheus` against a real Prometheus scraping two `wattmeter serve` fake-GPU hosts."""
from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from wattmeter.cli import main

from e2e_servers import FLEET_NODE_A as HOST_A, PROMETHEUS_NAMES, Prometheus, WattmeterServe, require_binary, wait_until

WINDOW_S = 30
HOST_B = """
description = "node-b: an L4 whose only process exits at t = 40 s"
[[gpu]]
model = "NVIDIA L4"
[gpu.trace]
kind = "constant"
power_w = 60.0
[[gpu.process]]
pid = 201
sm_util = 50
start_s = 0
end_s = 40
"""


class _Vllm(BaseHTTPRequestHandler):
    started = time.monotonic()

    def do_GET(self) -> None:  # noqa: N802
        n = int((time.monotonic() - self.started) * 100)          # 100 generated tokens per second
        body = f'vllm:generation_tokens_total{{model_name="llama"}} {n}\n'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name.startswith("WATTMETER_"):
            monkeypatch.delenv(name)


def _serve(tmp_path: Path, name: str, scenario: str, zone: str, extra: list[str]) -> WattmeterServe:
    (tmp_path / f"{name}.toml").write_text(scenario)
    (tmp_path / "proc").mkdir(exist_ok=True)
    return WattmeterServe(["--fake-nvml", str(tmp_path / f"{name}.toml"), "--cpu", "none", "--interval", "0.05",
                           "--hostname", name, "--zone", zone, "--proc-root", str(tmp_path / "proc"),
                           "--pods-root", str(tmp_path / "pods"), *extra], tmp_path / name)


@pytest.mark.e2e
def test_fleet_report_from_real_prometheus(tmp_path: Path, capsys) -> None:
    binary = require_binary(PROMETHEUS_NAMES, "prometheus")
    vllm = ThreadingHTTPServer(("127.0.0.1", 0), _Vllm)
    threading.Thread(target=vllm.serve_forever, daemon=True).start()
    serves, prom = [], None
    try:
        serves.append(_serve(tmp_path, "node-a", HOST_A, "FR",
                             ["--server", "vllm", "--server-url", f"http://127.0.0.1:{vllm.server_address[1]}/metrics"]))
        t_b = time.time()
        serves.append(_serve(tmp_path, "node-b", HOST_B, "US-CA", []))
        prom = Prometheus(binary, tmp_path / "prom", [{"job_name": "wattmeter", "static_configs": [
            {"targets": [f"127.0.0.1:{s.port}" for s in serves]}]}])
        wait_until(prom.targets_up, 60, "both wattmeter targets to be up")
        at = t_b + 55.0                   # window [t_b + 25, t_b + 55]: node-b's GPU goes idle inside it
        wait_until(lambda: time.time() > at + 2.0, 120, "the window to pass", interval_s=0.5)
        code = main(["report", "--prometheus", prom.url, "--since", f"{WINDOW_S}s", "--at", f"{at:.3f}",
                     "--step", "1s", "--group-by", "host", "--format", "json", "--cap-watts", "40"])
        out = capsys.readouterr()
        assert code == 0, out.err
        report = json.loads(out.out)
        inst_a = f"127.0.0.1:{serves[0].port}"
        groups = {g["group"]: g for g in report["groups"]}
        gpus = {(g["hostname"], g["gpu"]): g for g in report["gpus"]}
        # Energy: GPUs by hand (300 + 90 W on node-a for 30 s), RAM as Prometheus itself says.
        ram_a = prom.value(f'sum(increase(wattmeter_ram_energy_joules_total{{hostname="node-a"}}[{WINDOW_S}s]))', at)
        assert groups["node-a"]["energy_kwh"] * 3.6e6 == pytest.approx(390.0 * WINDOW_S + ram_a, rel=0.01)
        # CO2e of node-a is its own emissions counter, by scope.
        em_a = prom.value(f'sum(increase(wattmeter_emissions_grams_total{{instance="{inst_a}"}}[{WINDOW_S}s]))', at)
        assert groups["node-a"]["emissions_g"]["location"] == pytest.approx(em_a, rel=1e-6)
        # J/token on node-a: its GPU energy over ~100 tokens/s (counters move every 5 s, hence 25 %).
        assert groups["node-a"]["j_per_token"] == pytest.approx(390.0 * WINDOW_S / (100 * WINDOW_S), rel=0.25)
        # Idle: node-a GPU 1 has no process for the whole window: 30 s and 90 W x 30 s = 2,700 J.
        a1 = gpus[("node-a", "1")]
        assert a1["idle_hours"] * 3600 == pytest.approx(WINDOW_S, abs=2.0)
        assert a1["idle_kwh"] * 3.6e6 == pytest.approx(2700.0, rel=0.01)
        assert a1["cap_saved_kwh"] * 3.6e6 == pytest.approx(50.0 * a1["idle_hours"] * 3600, rel=0.05)  # 90 -> 40 W
        assert gpus[("node-a", "0")]["idle_kwh"] == pytest.approx(0.0, abs=1e-9)
        # node-b's L4 went idle at scenario t = 40 s, i.e. 12-15 s before the window's end.
        b0 = gpus[("node-b", "0")]
        assert 9.0 <= b0["idle_hours"] * 3600 <= 16.0
        assert b0["idle_kwh"] * 3.6e6 == pytest.approx(60.0 * b0["idle_hours"] * 3600, abs=150.0)
        # node-b is in US-CA: idle cost at the EIA 2023 table price; node-a (FR) has none in the table.
        assert b0["idle_cost"] == pytest.approx(b0["idle_kwh"] * 0.2391) and b0["currency"] == "USD"
        assert a1["idle_cost"] is None
        # Waste: idle longest first; the busy GPU is not listed.
        assert [(w["hostname"], w["gpu"]) for w in report["waste"]] == [("node-a", "1"), ("node-b", "0")]
    finally:
        if prom is not None:
            prom.stop()
        for s in serves:
            assert s.stop() == 0, s.output
        vllm.shutdown()
        vllm.server_close()
