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


# -- the lean HTTP layer (agent/proxy_http.py) and per-request savings --------------------------
def test_upstream_connections_are_reused_across_client_connections(rig):
    upstream, proxy, acct, results, meter = rig
    for i in range(4):                      # post() opens and closes a client connection each time
        status, _, body = post(proxy.url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
        time.sleep(0.05)                    # the handler sees the client go and pools its upstream
    assert proxy.connections_opened == 1
    assert proxy.counter.totals[("tiny", "generation")] == 4 * 3


@pytest.mark.parametrize("data, expected", [
    (b'{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}', (3, 5)),
    # usage not last, and a quoted "usage" inside the text: parsed whole
    (b'{"text":"say \\"usage\\": {}","usage": {"prompt_tokens":3,"completion_tokens":5}, "z":1}', (3, 5)),
    # a nested usage last in the body is not the top-level one
    (b'{"usage":{"prompt_tokens":1,"completion_tokens":2},"choices":[{"usage":{"prompt_tokens":9}}]}', (1, 2)),
    (b'{"id":"x"}', None),
    (b'not json', None),
])
def test_usage_from_body_reads_the_top_level_usage(data, expected):
    from wattmeter.proxy_usage import usage_from_body

    assert usage_from_body(data) == expected


def _raw_server(answers: list[bytes]) -> tuple[str, int, list[bytes], threading.Thread]:
    """One connection; each request (head + Content-Length body) gets the next raw answer."""
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        fp = conn.makefile("rb")
        for answer in answers:
            head = b""
            while (line := fp.readline()) not in (b"\r\n", b""):
                head += line
            length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")), b"0"))
            seen.append(head + b"\r\n" + fp.read(length))
            conn.sendall(answer)
        conn.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return "127.0.0.1", srv.getsockname()[1], seen, t


def test_upstream_client_reads_length_chunked_interim_and_close_delimited_answers():
    from wattmeter.proxy_http import Upstream

    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
        # an SSE line split across chunks, then a trailer
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n8\r\n{\"b\":2}\n\r\n1\r\n\n\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
    ]
    host, port, seen, t = _raw_server(answers)
    opened = []
    up = Upstream(host, port, False, 5.0, on_connect=lambda: opened.append(1))
    r = up.request("POST", "/v1/completions", [("Content-Type", "application/json")], b'{"model":"m"}')
    assert (r.status, r.getheader("content-type"), r.read(), r.will_close) == (200, "application/json", b'{"a":1}', False)
    r = up.request("GET", "/s", [], b"")
    assert [r.readline(), r.readline(), r.readline()] == [b'data: {"b":2}\n', b"\n", b""]
    r = up.request("GET", "/c", [], b"")
    assert (r.status, r.reason, r.read()) == (201, "Created", b"ok")
    r = up.request("GET", "/e", [], b"")
    assert r.will_close and r.read() == b"until the end"
    t.join(5)
    up.close()
    assert opened == [1]                                     # one connection for all four
    assert seen[0].startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert seen[0].endswith(b"Content-Length: 13\r\n\r\n{\"model\":\"m\"}")


def test_a_client_expecting_100_continue_gets_it_and_the_upstream_does_not():
    answer = b'{"usage":{"prompt_tokens":1,"completion_tokens":2}}'
    host, port, seen, t = _raw_server([b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
                                       b"\r\n\r\n%s" % (len(answer), answer)])
    proxy = OpenAIProxy(f"http://{host}:{port}", None).start()
    try:
        status, _, body = post(proxy.url, "/v1/completions", {"model": "tiny", "prompt": "hi"},
                               headers={"Expect": "100-continue", "X-Custom": "kept"})
    finally:
        proxy.stop()
    t.join(5)
    assert status == 200 and body == answer
    assert b"x-custom: kept" in seen[0].lower() and b"expect" not in seen[0].lower()
    assert proxy.counter.totals[("tiny", "generation")] == 2


def test_a_malformed_request_line_is_a_400_with_a_status_line(rig):
    import socket

    _, proxy, *_ = rig
    parts = urllib.parse.urlsplit(proxy.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 400 ")
