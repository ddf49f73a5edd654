"""`serve`'s token options end to end: bad input, a dripping server, /healthz, the proxy."""
from __future__ import annotations

import http.client
import json
import signal
import time
from pathlib import Path

import pytest
from e2e_servers import WattmeterServe, free_port, http_get, wait_until
from prometheus_client.parser import text_string_to_metric_families
from fake_openai import FakeOpenAI
from test_tokens import DripServer

from wattmeter.cli import main


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--server", "vlm"], "unknown server kind 'vlm'; did you mean 'vllm'?"),
    (["--server", "vllm", "--server-url", "http://127.0.0.1:70000/metrics"], "the port must be 1-65535"),
    (["--server", "vllm", "--server-url", "http://127.0.0.1:8000/met rics"], "contains spaces"),
    (["--server", "vllm", "--gpu-model-map", "gpu0=llama,gpu5=qwen"], "--gpu-model-map names gpu5, which does not exist"),
    (["--server", "vllm", "--jpt-window", "-3"], "--jpt-window '-3'"),
    (["--server", "vllm", "--idle-power", "lots"], "--idle-power 'lots'"),
    (["--server", "vllm", "--proxy-to", "http://127.0.0.1:8000"], "--server and --proxy-to both given"),
    (["--proxy-to", "http://127.0.0.1:99999"], "--proxy-to 'http://127.0.0.1:99999'"),
    (["--server-url", "http://127.0.0.1:8000/metrics"], "--server-url needs --server KIND"),
    (["--server", "auto"], "--server auto needs --server-url"),
    (["--server", "vllm", "--requests-log", "r.jsonl"], "--requests-log needs --proxy-to"),
    (["--proxy-to", "http://127.0.0.1:8000", "--requests-log", "/nonexistent/dir/r.jsonl"], "cannot write there"),
    (["--proxy-to", "http://127.0.0.1:8000", "--proxy-listen", "127.0.0.1:70000"], "--proxy-listen"),
])
def test_bad_token_options_are_one_line_and_exit_2(capsys, argv, message):
    code, err = _cli(["serve", "--fake-gpus", "2", "--cpu", "model", *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("wattmeter: error:")


def test_options_come_from_the_environment_too(capsys, monkeypatch):
    monkeypatch.setenv("WATTMETER_SERVER", "vllm")
    monkeypatch.setenv("WATTMETER_GPU_MODEL_MAP", "gpu7=llama")
    code, err = _cli(["serve", "--fake-gpus", "1", "--cpu", "model"], capsys)
    assert code == 2 and "gpu7" in err and "GPUs: gpu0" in err


def test_options_come_from_the_config_file_too(capsys, monkeypatch, tmp_path: Path):
    (tmp_path / "wattmeter.toml").write_text('server = "vllm"\ngpu_model_map = { gpu9 = "llama" }\n')
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["serve", "--fake-gpus", "1", "--cpu", "model"], capsys)
    assert code == 2 and "--gpu-model-map names gpu9" in err


def test_serve_starts_lists_the_scraper_in_healthz_and_stops_in_2s_despite_a_dripping_server(tmp_path: Path):
    drip = DripServer(pace_s=0.05)
    serve = None
    try:
        serve = WattmeterServe(["--fake-gpus", "1", "--cpu", "model", "--server", "vllm", "--server-url", drip.url],
                               tmp_path)
        status, body = wait_until(lambda: (r := http_get(f"{serve.url}/healthz")) and b"tokens: down" in r[1] and r,
                                  30, "the token scraper in /healthz")
        assert status == 200 and b"timeout" in body and drip.url.encode() in body
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(10) == 0
        assert time.monotonic() - t0 < 2.0
    finally:
        if serve is not None:
            serve.stop()
        drip.close()


def test_serve_proxy_mode_books_usage_and_exports_per_request_quantiles(tmp_path: Path):
    upstream = FakeOpenAI(delay_s=0.02)
    port = free_port()
    serve = None
    try:
        serve = WattmeterServe(["--fake-gpus", "1", "--cpu", "model", "--proxy-to", upstream.url,
                                "--proxy-listen", f"127.0.0.1:{port}", "--requests-log", str(tmp_path / "req.jsonl"),
                                "--zone", "FR"], tmp_path)
        assert f"proxying http://127.0.0.1:{port}" in serve.output
        for i in range(6):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "p",
                                                                     "max_tokens": 10 * (i + 1)}))
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 10 * (i + 1)
            conn.close()

        def exported() -> bytes | None:
            body = http_get(f"{serve.url}/metrics")[1]
            return body if b'wattmeter_requests_total{model="tiny"} 6.0' in body else None

        body = wait_until(exported, 60, "all 6 requests final")
        assert b'wattmeter_request_energy_quantile_joules{model="tiny",quantile="0.9"}' in body
        assert b'wattmeter_tokens_total{model="tiny",kind="generation"} 210.0' in body
        samples = {(f.name, tuple(sorted(x.labels.items()))): x.value
                   for f in text_string_to_metric_families(body.decode()) for x in f.samples}
        assert samples[("wattmeter_requests", (("model", "tiny"),))] == 6
        requests_j = samples[("wattmeter_request_energy_joules", (("model", "tiny"),))]
        idle_j = samples[("wattmeter_request_idle_energy_joules", (("device", "gpu0"),))]
        gpu_j = next(v for (name, _), v in samples.items() if name == "wattmeter_gpu_energy_joules")
        assert requests_j > 0 and requests_j + idle_j <= gpu_j * 1.001      # shares never exceed the GPU
        assert b"tokens: up [proxy" in http_get(f"{serve.url}/healthz")[1]
        rows = [json.loads(line) for line in (tmp_path / "req.jsonl").read_text().splitlines()]
        assert sorted(r["generation_tokens"] for r in rows) == [10, 20, 30, 40, 50, 60]
        # >= 0, not > 0: in serve's first seconds the ledger dates a counter's steps coarsely, so a
        # 20 ms request can fall between two steps (its share then lands on its neighbours).
        assert all(r["prompt_tokens"] == 7 and r["energy_j"] >= 0 and r["co2e_g"] >= 0 for r in rows), rows
        assert sum(r["co2e_g"] for r in rows) > 0
        assert sum(r["energy_j"] for r in rows) == pytest.approx(requests_j)
    finally:
        if serve is not None:
            serve.stop()
        upstream.close()
