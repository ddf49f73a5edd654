"""Token counters from inference servers, monotonic totals over restarts, and J/token joins."""
from __future__ import annotations

import http.server
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wattmeter.clock import VirtualClock
from wattmeter.errors import UsageError
from wattmeter.meter import Meter
from wattmeter.model import Batch, Component, Device, Reading, Source
from wattmeter.tokens import (
    SERVER_KINDS, OllamaResponseCounter, TokenJoiner, TokenScrapeError, TokenScraper, TokenStat,
    normalise_url, parse_tokens,
)

FIXTURES = Path(__file__).parent / "fixtures" / "servers"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


# -- fakes -------------------------------------------------------------------------------
@dataclass
class CounterSensor:
    """Energy counters we set by hand: key -> E(t) in J."""

    energy: dict[str, Callable[[float], float]]
    name: str = "fake"
    period_s: float = 0.1

    def devices(self) -> list[Device]:
        return [Device(k, Component.GPU if k.startswith("gpu") else Component.CPU, Source.COUNTER)
                for k in self.energy]

    def read(self, now: float) -> Batch:
        return Batch([Reading(k, now, energy_j=f(now)) for k, f in self.energy.items()])

    def close(self) -> None:
        pass


@dataclass
class FakeSource:
    """A TokenSource whose totals we set. Like TokenScraper, the first deltas() is a baseline."""

    now: dict = field(default_factory=dict)
    _base: dict | None = None
    up: bool = True

    @property
    def totals(self) -> dict:
        return dict(self.now)

    @property
    def models(self) -> frozenset:
        return frozenset(m for m, _ in self.now)

    def deltas(self) -> dict:
        base, self._base = self._base, dict(self.now)
        if base is None:
            return {}
        return {k: v - base.get(k, 0) for k, v in self.now.items() if v > base.get(k, 0)}


class MetricsServer:
    """A /metrics endpoint on 127.0.0.1 whose body, status and delay the test changes."""

    def __init__(self, port: int = 0) -> None:
        self.body, self.status, self.delay = "", 200, 0.0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(outer.delay)
                data = outer.body.encode()
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass   # the client gave up (timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = MetricsServer()
    yield s
    s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_text(engines: dict[str, tuple[float, float]], model: str = LLAMA) -> str:
    lines = ["# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
             "# TYPE vllm:prompt_tokens_total counter"]
    lines += [f'vllm:prompt_tokens_total{{engine="{e}",model_name="{model}"}} {p}' for e, (p, _) in engines.items()]
    lines += ["# TYPE vllm:generation_tokens_total counter"]
    lines += [f'vllm:generation_tokens_total{{engine="{e}",model_name="{model}"}} {g}' for e, (_, g) in engines.items()]
    return "\n".join(lines) + "\n"


# -- parsing the servers' own exposition ------------------------------------------------------
EXPECTED = {
    "vllm": ("vllm", {(LLAMA, "prompt"): 218500, (LLAMA, "generation"): 86000}),
    "sglang": ("sglang", {("Qwen/Qwen2.5-7B-Instruct", "prompt"): 1282888,
                          ("Qwen/Qwen2.5-7B-Instruct", "generation"): 337210}),
    "sglang-realtime": ("sglang", {("Qwen/Qwen2.5-7B-Instruct", "prompt"): 880888 + 402000,
                                   ("Qwen/Qwen2.5-7B-Instruct", "generation"): 338100}),
    "tgi": ("tgi", {("default", "prompt"): 96870, ("default", "generation"): 151330}),
    "llamacpp": ("llamacpp", {("default", "prompt"): 33065, ("default", "generation"): 7801}),
    "lmdeploy": ("lmdeploy", {("internlm/internlm2_5-7b-chat", "prompt"): 52340,
                              ("internlm/internlm2_5-7b-chat", "generation"): 18110}),
    "triton": ("triton", {("tensorrt_llm", "prompt"): 61440, ("tensorrt_llm", "generation"): 30720}),
    "ray": ("ray", {("llama-3.1-8b", "prompt"): 80000, ("llama-3.1-8b", "generation"): 20000}),
}


def test_every_server_kind_has_a_fixture_case():
    assert set(EXPECTED) == set(SERVER_KINDS)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_parse_tokens_reads_each_servers_counters(kind):
    fixture, expected = EXPECTED[kind]
    got = parse_tokens(kind, (FIXTURES / f"{fixture}.txt").read_text())
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("fixture", sorted({f for f, _ in EXPECTED.values()}))
def test_fixtures_are_valid_exposition(fixture):
    families = list(text_string_to_metric_families((FIXTURES / f"{fixture}.txt").read_text()))
    assert families


def test_prometheus_client_strips_total_from_counter_families_but_not_samples():
    # Why we match sample names: the family is "vllm:prompt_tokens", the sample keeps "_total".
    fams = {f.name: f for f in text_string_to_metric_families((FIXTURES / "vllm.txt").read_text())}
    assert "vllm:prompt_tokens" in fams and "vllm:prompt_tokens_total" not in fams
    assert {s.name for s in fams["vllm:prompt_tokens"].samples} == {"vllm:prompt_tokens_total"}


def test_vllm_created_samples_and_histograms_are_not_tokens():
    text = (FIXTURES / "vllm.txt").read_text()
    assert "vllm:generation_tokens_created" in text and "request_generation_tokens_sum" in text
    assert parse_tokens("vllm", text)[(LLAMA, "generation")] == 45210 + 40790


def test_labels_with_escapes_and_several_models():
    text = ('vllm:generation_tokens_total{model_name="a\\"b",engine="0"} 5\n'
            'vllm:generation_tokens_total{model_name="c",engine="0"} 7 1700000000000\n')
    assert parse_tokens("vllm", text) == {('a"b', "generation"): 5, ("c", "generation"): 7}


def test_older_ray_names_kept_the_colon():
    text = (FIXTURES / "ray.txt").read_text().replace("ray_vllm_", "ray_vllm:")
    assert parse_tokens("ray", text) == EXPECTED["ray"][1]


def test_unlabelled_servers_use_the_given_model_name():
    text = (FIXTURES / "llamacpp.txt").read_text()
    assert parse_tokens("llamacpp", text, default_model="qwen-gguf")[("qwen-gguf", "generation")] == 7801


def test_garbage_is_a_parse_error_and_absent_counters_are_empty():
    with pytest.raises(TokenScrapeError) as err:
        parse_tokens("vllm", "<html><body>502 Bad Gateway</body></html>")
    assert err.value.kind == "parse"
    with pytest.raises(TokenScrapeError):
        parse_tokens("vllm", 'vllm:generation_tokens_total{model_name="m" 12\n')
    assert parse_tokens("vllm", (FIXTURES / "tgi.txt").read_text()) == {}


def test_unknown_kind_and_bad_url_are_usage_errors():
    with pytest.raises(UsageError, match="vllm"):
        TokenScraper("vlm", "http://127.0.0.1:1/metrics")
    with pytest.raises(UsageError):
        normalise_url("ftp://host/metrics")
    assert normalise_url("127.0.0.1:8000") == "http://127.0.0.1:8000/metrics"
    assert normalise_url("http://h:1/custom") == "http://h:1/custom"


# -- scraping over HTTP --------------------------------------------------------------------
def test_scraper_totals_follow_counters_and_survive_a_restart(server):
    s = TokenScraper("vllm", server.url)
    server.body = vllm_text({"0": (1000, 400)})
    assert s.poll() == {(LLAMA, "prompt"): 1000, (LLAMA, "generation"): 400}
    assert s.up and not s.errors
    server.body = vllm_text({"0": (1500, 700)})
    assert s.poll()[(LLAMA, "generation")] == 700
    server.body = vllm_text({"0": (20, 30)})            # restarted: counters back near zero
    assert s.poll() == {(LLAMA, "prompt"): 1520, (LLAMA, "generation"): 730}
    assert s.resets == 1
    server.body = vllm_text({"0": (50, 80)})
    assert s.poll()[(LLAMA, "generation")] == 780


def test_a_reset_is_detected_per_series_not_on_the_sum(server):
    s = TokenScraper("vllm", server.url)
    server.body = vllm_text({"0": (0, 1000), "1": (0, 1000)})
    s.poll()
    # Engine 1 restarts (1000 -> 100) while engine 0 goes on (1000 -> 1500): the sum rises anyway.
    server.body = vllm_text({"0": (0, 1500), "1": (0, 100)})
    assert s.poll()[(LLAMA, "generation")] == 2000 + 500 + 100


def test_deltas_skip_the_servers_history_then_count_new_tokens(server):
    s = TokenScraper("llamacpp", server.url, model="gguf")
    server.body = (FIXTURES / "llamacpp.txt").read_text()
    assert s.deltas() == {}                              # 7801 tokens from before we started
    assert s.totals[("gguf", "generation")] == 7801
    server.body = server.body.replace("tokens_predicted_total 7801", "tokens_predicted_total 7901")
    assert s.deltas() == {("gguf", "generation"): 100}
    assert s.deltas() == {}


def test_server_down_counts_errors_and_keeps_totals(server):
    s = TokenScraper("vllm", server.url)
    server.body = vllm_text({"0": (10, 20)})
    s.poll()
    server.close()
    assert s.poll() == {(LLAMA, "prompt"): 10, (LLAMA, "generation"): 20}
    assert s.errors["connection"] == 1 and not s.up
    assert "connection" in s.last_error


def test_refused_at_start_then_up_sets_the_baseline_at_the_first_good_scrape():
    port = free_port()
    s = TokenScraper("vllm", f"127.0.0.1:{port}", timeout_s=1.0)
    assert s.deltas() == {} and s.errors["connection"] == 1
    srv = MetricsServer(port)
    try:
        srv.body = vllm_text({"0": (100, 5000)})
        assert s.deltas() == {}                          # history, not ours
        srv.body = vllm_text({"0": (100, 5050)})
        assert s.deltas() == {(LLAMA, "generation"): 50}
        assert s.up
    finally:
        srv.close()


def test_slow_server_times_out_within_the_budget(server):
    s = TokenScraper("vllm", server.url, timeout_s=0.2)
    server.body = vllm_text({"0": (1, 2)})
    server.delay = 1.0
    t0 = time.monotonic()
    assert s.poll() == {}
    assert time.monotonic() - t0 < 0.9
    assert s.errors["timeout"] == 1


@pytest.mark.parametrize("status, body, kind", [
    (200, "<html>not metrics</html>", "parse"),
    (200, "\x00\x01\xff garbage", "parse"),
    (404, "not found", "http"),
    (501, "This server does not support metrics endpoint.", "http"),
    (200, "# TYPE up gauge\nup 1\n", "missing"),
])
def test_bad_answers_are_counted_by_kind_and_never_raise(server, status, body, kind):
    s = TokenScraper("vllm", server.url)
    server.body = vllm_text({"0": (10, 20)})
    s.poll()
    server.status, server.body = status, body
    assert s.poll() == {(LLAMA, "prompt"): 10, (LLAMA, "generation"): 20}
    assert s.errors == {kind: 1}
    assert not s.up
    server.status, server.body = 200, vllm_text({"0": (12, 25)})
    assert s.deltas() == {}                              # baseline taken now
    server.body = vllm_text({"0": (13, 27)})
    assert s.deltas() == {(LLAMA, "prompt"): 1, (LLAMA, "generation"): 2}


def test_missing_counters_name_the_flag_to_enable(server):
    s = TokenScraper("llamacpp", server.url)
    server.body = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\n"
    s.poll()
    assert s.errors["missing"] == 1 and "--metrics" in s.last_error


# -- joining tokens with energy --------------------------------------------------------------
def make_meter(energy: dict[str, Callable[[float], float]]) -> tuple[Meter, VirtualClock]:
    clock = VirtualClock(start=0.0)
    return Meter([CounterSensor(energy)], clock=clock), clock


def run(meter: Meter, clock: VirtualClock, seconds: float, step: float, between: Callable[[float], None]) -> None:
    for _ in range(int(round(seconds / step))):
        clock.advance(step)
        between(clock.now())
        meter.poll()


def test_joule_per_token_over_the_window_by_hand():
    # gpu0 300 W, gpu1 100 W, a CPU at 50 W that J/token ignores; 100 generation tokens/s.
    meter, clock = make_meter({"gpu0": lambda t: 300 * t, "gpu1": lambda t: 100 * t, "cpu": lambda t: 50 * t})
    src = FakeSource({("m", "generation"): 10_000, ("m", "prompt"): 50_000})
    joiner = TokenJoiner(meter, src, window_s=60.0, idle_w_per_gpu=60.0)
    meter.sampler.add_task("tokens", 10.0, joiner.tick)
    meter.poll()
    assert joiner.snapshot() == [TokenStat("m", 50_000, 10_000, None, None)]

    def serve(t: float) -> None:
        src.now[("m", "generation")] += 1000
        src.now[("m", "prompt")] += 3000

    run(meter, clock, 120.0, 10.0, serve)
    [stat] = joiner.snapshot()
    assert (stat.prompt_tokens_total, stat.generation_tokens_total) == (50_000 + 36_000, 10_000 + 12_000)
    # Over the last 60 s: 400 W * 60 s = 24 kJ for 6000 tokens; idle 2 x 60 W * 60 s = 7.2 kJ.
    assert stat.energy_per_token_j == pytest.approx(24_000 / 6000)
    assert stat.energy_above_idle_per_token_j == pytest.approx((24_000 - 7_200) / 6000)
    # The meter saw only the new tokens, not the 60k the server had before we started.
    assert meter.tokens == {"generation": 12_000, "prompt": 36_000}


def test_idle_defaults_to_the_lowest_interval_power_in_the_window():
    # 100 W idle until t=30, then 500 W; tokens only while busy.
    energy = lambda t: 100 * t if t <= 30 else 3000 + 500 * (t - 30)
    meter, clock = make_meter({"gpu0": energy})
    src = FakeSource({("m", "generation"): 0})
    joiner = TokenJoiner(meter, src, window_s=60.0)
    meter.sampler.add_task("tokens", 10.0, joiner.tick)
    meter.poll()
    run(meter, clock, 60.0, 10.0, lambda t: src.now.__setitem__(("m", "generation"),
                                                                 src.now[("m", "generation")] + (1000 if t > 30 else 0)))
    [stat] = joiner.snapshot()
    total = energy(60) - energy(0)                       # 18 kJ for 3000 tokens
    assert stat.energy_per_token_j == pytest.approx(total / 3000)
    assert stat.energy_above_idle_per_token_j == pytest.approx((total - 100 * 60) / 3000)


def test_window_forgets_old_points_and_idle_windows_have_no_ratio():
    meter, clock = make_meter({"gpu0": lambda t: 200 * t})
    src = FakeSource({("m", "generation"): 0})
    joiner = TokenJoiner(meter, src, window_s=20.0)
    meter.sampler.add_task("tokens", 5.0, joiner.tick)
    meter.poll()
    run(meter, clock, 20.0, 5.0, lambda t: src.now.__setitem__(("m", "generation"), int(t) * 10))
    assert joiner.snapshot()[0].energy_per_token_j == pytest.approx(200 * 20 / 200)
    run(meter, clock, 40.0, 5.0, lambda t: None)        # traffic stops
    [stat] = joiner.snapshot()
    assert stat.energy_per_token_j is None and stat.generation_tokens_total == 200
    assert len(joiner._points) <= 20 / 5 + 1


def test_models_on_their_own_gpus():
    meter, clock = make_meter({"gpu0": lambda t: 300 * t, "gpu1": lambda t: 100 * t})
    src = FakeSource({("big", "generation"): 0, ("small", "generation"): 0})
    joiner = TokenJoiner(meter, src, window_s=30.0, gpus={"big": ["gpu0"], "small": ["gpu1"]})
    meter.sampler.add_task("tokens", 10.0, joiner.tick)
    meter.poll()

    def serve(t: float) -> None:
        src.now[("big", "generation")] += 1000
        src.now[("small", "generation")] += 4000

    run(meter, clock, 30.0, 10.0, serve)
    stats = {s.model: s for s in joiner.snapshot()}
    assert stats["big"].energy_per_token_j == pytest.approx(300 * 30 / 3000)
    assert stats["small"].energy_per_token_j == pytest.approx(100 * 30 / 12000)


def test_no_gpus_means_no_ratio_but_tokens_still_count():
    meter, clock = make_meter({"cpu": lambda t: 50 * t})
    src = FakeSource({("m", "generation"): 0})
    joiner = TokenJoiner(meter, src)
    meter.sampler.add_task("tokens", 1.0, joiner.tick)
    meter.poll()
    run(meter, clock, 5.0, 1.0, lambda t: src.now.__setitem__(("m", "generation"), int(t) * 7))
    assert joiner.snapshot() == [TokenStat("m", 0, 35, None, None)]
    assert meter.tokens == {"generation": 35}


def test_scraper_joiner_and_window_end_to_end_over_http(server):
    meter, clock = make_meter({"gpu0": lambda t: 250 * t})
    scraper = TokenScraper("vllm", server.url)
    joiner = TokenJoiner(meter, scraper, window_s=60.0)
    meter.sampler.add_task("tokens", 5.0, joiner.tick)
    server.body = vllm_text({"0": (9000, 9000)})
    meter.poll()
    w = meter.window("bench")
    gen = 9000
    for restart_at in (3, None):
        for i in range(6):
            clock.advance(5.0)
            gen += 500
            if i == restart_at:
                gen = 500                                   # the server restarted mid-run
            server.body = vllm_text({"0": (gen, gen)})
            meter.poll()
    w.end()
    r = w.result()
    assert r.tokens["generation"] == 12 * 500
    assert r.joules_per_token() == pytest.approx(250 * 60 / 6000)
    [stat] = joiner.snapshot()
    assert stat.energy_per_token_j == pytest.approx(250 * 60 / 6000)
    assert stat.generation_tokens_total == 9000 + 6000
    assert scraper.resets == 1 and not scraper.errors


def test_duplicate_tick_at_the_same_instant_is_ignored():
    meter, clock = make_meter({"gpu0": lambda t: 100 * t})
    joiner = TokenJoiner(meter, FakeSource({("m", "generation"): 1}))
    joiner.tick(0.0)                                     # before the GPU's first reading: no edge
    assert len(joiner._points) == 0
    meter.poll()
    joiner.tick(0.0)
    joiner.tick(0.0)
    assert len(joiner._points) == 1
    with pytest.raises(UsageError):
        TokenJoiner(meter, FakeSource(), window_s=0)


# -- Ollama -----------------------------------------------------------------------------------
def test_ollama_native_and_openai_responses_count_into_the_meter():
    meter, _ = make_meter({"gpu0": lambda t: 100 * t})
    counter = OllamaResponseCounter(meter)
    w = meter.window("chat")
    assert counter.observe({"model": "llama3.2", "done": True, "prompt_eval_count": 26, "eval_count": 298}) == (26, 298)
    assert counter.observe({"model": "llama3.2", "done": False, "response": "Hi"}) == (0, 0)   # a stream chunk
    assert counter.observe({"model": "qwen", "usage": {"prompt_tokens": 10, "completion_tokens": 5}}) == (10, 5)
    w.end()
    assert meter.tokens == {"prompt": 36, "generation": 303}
    assert w.result().tokens == {"prompt": 36, "generation": 303}
    assert counter.totals == {("llama3.2", "prompt"): 26, ("llama3.2", "generation"): 298,
                              ("qwen", "prompt"): 10, ("qwen", "generation"): 5}


def test_ollama_counter_as_a_joiner_source():
    meter, clock = make_meter({"gpu0": lambda t: 120 * t})
    counter = OllamaResponseCounter(model="llama3.2")     # the joiner adds to the meter
    joiner = TokenJoiner(meter, counter, window_s=10.0)
    meter.sampler.add_task("tokens", 1.0, joiner.tick)
    meter.poll()
    run(meter, clock, 10.0, 1.0, lambda t: counter.observe({"prompt_eval_count": 3, "eval_count": 12}))
    [stat] = joiner.snapshot()
    assert stat.model == "llama3.2" and stat.generation_tokens_total == 120
    assert stat.energy_per_token_j == pytest.approx(120 * 10 / 120)
    assert meter.tokens == {"prompt": 30, "generation": 120}
    assert math.isclose(sum(counter.totals.values()), 150)


def test_a_server_that_hangs_up_mid_answer_is_a_connection_error():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nvllm:gen")   # then hangs up
            conn.close()

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        s = TokenScraper("vllm", f"127.0.0.1:{port}", timeout_s=2.0)
        assert s.poll() == {}
        t.join(2)
    assert s.errors == {"connection": 1}


# -- issue 13: live J/token, baseline, staleness, gone models, auto, deadline ---------------------
class DripServer:
    """A /metrics endpoint that sends one byte every ``pace_s``, forever (issue 8)."""

    def __init__(self, pace_s: float = 0.05) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/metrics"
        self.pace_s, self.stop = pace_s, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n"
        try:
            for b in head + b"#" * 100000:
                if self.stop.is_set():
                    break
                conn.send(bytes([b]))
                time.sleep(self.pace_s)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_dripping_server_is_cut_at_the_deadline_whatever_its_pace():
    drip = DripServer(pace_s=0.05)                       # each byte well inside any socket timeout
    try:
        s = TokenScraper("vllm", drip.url, timeout_s=0.5)
        t0 = time.monotonic()
        s.poll()
        assert time.monotonic() - t0 < 1.0
        assert s.errors == {"timeout": 1} and "0.5 s" in s.last_error
    finally:
        drip.close()


def test_501_gets_a_hint_to_start_the_server_with_metrics(server):
    server.status, server.body = 501, "This server does not support metrics endpoint."
    s = TokenScraper("llamacpp", server.url)
    s.poll()
    assert "HTTP 501" in s.last_error and "--metrics" in s.last_error


def test_the_recovered_notice_is_logged_at_the_failure_notices_level(server, caplog):
    s = TokenScraper("vllm", server.url)
    server.status = 500
    with caplog.at_level("DEBUG", logger="wattmeter.tokens"):
        s.poll()
        s.poll()                                         # still down: not repeated as a warning
        server.status, server.body = 200, vllm_text({"0": (1, 2)})
        s.poll()
    levels = [(r.levelname, "works again" in r.getMessage()) for r in caplog.records]
    assert levels == [("WARNING", False), ("DEBUG", False), ("WARNING", True)]


@pytest.mark.parametrize("fixture, family", [("vllm", "vllm"), ("sglang", "sglang"), ("tgi", "tgi"),
                                             ("llamacpp", "llamacpp"), ("lmdeploy", "lmdeploy"),
                                             ("triton", "triton"), ("ray", "ray")])
def test_server_auto_detects_the_family_from_the_metric_names(server, fixture, family):
    server.body = (FIXTURES / f"{fixture}.txt").read_text()
    s = TokenScraper("auto", server.url)
    s.poll()
    assert s.up and s.server is not None and s.server.name == family
    assert s.totals == pytest.approx(EXPECTED[fixture][1])


def test_server_auto_without_token_counters_says_what_it_looked_for(server):
    server.body = "# TYPE up gauge\nup 1\n"
    s = TokenScraper("auto", server.url)
    s.poll()
    assert s.errors == {"missing": 1} and "vllm:generation_tokens_total" in s.last_error


@pytest.mark.parametrize("kind, hint", [("vlm", "did you mean 'vllm'"), ("llama.cpp", "did you mean 'llamacpp'"),
                                        ("sglan", "did you mean 'sglang'")])
def test_unknown_family_names_the_closest(kind, hint):
    with pytest.raises(UsageError, match=hint):
        TokenScraper(kind, "127.0.0.1:8000")


@pytest.mark.parametrize("url", ["http://127.0.0.1:70000/metrics", "http://127.0.0.1:0/metrics",
                                 "http://127.0.0.1:8000/met rics", " 127.0.0.1:8000", "http:///metrics"])
def test_bad_server_urls_are_usage_errors(url):
    with pytest.raises(UsageError, match="server URL"):
        normalise_url(url)


def test_live_jpt_is_exact_with_slow_counter_reads_and_irregular_scrapes():
    # A flat 300 W GPU read every 2 s; 128 tokens/s scraped every 1.0-7.9 s at off-grid instants.
    # J/token comes from the ledger's history at each scrape's instant: no lag, no steps.
    clock = VirtualClock(start=0.0)
    sensor = CounterSensor({"gpu0": lambda t: 300.0 * t}, period_s=2.0)
    meter = Meter([sensor], clock=clock)
    src = FakeSource({("m", "generation"): 0})
    joiner = TokenJoiner(meter, src, window_s=30.0)
    meter.sampler.read_sensor(sensor, 0.0)
    gaps = [1.0, 7.9, 3.3, 5.1, 2.2, 6.4, 4.7, 1.9, 7.0, 3.8, 5.5, 2.6]
    t, next_read = 0.0, 2.0
    ratios = []
    for gap in gaps * 2:
        t += gap
        while next_read <= t:
            meter.sampler.read_sensor(sensor, next_read)
            next_read += 2.0
        clock.advance(t - clock.now())
        src.now[("m", "generation")] = int(128 * t)
        joiner.tick(t)
        [stat] = joiner.snapshot()
        if stat.energy_per_token_j is not None:
            ratios.append(stat.energy_per_token_j)
    assert len(ratios) > 15
    assert all(r == pytest.approx(300 / 128, rel=0.01) for r in ratios)


def test_tokens_served_before_the_first_good_scrape_never_enter_a_window(server):
    meter, clock = make_meter({"gpu0": lambda t: 300 * t})
    port = free_port()
    scraper = TokenScraper("vllm", f"127.0.0.1:{port}", timeout_s=0.5)
    joiner = TokenJoiner(meter, scraper, window_s=60.0)
    meter.sampler.add_task("tokens", 5.0, joiner.tick)
    meter.poll()                                        # refused: no baseline yet
    run(meter, clock, 10.0, 5.0, lambda t: None)
    srv = MetricsServer(port)
    try:
        gen = 7200                                      # served before we ever reached it
        srv.body = vllm_text({"0": (0, gen)})
        for _ in range(6):
            clock.advance(5.0)
            meter.poll()
            gen += 640                                  # 128 tokens/s from now on
            srv.body = vllm_text({"0": (0, gen)})
        [stat] = joiner.snapshot()
        assert stat.energy_per_token_j == pytest.approx(300 / 128, rel=1e-6)
        assert meter.tokens == {"generation": 5 * 640}
    finally:
        srv.close()


def test_jpt_disappears_when_the_source_is_down_past_its_window(server):
    meter, clock = make_meter({"gpu0": lambda t: 300 * t})
    scraper = TokenScraper("vllm", server.url)
    joiner = TokenJoiner(meter, scraper, window_s=20.0)
    meter.sampler.add_task("tokens", 5.0, joiner.tick)
    gen = 0
    server.body = vllm_text({"0": (0, gen)})
    meter.poll()
    for _ in range(4):
        gen += 500
        server.body = vllm_text({"0": (0, gen)})
        clock.advance(5.0)
        meter.poll()
    assert joiner.snapshot()[0].energy_per_token_j == pytest.approx(300 * 5 / 500)
    assert joiner.snapshot()[0].age_s == pytest.approx(0.0)
    server.status = 503
    run(meter, clock, 15.0, 5.0, lambda t: None)
    [stat] = joiner.snapshot()
    assert stat.energy_per_token_j is not None and stat.age_s == pytest.approx(15.0)   # down 15 s of 20: aged
    run(meter, clock, 10.0, 5.0, lambda t: None)
    [stat] = joiner.snapshot()
    assert stat.energy_per_token_j is None and stat.energy_above_idle_per_token_j is None
    assert stat.generation_tokens_total == 2000                          # the counter itself stays


def test_a_model_the_server_stopped_serving_is_dropped_after_the_set_time(server):
    meter, clock = make_meter({"gpu0": lambda t: 300 * t})
    scraper = TokenScraper("vllm", server.url)
    joiner = TokenJoiner(meter, scraper, window_s=20.0, forget_after_s=30.0)
    meter.sampler.add_task("tokens", 5.0, joiner.tick)
    server.body = vllm_text({"0": (1, 2)}, model="old") + vllm_text({"0": (1, 2)}, model="new")
    meter.poll()
    server.body = vllm_text({"0": (1, 2)}, model="new")                # the server was restarted with "new"
    run(meter, clock, 25.0, 5.0, lambda t: None)
    assert {s.model for s in joiner.snapshot()} == {"old", "new"}
    run(meter, clock, 10.0, 5.0, lambda t: None)
    assert {s.model for s in joiner.snapshot()} == {"new"}


def test_above_idle_is_near_zero_on_a_flat_gpu():
    meter, clock = make_meter({"gpu0": lambda t: 300 * t})
    src = FakeSource({("m", "generation"): 0})
    joiner = TokenJoiner(meter, src, window_s=30.0)
    meter.sampler.add_task("tokens", 5.0, joiner.tick)
    meter.poll()
    run(meter, clock, 60.0, 5.0, lambda t: src.now.__setitem__(("m", "generation"), int(128 * t)))
    [stat] = joiner.snapshot()
    assert stat.energy_per_token_j == pytest.approx(300 / 128, rel=1e-3)
    assert stat.energy_above_idle_per_token_j == pytest.approx(0.0, abs=1e-6)
