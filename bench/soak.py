"""Soak (issue 8): 24 h of virtual time on 8 fake GPUs read at 10 Hz, 10,000 short jobs, process
churn under the Attributor, and one fault an hour; the Prometheus collector scraped every 15 s.

Passes when, after a warm-up, tracemalloc growth stays under 1 MB; every exported counter series
is monotonic while it exists; at every scrape each GPU's attribution parts + idle + unattributed
(+ retired series) equal the device total; the per-process series cap holds; and each job
window's GPU energy matches the fake's true energy (within 2 %, or flagged approximate when a
fault fell in it).

    python bench/soak.py               # 24 h, writes bench/results/soak.json
    python bench/soak.py --hours 1     # a quick look

No threads: the clock only moves when the loop advances it, and the loop reads every
GPU once per 0.1 s step (fast where an edge waits, as the reader threads do), so the run is
deterministic and takes CPU time, not wall time.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wattmeter.attribution import AttributionConfig, Attributor, conservation_error
from wattmeter.clock import VirtualClock
from wattmeter.exporters.prometheus import ExportSources, build_registry
from wattmeter.meter import Meter
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sim.fake_nvml import FakeNVML, build_module
from wattmeter.sim.scenario import Scenario

N_GPUS = 8
STEP_S = 0.1                  # 10 Hz
SCRAPE_S = 15.0
PROCESS_TICK_S = 1.0          # serve's default --process-interval
MAX_SERIES = 16               # small, so pid churn (~20 live series at the 15 min TTL) hits the cap
SERIES_TTL_S = 900.0
# Counter faults that happen on real fleets and that the fake models per GPU; one an hour,
# in turn, each on the next GPU. (init faults only matter before start; hangs need threads.)
FAULTS = (
    {"kind": "counter_reset"},
    {"kind": "gpu_lost", "for_s": 20.0},
    {"kind": "counter_stall", "for_s": 30.0},
    {"kind": "not_supported", "for_s": 60.0, "function": "nvmlDeviceGetTotalEnergyConsumption"},
)
H100 = "NVIDIA H100 80GB HBM3"


@dataclass
class SoakResult:
    hours: float
    wall_s: float = 0.0
    polls: int = 0
    jobs: int = 0
    jobs_checked: int = 0
    jobs_approximate: int = 0
    clear_jobs_flagged: int = 0       # jobs away from any fault flagged approximate anyway
    worst_job_error: float = 0.0
    scrapes: int = 0
    faults: int = 0
    process_specs: int = 0
    counter_series_seen: int = 0
    counter_checks: int = 0
    conservation_checks: int = 0
    worst_conservation_error: float = 0.0
    max_process_series: int = 0
    dropped_series: int = 0
    mem_warm_bytes: int = 0
    mem_end_bytes: int = 0
    mem_growth_bytes: int = 0
    mem_peak_bytes: int = 0
    mem_by_10min: list[int] = field(default_factory=list)   # growth at each virtual 10 min
    worst_fault_job_error: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def scenario(hours: float, seed: int, fault_every_s: float = 3600.0) -> dict:
    """8 GPUs with a training-like square trace, processes coming and going, one fault an hour."""
    rng = random.Random(seed)
    span = hours * 3600.0
    gpus = []
    pid = 1000
    for i in range(N_GPUS):
        procs = []
        t = rng.uniform(0, 120)
        while t < span:
            life = rng.uniform(60, 900)       # a process lives 1-15 min, then a gap of up to 5 min
            pid += 1
            procs.append({"pid": pid, "name": f"worker{pid}", "start_s": round(t, 3),
                          "end_s": round(t + life, 3), "sm_util": rng.choice([20.0, 50.0, 90.0])})
            t += life + rng.uniform(0, 300)
        gpus.append({"model": H100, "trace": {"kind": "square", "high_w": 550.0 + 10 * i, "low_w": 90.0,
                                              "high_s": 7.0 + i, "low_s": 3.0, "phase_s": 0.37 * i},
                     "process": procs})
    faults = []
    for h in range(int(span // fault_every_s)):
        spec = dict(FAULTS[h % len(FAULTS)])
        spec.update(gpu=h % N_GPUS, at_s=(h + 0.5) * fault_every_s + rng.uniform(0, 0.02 * fault_every_s))
        faults.append(spec)
    return {"seed": seed, "gpu": gpus, "fault": faults}


def counters(registry) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in registry.collect():
        if fam.type != "counter":
            continue
        for s in fam.samples:
            if s.name.endswith("_total"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def run_soak(hours: float = 24.0, jobs: int = 10_000, seed: int = 7, warmup_s: float | None = None,
             progress: bool = False, partial_out: Path | None = None,
             fault_every_s: float = 3600.0, max_series: int = MAX_SERIES) -> SoakResult:
    """``partial_out``: rewrite this JSON file each virtual hour, so a cut-short run still says
    how far it got and what it saw."""
    res = SoakResult(hours=hours)
    fail = res.failures.append
    t_wall = time.perf_counter()
    # Traced from the start: growth is live memory at the end minus at warm-up, so bounded
    # buffers that turn over (history deques) net out and only what accumulates counts.
    gc.collect()
    tracemalloc.start()
    clock = VirtualClock(start=100.0)
    data = scenario(hours, seed, fault_every_s)
    res.process_specs = sum(len(g["process"]) for g in data["gpu"])
    res.faults = len(data["fault"])
    fake = FakeNVML(Scenario.from_dict(data), clock)
    sensor = NvmlSensor(build_module(fake), GpuSelection(None), wall=clock.wall, clock=clock, seed=seed)
    meter = Meter([sensor], clock=clock, interval_s=STEP_S)
    attributor = Attributor(sensor.read_processes,
                            config=AttributionConfig(pid_labels=True, max_series=max_series,
                                                     series_ttl_s=SERIES_TTL_S))
    registry, _ = build_registry(ExportSources(meter, "soak-host", attribution=attributor, pid_labels=True))
    t0 = clock.now()
    span = hours * 3600.0
    warmup = warmup_s if warmup_s is not None else min(3600.0, span / 6)
    job_every = span / jobs
    n_steps = int(round(span / STEP_S))
    job_rng = random.Random(seed + 1)
    next_job = t0 + 1.0
    open_job = None            # (window, t_begin, t_end_planned)
    ended: list = []           # (window, t_begin, t_end, check_at)
    last: dict[tuple[str, tuple], float] = {}
    new_series = 0             # a count, not a set: the harness must not grow with pid churn
    next_scrape = t0 + SCRAPE_S
    next_proc = t0 + PROCESS_TICK_S
    traced = False
    # a job that overlaps a fault (plus the bridge's reach) may be off by more than 2 %; it must be flagged
    fault_spans = [(t0 + f["at_s"] - 5.0, t0 + f["at_s"] + f.get("for_s", 0.0) + 5.0) for f in data["fault"]]
    meter.poll(t0)
    for step in range(1, n_steps + 1):
        now = clock.advance(STEP_S)
        # As the sampler's reader thread would: a sensor an edge waits on is read fast (a
        # counter pair at its next refresh), so job edges resolve within ~0.2 s, not at the
        # next steady pair seconds later (which left every window extrapolated, hence approximate).
        for s in meter.sensors:
            meter.sampler.read_sensor(s, now, meter.sampler.wants_fast(s, now))
        res.polls += 1
        if now >= next_proc:
            next_proc += PROCESS_TICK_S
            attributor.tick(now, meter.snapshot())
        # jobs: one at a time, 1-5 s long, every span/jobs seconds
        if open_job is None and now >= next_job and res.jobs < jobs:
            open_job = (meter.window("job"), now, now + job_rng.uniform(1.0, min(5.0, 0.8 * job_every)))
            next_job += job_every
            res.jobs += 1
        elif open_job is not None and now >= open_job[2]:
            w, tb, _ = open_job
            w.end()
            ended.append((w, tb, now, now + 2.0))
            open_job = None
        while ended and now >= ended[0][3]:
            w, tb, te, _ = ended.pop(0)
            r = w.result(timeout_s=0)
            got = r.component_energy_j("gpu")
            true = sum(fake.true_energy_j(i, tb, te) for i in range(N_GPUS))
            err = abs(got / true - 1.0) if true > 0 else abs(got)
            res.jobs_checked += 1
            res.jobs_approximate += r.approximate
            if not (math.isfinite(got) and got >= 0):
                fail(f"job at t={tb - t0:.1f}s: GPU energy {got!r}")
            if any(a < te and tb < b for a, b in fault_spans):
                res.worst_fault_job_error = max(res.worst_fault_job_error, err)
                if err > 0.02 and not r.approximate:
                    fail(f"job at t={tb - t0:.1f}s over a fault: {err:.2%} off and not flagged approximate")
            else:
                res.worst_job_error = max(res.worst_job_error, err)
                res.clear_jobs_flagged += r.approximate
                if err > 0.02:
                    fail(f"job at t={tb - t0:.1f}s: GPU energy {got:.1f} J vs true {true:.1f} J ({err:.2%})")
        if now >= next_scrape:
            next_scrape += SCRAPE_S
            res.scrapes += 1
            cur = counters(registry)
            new_series += sum(1 for key in cur if key not in last)
            for key, v in cur.items():
                if not math.isfinite(v):
                    fail(f"t={now - t0:.0f}s: {key} = {v}")
                prev = last.get(key)
                if prev is not None:
                    res.counter_checks += 1
                    if v < prev - 1e-9 * max(1.0, abs(prev)):
                        fail(f"t={now - t0:.0f}s: counter {key[0]} {dict(key[1])} went down {prev} -> {v}")
            last = cur
            snap = attributor.snapshot(meter.snapshot())
            for dev in snap.device_j:
                e = conservation_error(snap, dev)
                res.conservation_checks += 1
                res.worst_conservation_error = max(res.worst_conservation_error, e)
                if e > 1e-9:
                    fail(f"t={now - t0:.0f}s: {dev} parts differ from the device total by {e:.2e}")
            n_proc = sum(1 for k in cur if k[0].startswith("wattmeter_gpu_process_energy"))
            res.max_process_series = max(res.max_process_series, n_proc, len(snap.processes))
            if len(snap.processes) > max_series or n_proc > max_series:
                fail(f"t={now - t0:.0f}s: {max(n_proc, len(snap.processes))} process series > cap {max_series}")
            res.dropped_series = snap.dropped_series
        if not traced and now - t0 >= warmup:
            gc.collect()
            res.mem_warm_bytes = tracemalloc.get_traced_memory()[0]
            traced = True
        if traced and step % int(600 / STEP_S) == 0:
            res.mem_by_10min.append(tracemalloc.get_traced_memory()[0] - res.mem_warm_bytes)
        if step % int(3600 / STEP_S) == 0 and partial_out is not None:
            res.wall_s = round(time.perf_counter() - t_wall, 1)
            partial_out.write_text(json.dumps({**asdict(res), "virtual_hours_done": round((now - t0) / 3600, 2),
                                               "complete": False}, indent=2) + "\n")
        if progress and step % int(3600 / STEP_S) == 0:
            print(f"  {(now - t0) / 3600:.0f} h: {res.jobs} jobs, {res.scrapes} scrapes, "
                  f"{time.perf_counter() - t_wall:.0f} s", file=sys.stderr, flush=True)
    gc.collect()
    res.mem_end_bytes, res.mem_peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if traced:
        res.mem_growth_bytes = res.mem_end_bytes - res.mem_warm_bytes
        if res.mem_growth_bytes >= 1_000_000:
            fail(f"memory grew {res.mem_growth_bytes / 1e6:.2f} MB after warm-up (limit 1 MB)")
    res.counter_series_seen = new_series
    meter.close()
    res.wall_s = round(time.perf_counter() - t_wall, 1)
    res.failures = res.failures[:20] + ([f"... and {len(res.failures) - 20} more"] if len(res.failures) > 20 else [])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--jobs", type=int, default=None, help="default: 10,000 per 24 h")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.json"))
    args = ap.parse_args()
    jobs = args.jobs if args.jobs is not None else int(round(10_000 * args.hours / 24))
    out_path = Path(args.out) if args.hours >= 24 else None
    res = run_soak(args.hours, jobs, progress=True, partial_out=out_path)
    out = {**asdict(res), "virtual_hours_done": args.hours, "complete": True, "passed": res.passed}
    text = json.dumps(out, indent=2)
    print(text)
    if out_path is not None:
        out_path.write_text(text + "\n")
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(main())
