"""`serve --proxy-to`: OpenAI pass-through that books each response's usage into its own request."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from typing import Any, Callable

import pytest
from fake_openai import FakeOpenAI

from wattmeter.errors import UsageError
from wattmeter.meter import Meter
from wattmeter.proxy import OpenAIProxy, UsageCounter
from wattmeter.requests import RequestAccountant

from scripted import CounterSensor


def FlatGPU(energy: dict[str, Callable[[float], float]]) -> CounterSensor:
    """GPU energy counters set by hand, read every 20 ms."""
    return CounterSensor(energy, period_s=0.02)


@pytest.fixture
def rig():
    upstream = FakeOpenAI(delay_s=0.05)
    meter = Meter([FlatGPU({"gpu0": lambda t: 300.0 * t})]).start()
    results = []
    acct = RequestAccountant(meter, on_result=results.append)
    proxy = OpenAIProxy(upstream.url, acct).start()
    yield upstream, proxy, acct, results, meter
    proxy.stop()
    meter.close()
    upstream.close()


def post(url: str, path: str, doc: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(doc), headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def wait_final(acct: RequestAccountant, results: list, ids: set[str]) -> dict[str, Any]:
    """Results are final once the GPU has been read past each request's end (a few reads)."""
    for _ in range(200):
        acct.settle()
        got = {r.request_id: r for r in results if r.request_id in ids}
        if len(got) == len(ids):
            return got
        threading.Event().wait(0.02)
    raise AssertionError(f"not final: {ids - {r.request_id for r in results}}")


def sse_events(body: bytes) -> list[Any]:
    return [json.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]"
            for line in body.split(b"\n") if line.startswith(b"data: ")]


def test_a_plain_completion_passes_through_and_books_its_usage(rig):
    upstream, proxy, acct, results, _ = rig
    status, ctype, body = post(proxy.url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 12},
                               {"X-Request-Id": "abc"})
    doc = json.loads(body)
    assert status == 200 and ctype == "application/json" and doc["usage"]["completion_tokens"] == 12
    assert proxy.counter.totals == {("tiny", "prompt"): 7, ("tiny", "generation"): 12}
    r = wait_final(acct, results, {"abc"})["abc"]
    assert r.tokens == {"prompt": 7, "generation": 12} and r.energy_j > 0 and r.model == "tiny"


def test_a_stream_gets_usage_asked_for_and_the_client_does_not_see_the_extra_chunk(rig):
    upstream, proxy, acct, _, _ = rig
    status, ctype, body = post(proxy.url, "/v1/chat/completions",
                               {"model": "tiny", "messages": [], "max_tokens": 5, "stream": True})
    events = sse_events(body)
    assert status == 200 and ctype == "text/event-stream"
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["t0", "t1", "t2", "t3", "t4"] and events[-1] == "[DONE]"
    assert upstream.bodies[-1]["stream_options"] == {"include_usage": True}
    assert proxy.counter.totals[("tiny", "generation")] == 5


def test_a_client_that_asked_for_usage_gets_the_usage_chunk(rig):
    upstream, proxy, _, _, _ = rig
    _, _, body = post(proxy.url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    events = sse_events(body)
    assert events[-2]["usage"]["completion_tokens"] == 3 and events[-2]["choices"] == []


def test_concurrent_clients_book_exact_tokens_per_request_under_their_own_model_name(rig):
    upstream, proxy, acct, results, meter = rig
    sizes = {"c0": 10, "c1": 20, "c2": 30, "c3": 40}

    def client(name: str) -> None:
        # c3 asks for the second served-model-name alias of the same upstream model.
        post(proxy.url, "/v1/completions", {"model": "alias" if name == "c3" else "tiny", "prompt": "p",
                                            "max_tokens": sizes[name], "stream": name in ("c1", "c3")},
             {"X-Request-Id": name})

    threads = [threading.Thread(target=client, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = wait_final(acct, results, set(sizes))
    assert {k: r.tokens["generation"] for k, r in got.items()} == sizes           # each its own, none doubled
    assert proxy.counter.totals[("alias", "generation")] == 40
    assert proxy.counter.totals[("tiny", "generation")] == 60
    start, end = min(r.start_t for r in got.values()), max(r.end_t for r in got.values())
    device = meter.ledger.values_at(end)["gpu0"] - meter.ledger.values_at(start)["gpu0"]
    assert 0 < sum(r.energy_j for r in got.values()) <= device + 1e-6


def test_other_paths_pass_through_and_a_dead_upstream_is_a_502():
    upstream = FakeOpenAI()
    proxy = OpenAIProxy(upstream.url, None).start()
    try:
        parts = urllib.parse.urlsplit(proxy.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["data"][0]["id"] == "tiny"
        upstream.close()
        status, _, body = post(proxy.url, "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert status == 502 and "unreachable" in json.loads(body)["error"]["message"]
    finally:
        proxy.stop()


@pytest.mark.parametrize("bad", ["http://127.0.0.1:99999", "http://my host:8000", "ftp://127.0.0.1:8000", ""])
def test_bad_upstream_urls_are_usage_errors(bad):
    with pytest.raises(UsageError, match="--proxy-to"):
        OpenAIProxy(bad, None)


def test_usage_counter_is_a_token_source():
    c = UsageCounter()
    c.observe("a", 3, 4)
    assert c.deltas() == {("a", "prompt"): 3, ("a", "generation"): 4} and c.up
    assert c.deltas() == {}


def test_a_chunked_request_body_is_forwarded_whole(rig):
    upstream, proxy, _, _, _ = rig
    parts = urllib.parse.urlsplit(proxy.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    conn.request("POST", "/v1/completions", body=iter([b'{"model": "tiny", ', b'"max_tokens": 4}']),
                 encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 4
    assert upstream.bodies[-1] == {"model": "tiny", "max_tokens": 4}
    assert proxy.counter.totals[("tiny", "generation")] == 4


class RecordingAccountant:
    """Stands in for RequestAccountant: records each booking with its time."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str, float]] = []

    def request(self, request_id: str, model: str = "default") -> "RecordingAccountant.Req":
        return RecordingAccountant.Req(self, request_id)

    class Req:
        def __init__(self, acct: "RecordingAccountant", request_id: str) -> None:
            self.acct, self.id = acct, request_id

        def add_tokens(self, n: int, kind: str = "generation") -> None:
            self.acct.calls.append((self.id, n, kind, time.monotonic()))

        def __enter__(self) -> "RecordingAccountant.Req":
            self.acct.calls.append((self.id, 0, "begin", time.monotonic()))
            return self

        def __exit__(self, *exc: object) -> None:
            self.acct.calls.append((self.id, 0, "end", time.monotonic()))


def test_a_stream_books_its_progress_while_it_runs_and_the_usage_corrects_it():
    upstream = FakeOpenAI(delay_s=1.0)                 # 20 chunks over 1 s
    acct = RecordingAccountant()
    proxy = OpenAIProxy(upstream.url, acct).start()    # type: ignore[arg-type]
    try:
        post(proxy.url, "/v1/completions", {"model": "tiny", "prompt": "p", "max_tokens": 20, "stream": True},
             {"X-Request-Id": "s"})
    finally:
        proxy.stop()
        upstream.close()
    gen = [n for _, n, kind, _ in acct.calls if kind == "generation"]
    assert sum(gen) == 20 and len([n for n in gen if n]) >= 3       # progress during the stream, then the rest
    assert [k for _, _, k, _ in acct.calls if k == "prompt"] == ["prompt"]
    assert acct.calls[0][2] == "begin" and acct.calls[-1][2] == "end"


def test_four_concurrent_streams_get_their_share_of_a_flat_gpu():
    # 20 tokens/s each, for 1, 2, 3 and 4 s, all started together on a flat 300 W GPU: in each
    # second the GPU is shared equally by the streams still running -> 75, 175, 325 and 625 J.
    upstream = FakeOpenAI()
    meter = Meter([FlatGPU({"gpu0": lambda t: 300.0 * t})]).start()
    results: list = []
    acct = RequestAccountant(meter, on_result=results.append)
    proxy = OpenAIProxy(upstream.url, acct).start()
    try:
        def client(i: int) -> None:
            post(proxy.url, "/v1/completions", {"model": "tiny", "prompt": "p", "max_tokens": 20 * i,
                                                "x_delay_s": float(i), "stream": True}, {"X-Request-Id": f"c{i}"})

        threads = [threading.Thread(target=client, args=(i,)) for i in (1, 2, 3, 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = wait_final(acct, results, {"c1", "c2", "c3", "c4"})
    finally:
        proxy.stop()
        meter.close()
        upstream.close()
    for i, expected_j in zip((1, 2, 3, 4), (75.0, 175.0, 325.0, 625.0)):
        r = got[f"c{i}"]
        assert r.tokens["generation"] == 20 * i
        assert r.energy_j == pytest.approx(expected_j, rel=0.05), f"c{i}"
        assert r.energy_per_token_j == pytest.approx(expected_j / (20 * i), rel=0.05)


def test_a_proxied_model_without_requests_for_its_forget_time_is_dropped():
    from wattmeter.clock import VirtualClock
    from wattmeter.tokens import TokenJoiner

    clock = VirtualClock(start=0.0)
    meter = Meter([FlatGPU({"gpu0": lambda t: 300.0 * t})], clock=clock)
    counter = UsageCounter()
    joiner = TokenJoiner(meter, counter, window_s=30.0, forget_after_s=60.0)
    meter.sampler.add_task("tokens", 5.0, joiner.tick)
    counter.observe("old", 5, 10)
    meter.poll()
    for _ in range(14):                                  # 70 s: only "new" gets requests
        clock.advance(5.0)
        counter.observe("new", 5, 10)
        meter.poll()
    assert [s.model for s in joiner.snapshot()] == ["new"]
    assert counter.totals[("old", "generation")] == 10   # its count is kept, only its series goes
