"""`wattmeter serve` end to end: a real Prometheus scrapes it (e2e), SIGTERM, and bad input."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wattmeter.cli import main
from wattmeter.sim.scenario import load_scenario

from e2e_servers import (PROMETHEUS_NAMES, Prometheus, WattmeterServe, http_get, require_binary, wait_until)

WINDOW_S = 30
SCENARIO = """
description = "e2e: a shared GPU at constant power and an idle one"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
[gpu.trace]
kind = "constant"
power_w = 300.0
[[gpu.process]]
pid = 101
sm_util = 60
[[gpu.process]]
pid = 102
sm_util = 20

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
[gpu.trace]
kind = "constant"
power_w = 90.0
"""


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "e2e.toml"
    path.write_text(SCENARIO)
    return path


@pytest.mark.e2e
def test_real_prometheus_scrapes_serve_and_matches_the_scenario(tmp_path: Path, scenario_file: Path) -> None:
    binary = require_binary(PROMETHEUS_NAMES, "prometheus")
    # Processes 101/102 are not ours: an empty proc root keeps a real PID's cgroup out of the labels.
    (tmp_path / "proc").mkdir()
    serve = WattmeterServe(["--fake-nvml", str(scenario_file), "--pid-labels", "--cpu", "model", "--interval", "0.05",
                            "--proc-root", str(tmp_path / "proc"), "--pods-root", str(tmp_path / "pods")],
                           tmp_path / "serve")
    prom = None
    try:
        prom = Prometheus(binary, tmp_path / "prom", [{"job_name": "wattmeter",
                                                        "static_configs": [{"targets": [f"127.0.0.1:{serve.port}"]}]}])
        wait_until(prom.targets_up, 60, "the wattmeter target to be up")
        dev0 = 'wattmeter_gpu_energy_joules_total{gpu="0"}'
        # Enough 1 s scrapes to cover the window plus Prometheus's extrapolation margin.
        wait_until(lambda: prom.value(f"count_over_time({dev0}[{WINDOW_S + 4}s])") >= WINDOW_S + 2, 120,
                   f"{WINDOW_S + 2} scrapes")
        at = time.time() - 1.0
        trace = load_scenario(str(scenario_file)).gpus[0].trace
        expected = trace.integral(0.0, WINDOW_S)                          # exact: 300 W x 30 s
        increase = prom.value(f"increase({dev0}[{WINDOW_S}s])", at)
        assert increase == pytest.approx(expected, rel=0.01)
        rate = prom.value(f"rate({dev0}[{WINDOW_S}s])", at)
        assert rate == pytest.approx(trace.power_w(0.0), rel=0.02)
        # Conservation through Prometheus: per-process series + idle + unattributed = device total.
        for gpu in ("0", "1"):
            sel = f'{{gpu="{gpu}"}}'
            parts = prom.value(
                f"sum(increase(wattmeter_process_gpu_energy_joules_total{sel}[{WINDOW_S}s])) or vector(0)", at)
            parts += prom.value(f"sum(increase(wattmeter_gpu_idle_energy_joules_total{sel}[{WINDOW_S}s]))", at)
            parts += prom.value(f"sum(increase(wattmeter_gpu_unattributed_energy_joules_total{sel}[{WINDOW_S}s]))",
                                at)
            device = prom.value(f"increase(wattmeter_gpu_energy_joules_total{sel}[{WINDOW_S}s])", at)
            assert parts == pytest.approx(device, rel=1e-3), gpu
        by_pid = {r["metric"]["pid"]: float(r["value"][1]) for r in
                  prom.query(f'increase(wattmeter_process_gpu_energy_joules_total{{gpu="0"}}[{WINDOW_S}s])', at)}
        assert by_pid["101"] / by_pid["102"] == pytest.approx(3.0, rel=0.02)      # SM 60 % vs 20 %
        idle1 = prom.value(f'increase(wattmeter_gpu_idle_energy_joules_total{{gpu="1"}}[{WINDOW_S}s])', at)
        assert idle1 == pytest.approx(90.0 * WINDOW_S, rel=0.01)                   # no process on GPU 1
        assert prom.value('wattmeter_build_info{simulated="true"}', at) == 1.0
        assert prom.value('wattmeter_up{sensor="nvml",device=""}', at) == 1.0
    finally:
        if prom is not None:
            prom.stop()
        assert serve.stop() == 0, serve.output


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    serve = WattmeterServe(["--fake-gpus", "1", "--cpu", "model"], tmp_path)
    status, body = http_get(f"{serve.url}/metrics")
    assert status == 200 and b"wattmeter_gpu_energy_joules_total" in body
    assert http_get(f"{serve.url}/healthz")[0] == 200
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(30) == 0
    serve.stop()
    assert "wattmeter: stopped" in serve.output and "Traceback" not in serve.output


def test_default_listen_address_is_loopback_9445() -> None:
    from wattmeter.cli import build_parser
    from wattmeter.exporters.http import DEFAULT_HOST, DEFAULT_PORT
    assert (DEFAULT_HOST, DEFAULT_PORT) == ("127.0.0.1", 9445)
    args = build_parser().parse_args(["serve"])
    assert args.listen is None                    # no flag: the loopback default applies


# -- bad input: one line, exit code 2, no traceback -------------------------------------------------
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_port_in_use(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, err = _cli(["serve", "--fake-gpus", "1", "--cpu", "model", "--listen", f"127.0.0.1:{port}"], capsys)
    assert code == 2
    assert f"port {port} is already in use" in err and err.count("\n") == 1


@pytest.mark.parametrize("content, match", [
    (None, "cannot read"),
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "does not exist"),
    ("basic_auth_users:\n  alice: plaintext\n", "bcrypt hash"),
])
def test_bad_web_config(tmp_path: Path, capsys, content: str | None, match: str) -> None:
    path = tmp_path / "web.yml"
    if content is not None:
        path.write_text(content)
    code, err = _cli(["serve", "--fake-gpus", "1", "--web-config", str(path)], capsys)
    assert code == 2 and match in err and err.startswith("wattmeter: error: --web-config") and err.count("\n") == 1


@pytest.mark.parametrize("listen", ["http://0.0.0.0:9445", "localhost", "1.2.3.4:port"])
def test_unknown_listen_form(capsys, listen: str) -> None:
    code, err = _cli(["serve", "--fake-gpus", "1", "--listen", listen], capsys)
    assert code == 2 and "--listen" in err and err.count("\n") == 1


@pytest.mark.parametrize("url", ["ftp://gateway:9091", "http://", "http://host:port", "not a url"])
def test_bad_pushgateway_url(tmp_path: Path, capsys, url: str) -> None:
    code, err = _cli(["run", "--quiet", "--fake-gpus", "1", "--records", str(tmp_path / "r.jsonl"),
                      "--pushgateway", url, "--", sys.executable, "-c", "pass"], capsys)
    assert code == 2 and err.startswith("wattmeter: error: --pushgateway") and err.count("\n") == 1


def test_bad_input_has_no_traceback_as_a_process(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "wattmeter", "serve", "--fake-gpus", "1",
                          "--web-config", str(tmp_path / "missing.yml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("wattmeter: error: --web-config") and "Traceback" not in out.stderr


def test_serve_scrapes_inference_server_tokens(tmp_path: Path) -> None:
    """--server vllm: token counters and J/token appear next to the energy series."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    started = time.monotonic()

    class Vllm(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            n = int((time.monotonic() - started) * 100)      # 100 generated tokens per second
            body = (f'vllm:prompt_tokens_total{{model_name="llama-3.1-8b"}} {n // 4}\n'
                    f'vllm:generation_tokens_total{{model_name="llama-3.1-8b"}} {n}\n').encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    vllm = ThreadingHTTPServer(("127.0.0.1", 0), Vllm)
    threading.Thread(target=vllm.serve_forever, daemon=True).start()
    serve = WattmeterServe(["--fake-gpus", "1", "--cpu", "model", "--server", "vllm", "--server-url",
                            f"http://127.0.0.1:{vllm.server_address[1]}/metrics"], tmp_path)
    try:
        def per_token() -> bytes | None:
            body = http_get(f"{serve.url}/metrics")[1]
            return body if b'wattmeter_energy_per_token_joules{model="llama-3.1-8b"}' in body else None

        body = wait_until(per_token, 90, "J/token from the scraped server")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert samples[("wattmeter_tokens_total", (("kind", "generation"), ("model", "llama-3.1-8b")))] > 0
        assert samples[("wattmeter_up", (("device", ""), ("sensor", "tokens")))] == 1.0
    finally:
        assert serve.stop() == 0, serve.output
        vllm.shutdown()
        vllm.server_close()
