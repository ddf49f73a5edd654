"""Proxy overhead and /metrics parsing cost (issue 13). Writes results/proxy.json.

    python bench/bench_proxy.py            # ~1 min on 2 cores
    python bench/bench_proxy.py --quick    # fewer requests, writes to /tmp

1. Added latency per request of `serve --proxy-to`: a fake OpenAI server (tests/fake_openai.py)
   answers a non-streamed completion of 1 kB. The proxy (with its RequestAccountant on a metered
   fake GPU, as `serve` runs it) and the upstream each run in their own process; this process is
   the client, on kept-alive connections. Direct and proxied requests alternate, so drift hits
   both alike; the added latency is each proxied request's time minus the direct one's beside it.
2. Parsing a 2,000-series vLLM /metrics page (token counters among histograms of 2 models x 4
   engines): median time of ``parse_tokens``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, machine_info, median, percentile  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UPSTREAM = """
import sys, time
sys.path.insert(0, {tests!r})
from fake_openai import FakeOpenAI
srv = FakeOpenAI(pad_bytes={pad})
print(srv.url, flush=True)
sys.stdin.read()
"""

PROXY = """
import sys
from wattmeter.meter import Meter
from wattmeter.model import Batch, Component, Device, Reading, Source
from wattmeter.proxy import OpenAIProxy
from wattmeter.requests import RequestAccountant

class Flat:
    name, period_s = "fake", 0.1
    def devices(self): return [Device("gpu0", Component.GPU, Source.COUNTER)]
    def read(self, now): return Batch([Reading("gpu0", now, energy_j=300.0 * now)])
    def close(self): pass

meter = Meter([Flat()])
acct = RequestAccountant(meter, settle_on_end=False)        # as `serve` runs it: settled by its token task
meter.sampler.add_task("tokens", 5.0, lambda now: acct.settle())
meter.start()
proxy = OpenAIProxy({upstream!r}, acct).start()
print(proxy.url, flush=True)
sys.stdin.read()
"""


def _child(code: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _conn(url: str) -> http.client.HTTPConnection:
    host, port = url.rsplit("/", 1)[-1].split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def _once(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, int]:
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    return time.perf_counter() - t0, len(data)


def bench_proxy(n: int) -> dict:
    pad = 1024 - 180                          # the JSON envelope is ~180 bytes: ~1 kB answers
    up_proc, up_url = _child(UPSTREAM.format(tests=os.path.join(ROOT, "tests"), pad=pad))
    px_proc, px_url = _child(PROXY.format(upstream=up_url))
    try:
        direct, proxied = _conn(up_url), _conn(px_url)
        body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 16}).encode()
        for _ in range(200):                  # warm up both paths
            _once(direct, body), _once(proxied, body)
        d_times, p_times, added = [], [], []
        size = 0
        for _ in range(n):
            d, size = _once(direct, body)
            p, _ = _once(proxied, body)
            d_times.append(d)
            p_times.append(p)
            added.append(p - d)
        ms = 1e3
        return {"requests": n, "response_bytes": size,
                "direct_ms": {"median": median(d_times) * ms, "p99": percentile(d_times, 99) * ms},
                "proxied_ms": {"median": median(p_times) * ms, "p99": percentile(p_times, 99) * ms},
                "added_ms": {"median": median(added) * ms, "p99": percentile(added, 99) * ms},
                "target_ms": 1.0}
    finally:
        for proc in (px_proc, up_proc):
            proc.stdin.close()                # type: ignore[union-attr]
            proc.wait(10)


def vllm_page(series: int = 2000) -> str:
    """A vLLM-shaped page: per (model, engine) token counters and many histogram buckets."""
    lines: list[str] = []
    models, engines = ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct"), range(4)
    for name in ("prompt_tokens", "generation_tokens"):
        lines.append(f"# TYPE vllm:{name}_total counter")
        lines += [f'vllm:{name}_total{{engine="{e}",model_name="{m}"}} {1000 * (e + 1)}.0'
                  for m in models for e in engines]
    hist = 0
    while len(lines) < series:
        h = f"vllm:histogram_{hist}_seconds"
        lines.append(f"# HELP {h} Latency {hist}.\n# TYPE {h} histogram")
        for m in models:
            for e in engines:
                for le in ("0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1.0", "5.0", "+Inf"):
                    lines.append(f'{h}_bucket{{engine="{e}",le="{le}",model_name="{m}"}} 17.0')
                lines.append(f'{h}_count{{engine="{e}",model_name="{m}"}} 17.0')
                lines.append(f'{h}_sum{{engine="{e}",model_name="{m}"}} 3.25')
        hist += 1
    return "\n".join(lines) + "\n"


def bench_parse(runs: int) -> dict:
    from wattmeter.tokens import parse_tokens

    page = vllm_page()
    n_series = sum(1 for line in page.splitlines() if line and not line.startswith("#"))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        got = parse_tokens("vllm", page)
        times.append(time.perf_counter() - t0)
    assert got[("meta-llama/Llama-3.1-8B-Instruct", "generation")] == 10000
    return {"series": n_series, "page_bytes": len(page), "runs": runs,
            "median_ms": median(times) * 1e3, "p99_ms": percentile(times, 99) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = {"machine": machine_info(),
           "proxy": bench_proxy(300 if args.quick else 3000),
           "parse_vllm_2000": bench_parse(20 if args.quick else 200)}
    path = "/tmp/proxy.json" if args.quick else os.path.join(RESULTS_DIR, "proxy.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    p, q = out["proxy"], out["parse_vllm_2000"]
    print(f"proxy added latency: median {p['added_ms']['median']:.3f} ms, p99 {p['added_ms']['p99']:.3f} ms "
          f"({p['requests']} requests, {p['response_bytes']} B answers; direct median {p['direct_ms']['median']:.3f} ms)")
    print(f"parse 2,000-series vLLM page: median {q['median_ms']:.2f} ms ({q['series']} series, {q['page_bytes']} B)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
