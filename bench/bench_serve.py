"""Benchmarks of `wattmeter serve`: render time, memory, CPU, concurrent scrapers.

    python bench/bench_serve.py            # full run (~3 min on 2 cores), writes bench/results/serve.json
    python bench/bench_serve.py --quick    # shorter runs, for trying changes

Targets (reported, not asserted):
- ``/metrics`` render with 8 GPUs x 64 processes x 200 live jobs: median <= 10 ms;
- serve RSS with 8 fake GPUs after 1 h of virtual time: <= 60 MB;
- serve CPU at 10 Hz with 8 fake GPUs: <= 1 % of one core;
- 50 concurrent scrapers x 200 requests: zero errors (p99 latency recorded).

Each measurement runs in its own process (``--case NAME``) so its memory and CPU are its own.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

HERE = os.path.abspath(__file__)
TARGETS = {"render_median_ms": 10.0, "rss_mb": 60.0, "cpu_pct_of_core": 1.0, "scrape_errors": 0}
H100 = "NVIDIA H100 80GB HBM3"


# -- children ---------------------------------------------------------------------------------------
def _rig(n_gpus: int, procs_per_gpu: int, pid_labels: bool):
    """The serve composition (meter, attribution, collector) on a virtual clock."""
    from wattmeter.attribution import AttributionConfig, Attributor
    from wattmeter.clock import VirtualClock
    from wattmeter.meter import Meter
    from wattmeter.sim.fake_nvml import FakeNVML, build_module
    from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
    from wattmeter.sim.scenario import Scenario

    if procs_per_gpu:
        gpus = [{"model": H100, "trace": {"kind": "square", "high_w": 650.0, "low_w": 120.0, "high_s": 2.0,
                                          "low_s": 1.0},
                 "process": [{"pid": 10000 + 100 * g + p, "sm_util": 1 + (p % 9)} for p in range(procs_per_gpu)]}
                for g in range(n_gpus)]
        scenario = Scenario.from_dict({"gpu": gpus})
    else:
        scenario = Scenario.default(n_gpus)
    clock = VirtualClock(start=1000.0)
    sensor = NvmlSensor(build_module(FakeNVML(scenario, clock)), GpuSelection(None))
    meter = Meter([sensor], clock=clock)
    att = Attributor(sensor.read_processes, config=AttributionConfig(pid_labels=pid_labels, max_series=10_000))
    return clock, meter, sensor, att


def case_render(quick: bool) -> dict:
    from prometheus_client.exposition import generate_latest

    from wattmeter.exporters.prometheus import ExportSources, JobEnergy, TextRenderer, build_registry

    clock, meter, _, att = _rig(8, 64, pid_labels=True)
    meter.poll()
    for i in range(50):
        clock.advance(0.1)
        meter.poll()
        if i % 10 == 9:
            att.tick(clock.now(), meter.snapshot())
    jobs = [JobEnergy(f"job-{j:03d}", c, 1000.0 + j) for j in range(200) for c in ("gpu", "cpu", "ram")]
    registry, _ = build_registry(ExportSources(meter, "node-a", attribution=att, jobs=lambda: jobs,
                                               pid_labels=True))
    renderer = TextRenderer(registry)          # what /metrics serves
    body = renderer.render()
    times, reference = [], []
    for _ in range(100 if quick else 400):
        t0 = time.perf_counter()
        renderer.render()
        t1 = time.perf_counter()
        generate_latest(registry)              # prometheus_client's encoder, for reference
        reference.append((time.perf_counter() - t1) * 1000.0)
        times.append((t1 - t0) * 1000.0)
    samples = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return {"gpus": 8, "processes_per_gpu": 64, "jobs": 200, "samples": samples, "bytes": len(body),
            "render_ms": C.summarize(times, 3), "p99_ms": round(C.percentile(times, 99), 3),
            "generate_latest_ms": C.summarize(reference, 3)}


def case_rss(quick: bool) -> dict:
    from prometheus_client.exposition import generate_latest

    from wattmeter.exporters.prometheus import ExportSources, build_registry

    hours = 0.25 if quick else 1.0
    clock, meter, sensor, att = _rig(8, 0, pid_labels=False)
    registry, _ = build_registry(ExportSources(meter, "node-a", attribution=att))
    rss_start = C.proc_status()["VmRSS"]
    meter.poll()
    steps = int(hours * 3600 * 10)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):             # the serve cadence: GPUs 10 Hz, processes 1 Hz, scrape 15 s
        clock.advance(0.1)
        meter.sampler.read_sensor(sensor, clock.now())
        if i % 10 == 0:
            att.tick(clock.now(), meter.snapshot())
        if i % 150 == 0:
            generate_latest(registry)
    st = C.proc_status()
    return {"virtual_hours": hours, "gpus": 8, "rss_mb_start": round(rss_start / 1024, 1),
            "rss_mb": round(st["VmRSS"] / 1024, 1), "hwm_mb": round(st["VmHWM"] / 1024, 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


# -- the real daemon ------------------------------------------------------------------------------------
def _start_serve() -> tuple[subprocess.Popen, int]:
    argv = [sys.executable, "-m", "wattmeter", "serve", "--fake-gpus", "8", "--cpu", "model",
            "--listen", "127.0.0.1:0", "--interval", "0.1"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        m = re.search(r"serving http://127\.0\.0\.1:(\d+)/metrics", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()   # type: ignore[union-attr]
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("wattmeter serve did not start")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    resp.read()
    return resp.status


def case_cpu(quick: bool, proc: subprocess.Popen, port: int) -> dict:
    seconds = 15.0 if quick else 60.0
    time.sleep(5.0)                              # warm-up: imports, first reads
    c0, t0 = _cpu_s(proc.pid), time.monotonic()
    next_scrape = t0
    while time.monotonic() - t0 < seconds:       # one Prometheus scraping every 15 s
        if time.monotonic() >= next_scrape:
            # A new connection each time: the server closes connections idle for 10 s.
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            _get(conn)
            conn.close()
            next_scrape += 15.0
        time.sleep(0.2)
    c1, t1 = _cpu_s(proc.pid), time.monotonic()
    return {"gpus": 8, "gpu_hz": 10, "seconds": round(t1 - t0, 1),
            "cpu_pct_of_core": round(100.0 * (c1 - c0) / (t1 - t0), 3),
            "rss_mb": round(C.proc_status(proc.pid).get("VmRSS", 0) / 1024, 1)}


def case_scrapers(quick: bool, port: int) -> dict:
    n_threads, per = 50, (40 if quick else 200)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(n_threads)

    def scraper() -> None:
        mine, bad = [], []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start.wait()
        for _ in range(per):
            t0 = time.perf_counter()
            try:
                status = _get(conn)
                if status != 200:
                    bad.append(f"HTTP {status}")
            except (OSError, http.client.HTTPException) as exc:
                bad.append(type(exc).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine.append((time.perf_counter() - t0) * 1000.0)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    threads = [threading.Thread(target=scraper) for _ in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"scrapers": n_threads, "requests_each": per, "requests": len(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "latency_ms": C.summarize(latencies, 2),
            "p99_ms": round(C.percentile(latencies, 99), 2), "requests_per_s": round(len(latencies) / wall, 1)}


# -- driver ----------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", choices=["render", "rss"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(C.RESULTS_DIR, "serve.json"))
    args = ap.parse_args()
    if args.case:
        C.emit((case_render if args.case == "render" else case_rss)(args.quick))
        return 0
    results: dict = {"machine": C.machine_info(), "quick": args.quick, "targets": TARGETS}
    for case in ("render", "rss"):
        argv = [sys.executable, HERE, "--case", case] + (["--quick"] if args.quick else [])
        try:
            results[case] = C.run_child(argv, timeout=900)
        except (C.ChildError, subprocess.TimeoutExpired) as exc:
            results[case] = {"error": str(exc)[-2000:]}
        sys.stderr.write(f"{case}: {json.dumps(results[case])}\n")
    proc, port = _start_serve()
    try:
        results["cpu"] = case_cpu(args.quick, proc, port)
        sys.stderr.write(f"cpu: {json.dumps(results['cpu'])}\n")
        results["scrapers"] = case_scrapers(args.quick, port)
        sys.stderr.write(f"scrapers: {json.dumps(results['scrapers'])}\n")
    finally:
        proc.terminate()
        results["serve_exit_code"] = proc.wait(30)
    r = results
    results["verdict"] = {
        "render_median_ms": r["render"].get("render_ms", {}).get("median"),
        "rss_mb": r["rss"].get("rss_mb"),
        "cpu_pct_of_core": r["cpu"]["cpu_pct_of_core"],
        "scrape_errors": r["scrapers"]["errors"],
        "scrape_p99_ms": r["scrapers"]["p99_ms"],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    sys.stderr.write(f"wrote {args.out}\n{json.dumps(results['verdict'])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
