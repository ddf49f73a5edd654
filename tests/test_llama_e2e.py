"""End to end against a real llama.cpp ``llama-server`` (built from the llama-cpp-python sdist on
the package index, cached by version) serving a tiny random-weight GGUF written here; a
simulated GPU drawing a constant 300 W; ``wattmeter serve --server llamacpp``; and a real
Prometheus scraping both. Completions use ``ignore_eos`` with a fixed ``n_predict`` so every
request generates exactly that many tokens.

Phases (about two minutes once the binary is cached):
1. steady load, 32 tokens every 0.25 s (128 tokens/s), for longer than serve's 60 s J/token
   window: J/token read from Prometheus must equal 300 W / the real token rate within 2 %;
2. load paused: serve's token counters equal llama-server's own exactly;
3. llama-server restarted on the same port, more load: serve's counters equal the sum of both
   lifetimes, and Prometheus sees no reset in any wattmeter counter.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e_servers import PROMETHEUS_NAMES, Prometheus, WattmeterServe, http_get, require_binary, wait_until
from llama_server import LlamaServer, llama_server_binary, write_tiny_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GPU_W = 300.0
N_PREDICT = 32
PERIOD_S = 0.25                 # 128 generated tokens/s, as in issue 13's run
WINDOW_S = 60.0                 # serve's J/token window (TokenJoiner's default)
PROMPT = "the energy of a token"

SCENARIO = f"""description = "1x H100 at a constant {GPU_W:g} W (llama-server e2e)"
duration_s = 600
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
[gpu.trace]
kind = "constant"
power_w = {GPU_W}
"""


def counters(text: str, prefix: str) -> dict[str, float]:
    """name{labels} -> value for every sample whose name starts with prefix."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


class Load:
    """Paced completions on a thread: one request of N_PREDICT tokens every PERIOD_S (never a
    burst to catch up), recording (finish time, tokens predicted) per request."""

    def __init__(self, server: LlamaServer) -> None:
        self.server = server
        self.done: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._run = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._quit = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_t = time.monotonic()
        while not self._quit:
            if not self._run.is_set():
                self._idle.set()
                self._run.wait(0.1)
                next_t = time.monotonic()
                continue
            self._idle.clear()
            try:
                reply = self.server.complete(PROMPT, N_PREDICT)
                self.done.append((time.monotonic(), int(reply["tokens_predicted"])))
            except OSError as exc:                      # only while the server restarts
                self.errors.append(str(exc))
            next_t = max(next_t + PERIOD_S, time.monotonic() - PERIOD_S)
            time.sleep(max(0.0, next_t - time.monotonic()))

    def start(self) -> None:
        self._run.set()

    def pause(self) -> None:
        self._run.clear()
        time.sleep(0.05)
        assert self._idle.wait(30.0), "a completion did not finish in 30 s"

    def close(self) -> None:
        self._quit = True
        self._run.set()
        self._thread.join(30.0)

    def rate(self, t0: float, t1: float) -> float:
        """Generated tokens per second finished within [t0, t1]."""
        return sum(n for t, n in self.done if t0 <= t <= t1) / (t1 - t0)


def serve_tokens(serve: WattmeterServe) -> dict[str, float]:
    text = http_get(f"{serve.url}/metrics")[1].decode()
    return {k.split("kind=")[1].split(",")[0].rstrip("}"): v
            for k, v in counters(text, "wattmeter_tokens_total").items()}


def server_tokens(llama: LlamaServer) -> dict[str, float]:
    c = counters(llama.metrics(), "llamacpp:")
    return {"prompt": c["llamacpp:prompt_tokens_total{}"], "generation": c["llamacpp:tokens_predicted_total{}"]}


def test_llama_server_tokens_j_per_token_and_restart(tmp_path: Path) -> None:
    prometheus_bin = require_binary(PROMETHEUS_NAMES, "prometheus")
    binary = llama_server_binary()
    model = write_tiny_gguf(tmp_path / "tiny-llama.gguf")
    scenario = tmp_path / "h100_300w.toml"
    scenario.write_text(SCENARIO)

    llama = LlamaServer(binary, model, tmp_path / "llama")
    serve = WattmeterServe(["--fake-nvml", str(scenario), "--cpu", "none", "--server", "llamacpp",
                            "--server-url", f"{llama.url}/metrics"], tmp_path / "serve")
    prom = Prometheus(prometheus_bin, tmp_path / "prom", [
        {"job_name": "wattmeter", "static_configs": [{"targets": [f"127.0.0.1:{serve.port}"]}]},
        {"job_name": "llamacpp", "static_configs": [{"targets": [f"127.0.0.1:{llama.port}"]}]}])
    load = Load(llama)
    try:
        wait_until(prom.targets_up, 60, "Prometheus to scrape serve and llama-server")
        def tokens_up() -> bool:
            up = counters(http_get(f"{serve.url}/metrics")[1].decode(), "wattmeter_up")
            # the sensor-level series (device="", since per-device freshness came in with issue 9)
            return up.get("wattmeter_up{device=,sensor=tokens}") == 1.0

        wait_until(tokens_up, 60, "serve to read llama-server's counters")

        # 1. Steady load past the J/token window, then read J/token from Prometheus.
        load.start()
        t_load = time.monotonic()
        time.sleep(WINDOW_S + 2 * 5.0 + 3.0)          # the window, two token scrapes, one Prometheus scrape
        readings: list[tuple[float, float]] = []
        for _ in range(4):
            now = time.monotonic()
            readings.append((prom.value("wattmeter_energy_per_token_joules"), GPU_W / load.rate(now - WINDOW_S, now)))
            time.sleep(3.0)
        assert time.monotonic() - t_load > WINDOW_S
        real_rate = load.rate(t_load + 1.0, time.monotonic())
        assert real_rate == pytest.approx(N_PREDICT / PERIOD_S, rel=0.1), "the load was not steady"
        errors = [abs(got / want - 1) for got, want in readings]
        print(f"J/token read vs 300 W / real rate: {[(round(g, 4), round(w, 4)) for g, w in readings]}; "
              f"max error {max(errors):.2%}")

        # 2. Paused: serve's counters equal the server's own, exactly.
        load.pause()
        before = server_tokens(llama)
        assert before["generation"] == sum(n for _, n in load.done) > 0
        wait_until(lambda: serve_tokens(serve) == before, 30, f"serve to count {before}")

        # 3. Restart llama-server mid-run; counters keep counting from where they were.
        llama.restart()
        load.start()
        time.sleep(8.0)
        load.pause()
        after = server_tokens(llama)
        assert 0 < after["generation"] < before["generation"]     # the server's own counters restarted
        total = {k: before[k] + after[k] for k in before}
        wait_until(lambda: serve_tokens(serve) == total, 30, f"serve to count {total} across the restart")
        assert total["generation"] == sum(n for _, n in load.done)

        def prometheus_has_total() -> bool:
            got = prom.value('sum(wattmeter_tokens_total{kind="generation"})')
            return got == total["generation"]

        wait_until(prometheus_has_total, 30, "Prometheus to scrape the final token total")
        assert prom.value("resets(llamacpp:tokens_predicted_total[10m])") >= 1     # the server did reset
        names = json.loads(http_get(f"{prom.url}/api/v1/label/__name__/values")[1])["data"]
        wattmeter_counters = [n for n in names if n.startswith("wattmeter_") and n.endswith("_total")]
        assert "wattmeter_tokens_total" in wattmeter_counters and "wattmeter_gpu_energy_joules_total" in wattmeter_counters
        reset = {f"{name}{r['metric']}": r["value"][1] for name in wattmeter_counters
                 for r in prom.query(f"resets({name}[10m])") if float(r["value"][1]) != 0}
        assert reset == {}, f"wattmeter counters went backwards: {reset}"

        # Last, so that a J/token miss does not hide the exact-count and restart checks above.
        worst = max(range(len(errors)), key=errors.__getitem__)
        assert errors[worst] <= 0.02, (f"J/token {readings[worst][0]:.4f} vs {readings[worst][1]:.4f} "
                                       f"(300 W / real rate): {errors[worst]:.1%} off under steady load")
    finally:
        load.close()
        prom.stop()
        assert serve.stop() == 0, serve.output
        llama.stop()


def families(text: str) -> dict[str, tuple[str, str]]:
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}


def test_llamacpp_fixture_has_the_real_servers_series_and_help_text(tmp_path: Path) -> None:
    """tests/fixtures/servers/llamacpp.txt is this llama-server's page: same families, types and
    HELP text (values differ). A newer llama.cpp that renames a series fails here first."""
    llama = LlamaServer(llama_server_binary(), write_tiny_gguf(tmp_path / "tiny-llama.gguf"), tmp_path / "llama")
    try:
        reply = llama.complete(PROMPT, 8)
        assert reply["tokens_predicted"] == 8
        real = llama.metrics()
    finally:
        llama.stop()
    fixture = (Path(__file__).parent / "fixtures" / "servers" / "llamacpp.txt").read_text()
    assert families(fixture) == families(real)
    assert counters(real, "llamacpp:tokens_predicted_total") == {"llamacpp:tokens_predicted_total{}": 8.0}
