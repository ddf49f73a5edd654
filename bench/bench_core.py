"""Core benchmarks: energy accuracy against ground truth, overhead, latency, memory.

    python bench/bench_core.py            # full run (< 5 min on 2 cores), writes bench/results/core.json
    python bench/bench_core.py --quick    # fewer jobs and shorter runs, for trying changes (writes to /tmp)
    python bench/bench_core.py --snapshot HEAD            # measure a frozen copy while others edit the tree
    python bench/bench_core.py --real --out real.json     # on a GPU host: overhead, latency, start-up, memory
    python bench/bench_core.py --attach-real real.json    # fold that real-GPU result into core.json
    python bench/bench_core.py --only overhead            # one phase (writes bench/results/core-overhead.json)

Every GPU figure comes from the fake NVML (wattmeter.sim.fake_nvml) installed as
``sys.modules["pynvml"]``, so wattmeter, Zeus and CodeCarbon read the same simulated GPUs and
are scored against the same ground truth, ``fake.true_energy_j(i, t0, t1)``, over the user's true
window: from just before the start call to just after the stop call (wall-clock time, the fake's
own SystemClock). Each meter runs in its own process, so CPU time and RSS are its own. Targets
are reported, not asserted.

The parent re-invokes this file with ``--case ...``; a child prints one ``@@RESULT {json}`` line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (stdlib only: keeps children's memory and start-up honest)

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))

# -- the traces -------------------------------------------------------------------------------------
# GPU 0: the bundled "bursty" square wave (agent/sim/scenarios/bursty.toml): 150 ms at 650 W, 250 ms at 90 W.
BURSTY = {"kind": "square", "high_w": 650.0, "low_w": 90.0, "high_s": 0.150, "low_s": 0.250, "phase_s": 0.0}
# GPU 1: idle, then a burst. Each job starts 2-40 ms before a rising edge, so the workload's
# power steps up right after the start call (the realistic launch of a job on an idle GPU).
STEP_HIGH_S, STEP_LOW_S = 1.45, 0.60
STEP_PERIOD_S = STEP_HIGH_S + STEP_LOW_S      # 2.05 s: 2.05 mod 0.4 = 0.05, so GPU 0 sees 8 phases
STEP = {"kind": "square", "high_w": 600.0, "low_w": 70.0, "high_s": STEP_HIGH_S, "low_s": STEP_LOW_S, "phase_s": 0.0}
TRACE_LABELS = {
    "counter": {0: "bursty 650/90 W (H100)", 1: "idle->burst, step-up right after start (H100)"},
    "counter_h100clock": {0: "bursty 650/90 W (H100, refresh 99.97 ms +-2.5 ms)",
                          1: "idle->burst (H100, refresh 99.97 ms +-2.5 ms)"},
    "power": {0: "bursty 650/90 W (H100, field 186)", 1: "idle->burst, step-up right after start (H100, field 186)",
              2: "bursty 650/90 W (A100, GetPowerUsage only)"},
}


def scenario_data(kind: str) -> dict:
    h100 = "NVIDIA H100 80GB HBM3"
    if kind == "counter":
        gpus = [{"model": h100, "trace": dict(BURSTY)}, {"model": h100, "trace": dict(STEP)}]
    elif kind == "counter_h100clock":
        # The refresh clock measured on a real H100: 99.97 ms between refreshes, each +-2.5 ms.
        clock = {"counter_refresh_s": 0.09997, "counter_jitter_s": 0.0025}
        gpus = [{"model": h100, "trace": dict(BURSTY), "sensor": dict(clock)},
                {"model": h100, "trace": dict(STEP), "sensor": dict(clock)}]
    elif kind == "power":
        no_counter = {"energy_counter": False}
        gpus = [{"model": h100, "trace": dict(BURSTY), "sensor": dict(no_counter)},
                {"model": h100, "trace": dict(STEP), "sensor": dict(no_counter)},
                # pre-Volta-like: no counter, no power fields, GetPowerUsage instant at a 100 ms refresh
                {"model": "NVIDIA A100-SXM4-40GB", "trace": dict(BURSTY),
                 "sensor": {"energy_counter": False, "instant_field": False, "power_usage": "instant"}}]
    else:
        raise ValueError(kind)
    return {"description": f"bench {kind}", "seed": 11, "gpu": gpus}


def job_plan(kind: str, n: int, seed: int = 5) -> list[tuple[str, float, float]]:
    """[(case, duration_s, lead_s)], the same sequence for every meter (same seed)."""
    rng = random.Random(f"bench-{kind}-{seed}")
    cases = [("counter_ge1s", 1.0, 1.5), ("counter_0.7s", 0.7, 0.7)] if kind.startswith("counter") else [("power_ge1s", 1.0, 1.5)]
    out = []
    for _ in range(n):
        for name, lo, hi in cases:   # interleaved, so slow drift hits every case alike
            out.append((name, round(rng.uniform(lo, hi), 3), round(rng.uniform(0.002, 0.040), 4)))
    return out


# -- child: accuracy ----------------------------------------------------------------------------------
class _WmLive:
    """One long-lived meter; each job is a window (the library's normal use)."""

    label = "wattmeter (meter running, window per job)"

    def __init__(self, mod, gpus):
        from wattmeter.meter import Meter
        from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
        self.meter = Meter([NvmlSensor(mod, GpuSelection(None))]).start()
        self.notes = []

    def start(self):
        return self.meter.window("job")

    def stop(self, w):
        w.end()

    def energies(self, w):
        r = w.result()
        return {int(d.key[3:]): d.energy_j for d in r.devices if d.key.startswith("gpu")}, r.approximate


class _WmFresh:
    """A new meter per job: NVML sensor set-up + Meter + start + window is the start call."""

    label = "wattmeter (new meter per job)"

    def __init__(self, mod, gpus):
        from wattmeter.meter import Meter
        from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
        self.mod, self.Meter, self.Sensor, self.Sel = mod, Meter, NvmlSensor, GpuSelection
        self.notes = []

    def start(self):
        m = self.Meter([self.Sensor(self.mod, self.Sel(None))])
        m.start()
        return m, m.window("job")

    def stop(self, h):
        h[1].end()

    def energies(self, h):
        m, w = h
        r = w.result()
        m.close()
        return {int(d.key[3:]): d.energy_j for d in r.devices if d.key.startswith("gpu")}, r.approximate


class _Zeus:
    label = "Zeus ZeusMonitor (begin/end_window)"

    def __init__(self, mod, gpus):
        from zeus.monitor import ZeusMonitor
        self.zm = ZeusMonitor(gpu_indices=list(gpus), cpu_indices=[])
        self.notes = []
        self.k = 0
        try:   # Zeus's default synchronises through torch; record what that does here
            self.zm.begin_window("probe-default-args")
            self.zm.end_window("probe-default-args")
            self.notes.append("begin_window() with default sync_execution=True works here")
        except Exception as exc:
            self.zm.measurement_states.pop("probe-default-args", None)
            self.notes.append(f"begin_window() with default args raises {type(exc).__name__}: {exc} "
                              "(torch not installed); the bench passes sync_execution=False")

    def start(self):
        self.k += 1
        key = f"job{self.k}"
        self.zm.begin_window(key, sync_execution=False)
        return key

    def stop(self, key):
        self._m = self.zm.end_window(key, sync_execution=False)

    def energies(self, key):
        return {int(i): float(e) for i, e in self._m.gpu_energy.items()}, None


class _CodeCarbon:
    """A new OfflineEmissionsTracker per job (one per process is CodeCarbon's normal use: ``cold``
    clears its process-level hardware cache before each job, so every start() probes hardware as
    a fresh process would; ``warm`` keeps the cache after one warm-up run)."""

    def __init__(self, mod, gpus, cold: bool):
        from codecarbon import OfflineEmissionsTracker
        from codecarbon.core import hardware_cache
        self.T, self.cache, self.cold, self.gpus = OfflineEmissionsTracker, hardware_cache, cold, list(gpus)
        self.label = f"CodeCarbon ({'cold: first tracker in the process' if cold else 'warm: hardware cache filled'})"
        self.notes = ["measure_power_secs=1, OfflineEmissionsTracker(country_iso_code='USA'), gpu_ids=" + str(self.gpus)]
        if not cold:
            t = self._new()
            t.start()
            time.sleep(0.2)
            t.stop()

    def _new(self):
        return self.T(country_iso_code="USA", measure_power_secs=1, log_level="error", save_to_file=False,
                      allow_multiple_runs=True, gpu_ids=self.gpus)

    def prepare(self):
        if self.cold:   # what a fresh process would still have to do: probe hardware, detect the CPU
            self.cache.clear_cache()
            from codecarbon.core import util
            clear = getattr(getattr(util, "detect_cpu_model", None), "cache_clear", None)
            if clear is not None:
                clear()

    def start(self):
        t = self._new()
        t.start()
        return t

    def stop(self, t):
        t.stop()

    def energies(self, t):
        kwh = t.final_emissions_data.gpu_energy
        # CodeCarbon reports the sum over gpu_ids; the bench gives each process one GPU.
        return {self.gpus[0]: kwh * 3.6e6} if len(self.gpus) == 1 else {-1: kwh * 3.6e6}, None


def sensor_floor_j(fake, g: int, t0: float, t1: float) -> float:
    """The best a meter could do from this GPU's own sensor, given perfect knowledge of when it
    refreshes (an error floor set by the sensor, not by any meter):

    * energy counter: linear interpolation between the exact counter values at the exact
      refresh instants around each edge (100 ms apart);
    * power field 186 (a box mean over each 20 ms refresh period): every box placed where it
      belongs, partial boxes at the edges pro rata;
    * nvmlDeviceGetPowerUsage as a point sample per 100 ms refresh: trapezoids between samples.
    """
    sim = fake._gpus[g]
    spec = sim.spec.sensor
    a, b = t0 - fake.t0, t1 - fake.t0
    if spec.energy_counter:
        grid, cum = sim.counter_grid, sim.trace.cumulative

        def lin(t: float) -> float:
            k = grid.tick(t)
            r0, r1 = grid.at(k), grid.at(k + 1)
            e0, e1 = cum(r0), cum(r1)
            return e0 + (e1 - e0) * (t - r0) / (r1 - r0)
        return lin(b) - lin(a)
    if spec.instant_field:
        grid, w = sim.instant_grid, sim.instant_grid.period
        total = 0.0
        for k in range(grid.tick(a), grid.tick(b) + 2):
            r = grid.at(k)
            lo, hi = max(a, r - w), min(b, r)
            if hi > lo:
                total += sim.power_instant(r)[0] * (hi - lo)
        return total
    grid = sim.power_grid
    total = 0.0
    for k in range(grid.tick(a), grid.tick(b) + 1):
        r0, r1 = grid.at(k), grid.at(k + 1)
        p0, p1 = sim.trace.power_w(r0), sim.trace.power_w(r1)
        lo, hi = max(a, r0), min(b, r1)
        if hi > lo:
            f0, f1 = (lo - r0) / (r1 - r0), (hi - r0) / (r1 - r0)
            total += (p0 + (p1 - p0) * (f0 + f1) / 2.0) * (hi - lo)
    return total


def step_model_j(fake, g: int, t0: float, t1: float) -> float | None:
    """Diagnostic for the counter path: the ledger's own edge model (wattmeter.ledger.
    step_interpolate) fed the exact counter values at the exact refresh instants. Its error is
    what the model alone costs; the rest of wattmeter's error comes from timing the refreshes."""
    try:
        from wattmeter.ledger import step_interpolate
    except ImportError:
        return None
    sim = fake._gpus[g]
    if not sim.spec.sensor.energy_counter:
        return None
    grid, cum = sim.counter_grid, sim.trace.cumulative

    def at(t: float) -> float:
        j = grid.tick(t)
        r = [grid.at(j + i) for i in (-1, 0, 1, 2)]
        e = [cum(x) for x in r]
        low = (e[1] - e[0]) / (r[1] - r[0])
        high = (e[3] - e[2]) / (r[3] - r[2])
        return step_interpolate(r[1], e[1], r[2], e[2], t, low, high)
    return at(t1 - fake.t0) - at(t0 - fake.t0)


def child_accuracy(a: argparse.Namespace) -> None:
    from wattmeter.clock import SystemClock
    from wattmeter.sim import fake_nvml
    from wattmeter.sim.scenario import Scenario

    clock = SystemClock()
    scen = Scenario.from_dict(scenario_data(a.scenario), source=f"bench-{a.scenario}")
    fake = fake_nvml.FakeNVML(scen, clock, t0=a.t0)
    mod = fake_nvml.install(fake)        # before importing Zeus / CodeCarbon
    gpus = [int(g) for g in a.gpus.split(",")] if a.gpus else list(range(len(scen.gpus)))
    setup_error = None
    try:
        if a.meter == "wm-live":
            runner = _WmLive(mod, gpus)
        elif a.meter == "wm-fresh":
            runner = _WmFresh(mod, gpus)
        elif a.meter == "zeus":
            runner = _Zeus(mod, gpus)
        elif a.meter in ("cc-cold", "cc-warm"):
            runner = _CodeCarbon(mod, gpus, cold=a.meter == "cc-cold")
        else:
            raise SystemExit(f"unknown meter {a.meter}")
    except Exception as exc:
        runner, setup_error = None, f"{type(exc).__name__}: {exc}"
    jobs = job_plan(a.scenario, a.jobs)
    C.wait_for_go()
    cpu0, wall0 = time.process_time(), time.monotonic()
    records, failure = [], setup_error
    for i, (case, dur, lead) in enumerate(jobs if runner else []):
        if hasattr(runner, "prepare"):
            runner.prepare()
        k = math.ceil((clock.now() + lead + 0.02 - a.t0) / STEP_PERIOD_S)
        edge = a.t0 + k * STEP_PERIOD_S
        C.sleep_until(edge - lead, clock.now)
        t_before = clock.now()
        try:
            h = runner.start()
            t_started = clock.now()
            time.sleep(dur)                      # the job's work (the GPU follows the trace)
            t_stop = clock.now()
            runner.stop(h)
            t_after = clock.now()
            measured, approx = runner.energies(h)
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            break
        for g in gpus:
            truth = fake.true_energy_j(g, t_before, t_after)
            got = measured.get(g)
            floor = sensor_floor_j(fake, g, t_before, t_after)
            model = step_model_j(fake, g, t_before, t_after)
            records.append({
                "job": i, "case": case, "gpu": g, "duration_s": dur, "lead_s": lead,
                "window_s": round(t_after - t_before, 5),
                "start_call_ms": round((t_started - t_before) * 1e3, 3),
                "stop_call_ms": round((t_after - t_stop) * 1e3, 3),
                "truth_j": round(truth, 4), "measured_j": None if got is None else round(got, 4),
                "err_pct": None if got is None else round((got - truth) / truth * 100.0, 4),
                "phase_s": round(((t_before - a.t0) % 0.4), 4),
                "approximate": approx,
                "sensor_floor_err_pct": None if floor is None else round((floor - truth) / truth * 100.0, 4),
                "step_model_err_pct": None if model is None else round((model - truth) / truth * 100.0, 4),
            })
    C.emit({"meter": a.meter, "label": getattr(runner, "label", a.meter), "scenario": a.scenario, "gpus": gpus,
            "records": records, "failure": failure, "notes": getattr(runner, "notes", []),
            "cpu_s": round(time.process_time() - cpu0, 3), "wall_s": round(time.monotonic() - wall0, 2),
            "status": C.proc_status()})


# -- child: sampler / meter CPU -------------------------------------------------------------------------
# CPU per call of the real driver on an H100 (docs/gpu-validation.md, third run). On the fake,
# its own Python stands in for the driver at another cost: 20-30 us a call, where field 186 costs
# an H100 10 us and the energy counter 3.5 ms.
# The overhead phase's other sensor behaviours (each a child metering 8 such GPUs), as a
# scenario's [gpu.sensor] table on top of the default H100s:
SENSOR_ROWS = {
    # power-only: the counter off (fields 185/186 left), as on a GPU whose counter failed
    "wattmeter-power": {"energy_counter": False},
    # the H100 as measured: its counter clock (99.97 ms, each refresh +-2.5 ms) and a 3.5 ms
    # counter call (a sleep here, so the projected column prices it; the meter sees the call
    # take that long). The default keeps exact time and answers at once.
    "wattmeter-h100": {"counter_refresh_s": 0.09997, "counter_jitter_s": 0.0025,
                       "function_latency_s": (("nvmlDeviceGetTotalEnergyConsumption", 0.0035),)},
    # and with field 186 as 100 ms samples stamped at the read: too coarse to shape counter
    # spans, so a cheap counter would be read at every tick
    "wattmeter-sample": {"counter_refresh_s": 0.09997, "counter_jitter_s": 0.0025, "instant_kind": "sample",
                         "instant_refresh_s": 0.1, "field_timestamp": "read",
                         "function_latency_s": (("nvmlDeviceGetTotalEnergyConsumption", 0.0035),)},
    # `--interval 0.5`, the request for less CPU: the default GPUs, and power-only ones
    "wattmeter-slow": {},
    "wattmeter-power-slow": {"energy_counter": False},
    # idle GPUs (sensors/quiet.py: a GPU whose power holds still is read less often), as on a
    # server or node between jobs: the default GPUs, and power-only ones
    "wattmeter-idle": {},
    "wattmeter-power-idle": {"energy_counter": False},
}
ROW_INTERVAL_S = {"wattmeter-slow": 0.5, "wattmeter-power-slow": 0.5}
IDLE_ROWS = ("wattmeter-idle", "wattmeter-power-idle")


def idle_trace(idle_w: float, seed: int):
    """An idle GPU's power: its idle draw, wobbling +-2 W every 0.2-0.6 s (a real idle board
    moves by a few watts; a flat line would be the fake's best case)."""
    import random

    from wattmeter.sim.traces import StepsTrace
    rng = random.Random(f"idle-{seed}")
    pts, t = [], -1.0
    while t < 3600.0:
        pts.append((t, idle_w + rng.uniform(-2.0, 2.0)))
        t += rng.uniform(0.2, 0.6)
    return StepsTrace(pts)


H100_CALL_CPU_US = {"nvmlDeviceGetTotalEnergyConsumption": 3505.0, "nvmlDeviceGetFieldValues": 10.0,
                    "nvmlDeviceGetPowerUsage": 2.0}


SETTLE_S = 3.0       # after the start signal: a meter's start-up CPU is counted up to here...
STEADY_S = 60.0      # ...and the background CPU is measured from here on: a counter's refresh
                     # period is fitted over its first ~40 s of pairs (sensors/refresh.py), and
                     # until then recalibration bursts may still come (10 s rounds right after
                     # a 3 s settle read 4.6 to 16.6 counter calls a second for the same meter)


class DriverCalls:
    """Thread CPU spent inside the fake NVML's calls, and how many of each: what a real driver
    would cost instead (every meter in the process calls the same fake)."""

    def __init__(self) -> None:
        import threading
        self.cpu_s = 0.0
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._depth = threading.local()

    def install(self) -> None:
        from wattmeter.sim.fake_nvml import FakeNVML
        for name in [n for n in dir(FakeNVML) if n.startswith("nvml")]:
            setattr(FakeNVML, name, self._wrap(name, getattr(FakeNVML, name)))

    def _wrap(self, name: str, fn):
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth:                      # a call made by another simulated call: counted there
                return fn(*args, **kwargs)
            self._depth.n = 1
            c = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                d = time.thread_time() - c
                self._depth.n = 0
                with self._lock:
                    self.cpu_s += d
                    self.calls[name] = self.calls.get(name, 0) + 1
        return timed

    def snapshot(self) -> tuple[float, dict[str, int]]:
        with self._lock:
            return self.cpu_s, dict(self.calls)


def child_overhead(a: argparse.Namespace) -> None:
    import resource
    from wattmeter.clock import SystemClock
    from wattmeter.sim import fake_nvml
    from wattmeter.sim.scenario import Scenario

    driver = None
    if a.real:   # the machine's own GPUs through nvidia-ml-py
        import pynvml as mod
    else:
        driver = DriverCalls()
        driver.install()
        scenario = Scenario.default(a.ngpus)
        if a.meter in SENSOR_ROWS:
            from dataclasses import replace
            table = SENSOR_ROWS[a.meter]
            scenario = replace(scenario, gpus=tuple(replace(g, sensor=replace(g.sensor, **table))
                                                    for g in scenario.gpus))
            if a.meter in IDLE_ROWS:
                scenario = replace(scenario, gpus=tuple(replace(g, trace=idle_trace(g.idle_power_w, g.index))
                                                        for g in scenario.gpus))
        fake = fake_nvml.FakeNVML(scenario, SystemClock())
        mod = fake_nvml.install(fake)
    extra: dict = {"real_nvml": bool(a.real)}
    handle = None
    c_start = time.process_time()
    if a.meter == "baseline":
        pass
    elif a.meter == "wattmeter" or a.meter in SENSOR_ROWS:
        from wattmeter.meter import Meter
        from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
        sensor = NvmlSensor(mod, GpuSelection(None))
        meter = Meter([sensor], interval_s=ROW_INTERVAL_S.get(a.meter)).start()
        handle = meter.window("steady")
    elif a.meter == "wattmeter-discover":
        # As Meter() and `wattmeter run` wire it: discovery, every NVML call under a deadline
        # (sensors/guard.py). GPU sensor only, so the row compares with the one above.
        from wattmeter.discovery import SensorPlan, discover
        from wattmeter.meter import Meter
        found = discover(SensorPlan(fake_gpus=a.ngpus, cpu="none", ram="none"))
        meter = Meter(found.sensors).start()
        handle = meter.window("steady")
    elif a.meter == "zeus":
        from zeus.monitor import ZeusMonitor
        zm = ZeusMonitor(gpu_indices=list(range(a.ngpus)), cpu_indices=[])
        zm.begin_window("steady", sync_execution=False)
    elif a.meter == "codecarbon":
        from codecarbon import OfflineEmissionsTracker
        tr = OfflineEmissionsTracker(country_iso_code="USA", measure_power_secs=1, log_level="error",
                                     save_to_file=False, allow_multiple_runs=True)
        tr.start()
    C.wait_for_go()
    # Background CPU is the steady state: a meter's start (wattmeter's counter calibration,
    # CodeCarbon's first measurement) is reported apart, as the CPU up to the end of the settle.
    time.sleep(SETTLE_S)
    extra["startup_cpu_s"] = round(time.process_time() - c_start, 4)
    time.sleep(STEADY_S - SETTLE_S)
    threads = C.proc_status().get("Threads")
    reads0 = meter.status["nvml"].reads if a.meter.startswith("wattmeter") else 0
    d0 = driver.snapshot() if driver else None
    ru0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.monotonic()
    time.sleep(a.seconds)
    ru1, c1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.monotonic()
    if driver is not None and d0 is not None:
        d1 = driver.snapshot()
        extra["driver_cpu_s"] = round(d1[0] - d0[0], 4)
        extra["driver_calls"] = {k: v - d0[1].get(k, 0) for k, v in d1[1].items() if v - d0[1].get(k, 0)}
    if a.meter == "wattmeter":
        extra["sampler_reads"] = meter.status["nvml"].reads - reads0
        handle.end()
        r = handle.result()
        extra["window_gpu_j"] = round(sum(d.energy_j for d in r.devices), 1)
        meter.stop()
        # What one sampler read costs here, and how much of it is the fake NVML's Python.
        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            sensor.read(time.monotonic())
        extra["sensor_read_us"] = round((time.perf_counter() - t) / n * 1e6, 1)
        extra["sensor_gpus"] = len(sensor.devices())
        h = mod.nvmlDeviceGetHandleByIndex(0)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            mod.nvmlDeviceGetTotalEnergyConsumption(h)
        extra["counter_call_wall_us"] = round((time.perf_counter() - t) / n * 1e6, 2)
        extra["counter_call_cpu_us"] = round((time.process_time() - c) / n * 1e6, 2)
        meter.close()
    elif a.meter == "wattmeter-discover" or a.meter in SENSOR_ROWS:
        extra["sampler_reads"] = meter.status["nvml"].reads - reads0
        handle.end()
        extra["window_gpu_j"] = round(sum(d.energy_j for d in handle.result().devices), 1)
        meter.close()
    elif a.meter == "zeus":
        zm.end_window("steady", sync_execution=False)
    elif a.meter == "codecarbon":
        tr.stop()
    C.emit({"meter": a.meter, "ngpus": a.ngpus, "cpu_s": round(c1 - c0, 4), "wall_s": round(w1 - w0, 3),
            "utime_s": round(ru1.ru_utime - ru0.ru_utime, 4), "stime_s": round(ru1.ru_stime - ru0.ru_stime, 4),
            "threads": threads, "status": C.proc_status(), **extra})


# -- child: window begin+end latency ---------------------------------------------------------------------
def child_window_latency(a: argparse.Namespace) -> None:
    import gc
    from wattmeter.clock import SystemClock
    from wattmeter.sim import fake_nvml
    from wattmeter.sim.scenario import Scenario

    if a.real:
        import pynvml as mod
    else:
        fake = fake_nvml.FakeNVML(Scenario.default(a.ngpus), SystemClock())
        mod = fake_nvml.install(fake)
    ns = time.perf_counter_ns
    empty = []
    for _ in range(2000):
        t = ns()
        empty.append(ns() - t)
    out: dict = {"meter": a.meter, "ngpus": a.ngpus, "n": a.n, "real_nvml": bool(a.real),
                 "timer_overhead_us": round(C.median(empty) / 1e3, 3)}
    lat = []
    if a.meter == "wattmeter":
        from wattmeter.meter import Meter
        from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
        meter = Meter([NvmlSensor(mod, GpuSelection(None))]).start()
        for _ in range(500):
            meter.window("x").end()
        time.sleep(0.3)
        for _ in range(a.n):
            t = ns()
            meter.window("x").end()
            lat.append(ns() - t)
        t = time.monotonic()
        while meter.ledger.pending_marks() and time.monotonic() - t < 5:
            time.sleep(0.01)
        out["pending_marks_after_s"] = round(time.monotonic() - t, 3)
        out["pending_marks_left"] = meter.ledger.pending_marks()
        gc.collect()
        meter.close()
    elif a.meter == "zeus":
        import warnings
        from zeus.monitor import ZeusMonitor
        warnings.simplefilter("ignore")   # end_window warns on 0 J windows (shorter than a counter refresh)
        zm = ZeusMonitor(gpu_indices=list(range(a.ngpus)), cpu_indices=[])
        for i in range(200):
            zm.begin_window(f"w{i}", sync_execution=False)
            zm.end_window(f"w{i}", sync_execution=False)
        for i in range(a.n):
            t = ns()
            zm.begin_window("x", sync_execution=False)
            zm.end_window("x", sync_execution=False)
            lat.append(ns() - t)
        h = mod.nvmlDeviceGetHandleByIndex(0)
        t = time.perf_counter()
        for _ in range(2000):
            mod.nvmlDeviceGetTotalEnergyConsumption(h)
        out["fake_counter_call_us"] = round((time.perf_counter() - t) / 2000 * 1e6, 2)
    us = [x / 1e3 for x in lat]
    out.update({"median_us": round(C.median(us), 2), "p90_us": round(C.percentile(us, 90), 2),
                "p99_us": round(C.percentile(us, 99), 2), "max_us": round(max(us), 1)})
    C.emit(out)


# -- child: CPU per window (edge polling) -------------------------------------------------------------------
def child_window_cpu(a: argparse.Namespace) -> None:
    """CPU time a window costs beyond the idle sampler: each edge makes the sampler read fast
    until the edge is pinned. 1 GPU; 20 windows of 50 ms, 250 ms apart, vs the same time idle."""
    from wattmeter.clock import SystemClock
    from wattmeter.meter import Meter
    from wattmeter.sim import fake_nvml
    from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
    from wattmeter.sim.scenario import Scenario
    if a.real:
        import pynvml as mod
    else:
        mod = fake_nvml.install(fake_nvml.FakeNVML(Scenario.default(1), SystemClock()))
    m = Meter([NvmlSensor(mod, GpuSelection(None))]).start()
    time.sleep(2.0)                       # past any start-up calibration burst
    st = m.status["nvml"]
    n, gap, dur = 20, 0.25, 0.05
    r0, c0 = st.reads, time.process_time()
    time.sleep(n * gap)
    idle_cpu, idle_reads = time.process_time() - c0, st.reads - r0
    r0, c0 = st.reads, time.process_time()
    t = time.monotonic()
    for i in range(n):
        w = m.window("w")
        time.sleep(dur)
        w.end()
        C.sleep_until(t + (i + 1) * gap)
    busy_cpu, busy_reads = time.process_time() - c0, st.reads - r0
    m.close()
    C.emit({"real_nvml": bool(a.real), "windows": n, "idle_cpu_s": round(idle_cpu, 4), "idle_reads": idle_reads,
            "busy_cpu_s": round(busy_cpu, 4), "busy_reads": busy_reads,
            "cpu_ms_per_window": round((busy_cpu - idle_cpu) / n * 1e3, 3),
            "extra_reads_per_window": round((busy_reads - idle_reads) / n, 1)})


# -- child: per-call cost of NVML reads (real GPUs) -----------------------------------------------------
def child_nvml_costs(a: argparse.Namespace) -> None:
    """Wall and CPU time per call of each NVML read a meter might use, on GPU 0, plus the
    sampler's read rate and CPU with no window open."""
    import pynvml as n
    P, Cpu = time.perf_counter, time.process_time
    out: dict = {}
    t = P()
    n.nvmlInit()
    out["nvmlInit_ms"] = round((P() - t) * 1e3, 2)
    h = n.nvmlDeviceGetHandleByIndex(0)
    calls = {
        "TotalEnergyConsumption": lambda: n.nvmlDeviceGetTotalEnergyConsumption(h),
        "PowerUsage": lambda: n.nvmlDeviceGetPowerUsage(h),
        "FieldValues[POWER_INSTANT]": lambda: n.nvmlDeviceGetFieldValues(h, [n.NVML_FI_DEV_POWER_INSTANT]),
        "FieldValues[TOTAL_ENERGY]": lambda: n.nvmlDeviceGetFieldValues(h, [n.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION]),
        "Temperature": lambda: n.nvmlDeviceGetTemperature(h, 0),
    }
    for name, f in calls.items():
        try:
            f()
        except n.NVMLError as exc:
            out[name] = {"error": str(exc)}
            continue
        k = 300
        w, c = P(), Cpu()
        for _ in range(k):
            f()
        out[name] = {"wall_us": round((P() - w) / k * 1e6, 1), "cpu_us": round((Cpu() - c) / k * 1e6, 1)}
    from wattmeter.meter import Meter
    from wattmeter.sensors.nvml import NvmlSensor
    m = Meter([NvmlSensor()]).start()
    time.sleep(1.0)
    st = m.status["nvml"]
    r0, c0 = st.reads, Cpu()
    time.sleep(5)
    out["sampler_idle_reads_per_s"] = round((st.reads - r0) / 5, 1)
    out["sampler_idle_cpu_pct_of_core"] = round((Cpu() - c0) / 5 * 100, 2)
    m.close()
    n.nvmlShutdown()
    C.emit(out)


# -- children for first-window latency and RSS: tiny -c scripts (no harness imports) ---------------------
_STATUS = ("def _st():\n"
           "    o = {}\n"
           "    for line in open('/proc/self/status'):\n"
           "        k, _, v = line.partition(':')\n"
           "        if k in ('VmRSS', 'VmHWM', 'Threads'): o[k] = int(v.split()[0])\n"
           "    return o\n")
_FAKE = ("from wattmeter.sim import fake_nvml\n"
         "from wattmeter.sim.scenario import load_scenario\n"
         "fake_nvml.install(fake_nvml.FakeNVML(load_scenario('bursty')))\n")
STARTUP_SCRIPTS = {
    "bare": _STATUS + "import json, time\ntime.sleep(0.3)\nprint(json.dumps({'status': _st()}))\n",
    "fake-only": "import json, time\n" + _STATUS + _FAKE + "time.sleep(0.3)\nprint(json.dumps({'status': _st()}))\n",
    # wattmeter's default path: Meter() discovers the GPUs (fake from WATTMETER_FAKE_NVML), CPU and RAM.
    "wattmeter": ("import json, time\n" + _STATUS +
                  "p = time.perf_counter\nt0 = p()\nimport wattmeter\nfrom wattmeter.meter import Meter\nt1 = p()\n"
                  "m = Meter()\nt2 = p()\nm.start()\nt3 = p()\nw = m.window('first')\nt4 = p()\n"
                  "time.sleep(0.3)\nt5 = p()\nw.end()\nr = w.result()\nt6 = p()\n"
                  "gpu = sum(d.energy_j for d in r.devices if d.component.value == 'gpu')\n"
                  "print(json.dumps({'import_ms': (t1-t0)*1e3, 'construct_ms': (t2-t1)*1e3, 'start_ms': (t3-t2)*1e3,"
                  " 'window_ms': (t4-t3)*1e3, 'first_window_ms': (t4-t1)*1e3, 'settle_ms': (t6-t5)*1e3,"
                  " 'sensors': [s.name for s in m.sensors], 'gpu_j': gpu, 'status': _st()}))\nm.close()\n"),
    "wattmeter-gpu-only": ("import json, time\n" + _STATUS +
                           "p = time.perf_counter\nt0 = p()\nfrom wattmeter.meter import Meter\n"
                           "from wattmeter.discovery import SensorPlan, discover\nt1 = p()\n"
                           "m = Meter(discover(SensorPlan(fake_gpus=1, cpu='none', ram='none')).sensors)\nt2 = p()\n"
                           "m.start()\nt3 = p()\nw = m.window('first')\nt4 = p()\n"
                           "time.sleep(0.3)\nt5 = p()\nw.end()\nr = w.result()\nt6 = p()\n"
                           "print(json.dumps({'import_ms': (t1-t0)*1e3, 'construct_ms': (t2-t1)*1e3, 'start_ms': (t3-t2)*1e3,"
                           " 'window_ms': (t4-t3)*1e3, 'first_window_ms': (t4-t1)*1e3, 'settle_ms': (t6-t5)*1e3,"
                           " 'status': _st()}))\nm.close()\n"),
    # The same, with the fake NVML's own modules imported before the clock starts (a real GPU
    # machine imports pynvml instead; nvmlInit's own cost there is not simulated).
    "wattmeter-fake-preimported": ("import json, time\n" + _STATUS +
                  "import wattmeter.sim.fake_nvml, wattmeter.sim.scenario, wattmeter.sim.scenario_loader\n"
                  "p = time.perf_counter\nt0 = p()\nimport wattmeter\nfrom wattmeter.meter import Meter\nt1 = p()\n"
                  "m = Meter()\nt2 = p()\nm.start()\nt3 = p()\nw = m.window('first')\nt4 = p()\n"
                  "time.sleep(0.3)\nt5 = p()\nw.end()\nr = w.result()\nt6 = p()\n"
                  "print(json.dumps({'import_ms': (t1-t0)*1e3, 'construct_ms': (t2-t1)*1e3, 'start_ms': (t3-t2)*1e3,"
                  " 'window_ms': (t4-t3)*1e3, 'first_window_ms': (t4-t1)*1e3, 'settle_ms': (t6-t5)*1e3,"
                  " 'status': _st()}))\nm.close()\n"),
    # What `wattmeter run` builds: the sensors with this process tree's CPU/RAM shares (pid=...).
    "wattmeter-pid": ("import json, os, time\n" + _STATUS +
                      "p = time.perf_counter\nt0 = p()\nfrom wattmeter.meter import Meter\n"
                      "from wattmeter.discovery import SensorPlan, discover\nt1 = p()\n"
                      "m = Meter(discover(SensorPlan(fake_gpus=1, pid=os.getpid())).sensors)\nt2 = p()\n"
                      "m.start()\nt3 = p()\nw = m.window('first')\nt4 = p()\n"
                      "time.sleep(0.3)\nt5 = p()\nw.end()\nr = w.result()\nt6 = p()\n"
                      "print(json.dumps({'import_ms': (t1-t0)*1e3, 'construct_ms': (t2-t1)*1e3, 'start_ms': (t3-t2)*1e3,"
                      " 'window_ms': (t4-t3)*1e3, 'first_window_ms': (t4-t1)*1e3, 'settle_ms': (t6-t5)*1e3,"
                      " 'devices': [d.key for d in r.devices], 'status': _st()}))\nm.close()\n"),
    "zeus": ("import json, time\n" + _STATUS + _FAKE +
             "p = time.perf_counter\nt0 = p()\nfrom zeus.monitor import ZeusMonitor\nt1 = p()\n"
             "zm = ZeusMonitor(gpu_indices=[0], cpu_indices=[])\nt2 = p()\n"
             "zm.begin_window('first', sync_execution=False)\nt4 = p()\ntime.sleep(0.3)\n"
             "zm.end_window('first', sync_execution=False)\n"
             "print(json.dumps({'import_ms': (t1-t0)*1e3, 'construct_ms': (t2-t1)*1e3, 'first_window_ms': (t4-t1)*1e3,"
             " 'status': _st()}))\n"),
    "codecarbon": ("import json, time\n" + _STATUS + _FAKE +
                   "p = time.perf_counter\nt0 = p()\nfrom codecarbon import OfflineEmissionsTracker\nt1 = p()\n"
                   "tr = OfflineEmissionsTracker(country_iso_code='USA', measure_power_secs=1, log_level='error',"
                   " save_to_file=False, allow_multiple_runs=True)\nt2 = p()\ntr.start()\nt4 = p()\ntime.sleep(0.3)\n"
                   "tr.stop()\n"
                   "print(json.dumps({'import_ms': (t1-t0)*1e3, 'construct_ms': (t2-t1)*1e3, 'first_window_ms': (t4-t1)*1e3,"
                   " 'status': _st()}))\n"),
}


# -- parent -----------------------------------------------------------------------------------------------
def _env(extra: dict | None = None, path_prefix: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_") and k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _stub_nvidia_smi(tmp: str) -> str:
    """CodeCarbon decides whether a machine has NVIDIA GPUs by running `nvidia-smi --help`;
    its processes get a stub that exits 0, so it goes on to read the (fake) pynvml."""
    d = os.path.join(tmp, "stubbin")
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "nvidia-smi")
    with open(p, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(p, 0o755)
    return d


def _have(module: str) -> str | None:
    """None if importable in a child, else the reason."""
    p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=_env())
    if p.returncode == 0:
        return None
    return (p.stderr.strip().splitlines() or ["import failed"])[-1]


def _summ_records(recs: list[dict]) -> dict:
    errs = [r["err_pct"] for r in recs if r["err_pct"] is not None]
    floors = [abs(r["sensor_floor_err_pct"]) for r in recs if r.get("sensor_floor_err_pct") is not None]
    models = [abs(r["step_model_err_pct"]) for r in recs if r.get("step_model_err_pct") is not None]
    extra = {"sensor_floor_abs_err_pct": C.summarize(floors, 3)} if floors else {}
    if models:
        extra["step_model_abs_err_pct"] = C.summarize(models, 3)
    return {"n": len(recs), "abs_err_pct": C.summarize([abs(e) for e in errs], 3), **extra,
            "signed_err_pct_median": round(C.median(errs), 3) if errs else None,
            "start_call_ms": C.summarize([r["start_call_ms"] for r in recs], 3),
            "stop_call_ms": C.summarize([r["stop_call_ms"] for r in recs], 3),
            "approximate_flagged": sum(1 for r in recs if r.get("approximate"))}


def phase_accuracy(kind: str, n: int, n_cold: int, tmp: str, have: dict, log_dir: str) -> dict:
    t0 = time.monotonic() + 1.0   # scenario t=0, shared by every child through CLOCK_MONOTONIC
    ngpus = 2 if kind.startswith("counter") else 3
    base = [sys.executable, HERE, "--case", "accuracy", "--scenario", kind, "--t0", repr(t0)]
    argvs, envs = {}, {}
    argvs["wm-live"] = base + ["--meter", "wm-live", "--jobs", str(n)]
    argvs["wm-fresh"] = base + ["--meter", "wm-fresh", "--jobs", str(n)]
    if have["zeus"] is None:
        argvs["zeus"] = base + ["--meter", "zeus", "--jobs", str(n)]
    if have["codecarbon"] is None and kind != "counter_h100clock":   # CodeCarbon: the main run is enough
        stub = _stub_nvidia_smi(tmp)
        for g in range(ngpus):
            for mode, jobs in (("cc-cold", n_cold), ("cc-warm", n)):
                name = f"{mode}-g{g}"
                argvs[name] = base + ["--meter", mode, "--jobs", str(jobs), "--gpus", str(g)]
                envs[name] = _env(path_prefix=stub)
    out = C.run_children_in_step(argvs, env=_env(), envs=envs, timeout=400, log_dir=log_dir)
    # Merge per-GPU CodeCarbon children into one meter each.
    merged: dict[str, dict] = {}
    for name, res in out.items():
        key = name.rsplit("-g", 1)[0] if name.startswith("cc-") else name
        m = merged.setdefault(key, {"label": res.get("label", key), "records": [], "failures": [], "notes": [],
                                    "cpu_s": [], "rss_kb": []})
        if "error" in res:
            m["failures"].append(f"{name}: {res['error']}")
            continue
        m["records"].extend(res["records"])
        if res.get("failure"):
            m["failures"].append(res["failure"] if not name.startswith("cc-") else f"{name}: {res['failure']}")
        for note in res.get("notes", []):
            if note not in m["notes"]:
                m["notes"].append(note)
        m["cpu_s"].append(res.get("cpu_s"))
        m["rss_kb"].append(res.get("status", {}).get("VmRSS"))
    summary: dict = {}
    for meter, m in merged.items():
        by_case: dict = {}
        for case in sorted({r["case"] for r in m["records"]}):
            rc = [r for r in m["records"] if r["case"] == case]
            entry = {"all": _summ_records(rc)}
            for g in sorted({r["gpu"] for r in rc}):
                entry[f"gpu{g}"] = {"trace": TRACE_LABELS[kind][g], **_summ_records([r for r in rc if r["gpu"] == g])}
            by_case[case] = entry
        summary[meter] = {"label": m["label"], "cases": by_case, "failures": m["failures"], "notes": m["notes"],
                          "records": m["records"]}
    if have["zeus"] is not None:
        summary["zeus"] = {"label": "Zeus", "cases": {}, "failures": [f"not measured: {have['zeus']}"], "notes": [], "records": []}
    if have["codecarbon"] is not None and kind != "counter_h100clock":
        summary["cc-cold"] = {"label": "CodeCarbon", "cases": {}, "failures": [f"not measured: {have['codecarbon']}"],
                              "notes": [], "records": []}
    return summary


def _driver_split(r: dict, pct: float) -> dict:
    """The meter's CPU less the time inside the simulated driver (its own), and that plus what
    the same calls cost on an H100 (calls with no measured H100 cost are listed, not priced)."""
    if "driver_cpu_s" not in r or not r.get("wall_s"):
        return {}
    wall = r["wall_s"]
    own = pct - r["driver_cpu_s"] / wall * 100.0
    calls = r.get("driver_calls", {})
    h100 = sum(n / wall * H100_CALL_CPU_US[f] / 1e4 for f, n in calls.items() if f in H100_CALL_CPU_US)
    return {"driver_pct_of_core": round(r["driver_cpu_s"] / wall * 100.0, 3), "own_pct_of_core": round(own, 3),
            "h100_projected_pct_of_core": round(own + h100, 3),
            "calls_per_s": {f: round(n / wall, 2) for f, n in sorted(calls.items())},
            "unpriced_calls": sorted(f for f in calls if f not in H100_CALL_CPU_US)}


def phase_overhead(seconds: float, have: dict, tmp: str, log_dir: str, real: bool = False) -> dict:
    argvs, envs = {}, {}
    for meter in ("baseline", "wattmeter") if real else ("baseline", "wattmeter", *SENSOR_ROWS, "wattmeter-discover",
                                                          "zeus", "codecarbon"):
        if meter in ("zeus", "codecarbon") and have[meter] is not None:
            continue
        argvs[meter] = [sys.executable, HERE, "--case", "overhead", "--meter", meter, "--ngpus", "8",
                        "--seconds", str(seconds)] + (["--real"] if real else [])
        if meter == "codecarbon":
            envs[meter] = _env(path_prefix=_stub_nvidia_smi(tmp))
    # Three rounds, each meter's median round reported: one 10 s round on a shared 2-core
    # machine moved this figure between 0.45 % and 0.9 % from run to run.
    rounds = []
    for _ in range(1 if real else 3):
        res = C.run_children_in_step(argvs, env=_env(), envs=envs, timeout=seconds + STEADY_S + 120, log_dir=log_dir)
        base = res.get("baseline", {})
        base_cpu = base.get("cpu_s", 0.0) if "error" not in base else 0.0
        meters = {}
        for meter, r in res.items():
            if "error" in r:
                meters[meter] = {"error": r["error"]}
                continue
            pct = (r["cpu_s"] - (base_cpu if meter != "baseline" else 0.0)) / r["wall_s"] * 100.0
            meters[meter] = {**r, "cpu_pct_of_core": round(pct, 3), **_driver_split(r, pct)}
        rounds.append((base_cpu, meters))
    out = {"seconds": seconds, "ngpus": "all real" if real else 8, "rounds": len(rounds),
           "baseline_cpu_s": [b for b, _ in rounds], "meters": {}}
    for meter in rounds[0][1]:
        ok = sorted((m[meter] for _, m in rounds if "cpu_pct_of_core" in m.get(meter, {})),
                    key=lambda r: r["cpu_pct_of_core"])
        if not ok:
            out["meters"][meter] = rounds[0][1][meter]
            continue
        out["meters"][meter] = {**ok[len(ok) // 2], "cpu_pct_of_core_rounds": [r["cpu_pct_of_core"] for r in ok]}
    return out


def phase_startup_rss(runs: dict, tmp: str, have: dict, log_dir: str, real: bool = False) -> dict:
    scen = os.path.join(REPO, "agent", "scenarios", "bursty.toml")
    scripts = dict(STARTUP_SCRIPTS)
    if real:   # the machine's own GPUs: no fake, no competitors
        scripts = {k: v.replace("fake_gpus=1, ", "") for k, v in scripts.items()
                   if k in ("bare", "wattmeter", "wattmeter-gpu-only", "wattmeter-pid")}
        runs = {k: v for k, v in runs.items() if k in scripts}
    results: dict = {}
    order = ["bare", "fake-only", "wattmeter", "wattmeter-gpu-only", "wattmeter-fake-preimported", "wattmeter-pid",
             "zeus", "codecarbon"]
    stub = _stub_nvidia_smi(tmp)
    for i in range(max(runs.values())):
        for name in order:
            if i >= runs.get(name, 0) or name not in scripts:
                continue
            if name in ("zeus", "codecarbon") and have[name] is not None:
                continue
            env = _env({"WATTMETER_FAKE_NVML": scen} if name in ("wattmeter", "wattmeter-fake-preimported") and not real
                       else None,
                       path_prefix=stub if name == "codecarbon" else None)
            p = subprocess.run([sys.executable, "-c", scripts[name]], capture_output=True, text=True,
                               env=env, cwd=tmp, timeout=120)
            with open(os.path.join(log_dir, f"startup-{name}.stderr"), "a") as f:
                f.write(p.stderr)
            if p.returncode != 0:
                results.setdefault(name, []).append({"error": p.stderr[-1500:]})
                continue
            results.setdefault(name, []).append(json.loads(p.stdout.strip().splitlines()[-1]))
    out: dict = {}
    for name, rs in results.items():
        ok = [r for r in rs if "error" not in r]
        entry: dict = {"runs": len(rs), "errors": [r["error"] for r in rs if "error" in r]}
        for key in ("import_ms", "construct_ms", "start_ms", "window_ms", "first_window_ms", "settle_ms"):
            vals = [r[key] for r in ok if key in r]
            if vals:
                entry[key] = round(C.median(vals), 2)
                entry[key + "_max"] = round(max(vals), 2)
        rss = [r["status"].get("VmRSS", 0) for r in ok]
        hwm = [r["status"].get("VmHWM", 0) for r in ok]
        if rss:
            entry["vmrss_kb"] = int(C.median(rss))
            entry["vmhwm_kb"] = int(C.median(hwm))
        for key in ("sensors", "devices"):
            if ok and key in ok[0]:
                entry[key] = ok[0][key]
        out[name] = entry
    bare = out.get("bare", {}).get("vmrss_kb")
    fake = out.get("fake-only", {}).get("vmrss_kb")
    for name, e in out.items():
        if bare and "vmrss_kb" in e:
            e["rss_above_bare_mb"] = round((e["vmrss_kb"] - bare) / 1024, 1)
            e["hwm_above_bare_mb"] = round((e["vmhwm_kb"] - bare) / 1024, 1)
        if fake and "vmrss_kb" in e and name in ("zeus", "codecarbon"):
            e["rss_above_fake_only_mb"] = round((e["vmrss_kb"] - fake) / 1024, 1)
    return out


def phase_window_latency(n: int, have: dict, log_dir: str, real: bool = False) -> dict:
    out = {}
    cases = [("wattmeter", 1, n), ("wattmeter", 8, n)] if not real else [("wattmeter", 1, n)]
    if have["zeus"] is None and not real:
        cases.append(("zeus", 1, min(n, 3000)))
    for meter, ngpus, count in cases:
        argv = [sys.executable, HERE, "--case", "window-latency", "--meter", meter, "--ngpus", str(ngpus), "--n", str(count)]
        argv += ["--real"] if real else []
        try:
            out[f"{meter}-{ngpus}gpu"] = C.run_child(argv, env=_env(), timeout=180,
                                                     log_path=os.path.join(log_dir, "window-latency.stderr"))
        except Exception as exc:
            out[f"{meter}-{ngpus}gpu"] = {"error": str(exc)}
    return out


def _wattmeter_exe() -> list[str]:
    cand = os.path.join(os.path.dirname(sys.executable), "wattmeter")
    if os.access(cand, os.X_OK):
        return [cand]
    found = shutil.which("wattmeter")
    return [found] if found else [sys.executable, "-m", "wattmeter"]


def phase_run_overhead(n: int, tmp: str, real: bool = False) -> dict:
    records = os.path.join(tmp, "records.jsonl")
    wm = _wattmeter_exe()
    cmds = {
        "bare": ["true"],
        "wattmeter_run": wm + ["run"] + ([] if real else ["--fake-gpus", "1"]) + ["--records", records, "--", "true"],
        "python_-c_pass": [sys.executable, "-c", "pass"],
        "python_import_cli": [sys.executable, "-c", "import wattmeter.cli as c; c.build_parser()"],
    }
    env = _env()
    times: dict[str, list[float]] = {k: [] for k in cmds}
    failures = []
    for i in range(n):
        names = list(cmds)
        if i % 2:
            names.reverse()     # interleaved, alternating order
        for name in names:
            t = time.perf_counter()
            p = subprocess.run(cmds[name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp)
            dt = time.perf_counter() - t
            if p.returncode != 0:
                failures.append(f"{name}: exit {p.returncode}: {p.stderr.decode()[-500:]}")
            times[name].append(dt * 1e3)
    med = {k: round(C.median(v), 2) for k, v in times.items()}
    diffs = [a - b for a, b in zip(times["wattmeter_run"], times["bare"])]
    return {"runs": n, "command": " ".join(cmds["wattmeter_run"]).replace(tmp, "$TMP"), "median_ms": med,
            "overhead_ms_median": round(med["wattmeter_run"] - med["bare"], 2),
            "overhead_ms_paired": C.summarize(diffs, 2), "failures": failures[:5],
            "all_ms": {k: [round(x, 1) for x in v] for k, v in times.items()}}


# -- report ------------------------------------------------------------------------------------------------
TARGETS = {
    "counter_ge1s": 0.5, "power_ge1s": 2.0, "counter_0.7s": 5.0,
    "sampler_cpu_pct": 0.5, "window_us": 20.0, "run_overhead_ms": 300.0, "first_window_ms": 50.0, "rss_mb": 40.0,
}


def _ok(value, target) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "PASS" if value <= target else "MISS"


def build_table(res: dict) -> list[dict]:
    rows = []
    acc = res.get("accuracy", {})

    def err_row(case, what, scen, meter="wm-live", gpu=None):
        m = acc.get(scen, {}).get(meter, {})
        c = m.get("cases", {}).get(case, {})
        part = c.get(gpu or "all", {})
        e = part.get("abs_err_pct", {})
        f = part.get("sensor_floor_abs_err_pct", {})
        med, p90, mx = e.get("median"), e.get("p90"), e.get("max")
        status = _ok(p90, TARGETS[case]) if p90 is not None else "n/a"
        floor = None if not f else f"median {f['median']:.2f} %, p90 {f['p90']:.2f} %"
        if status == "MISS" and f and scen == "power" and f["median"] > TARGETS[case]:
            status = "MISS (sensor floor)"
        rows.append({"what": what, "target": f"<= {TARGETS[case]} %",
                     "value": None if med is None else f"median {med:.2f} %, p90 {p90:.2f} %, max {mx:.2f} % (n={e.get('n')})",
                     "status": status, "floor": floor,
                     "signed_median": part.get("signed_err_pct_median")})

    err_row("counter_ge1s", "GPU energy error, counter path, 1.0-1.5 s jobs (meter running)", "counter")
    err_row("counter_ge1s", "GPU energy error, counter path, 1.0-1.5 s jobs (new meter per job)", "counter", "wm-fresh")
    err_row("power_ge1s", "GPU energy error, power-only, bursty (H100 field 186)", "power", gpu="gpu0")
    err_row("power_ge1s", "GPU energy error, power-only, bursty (A100 GetPowerUsage only)", "power", gpu="gpu2")
    err_row("power_ge1s", "GPU energy error, power-only, step-up after start", "power", gpu="gpu1")
    err_row("counter_0.7s", "GPU energy error, 0.7 s job, counter path (meter running)", "counter")
    err_row("counter_0.7s", "GPU energy error, 0.7 s job, counter path (new meter per job)", "counter", "wm-fresh")
    err_row("counter_ge1s", "Robustness: counter path, 1.0-1.5 s, H100 refresh clock (99.97 ms +-2.5 ms), meter running",
            "counter_h100clock")
    err_row("counter_ge1s", "Robustness: same, new meter per job", "counter_h100clock", "wm-fresh")
    err_row("counter_ge1s", "Robustness: same, Zeus (for comparison)", "counter_h100clock", "zeus")
    ov = res.get("overhead", {}).get("meters", {}).get("wattmeter", {})
    v = ov.get("cpu_pct_of_core")
    rows.append({"what": "Sampler CPU, 8 fake GPUs at 10 Hz", "target": "<= 0.5 % of one core",
                 "value": None if v is None else f"{v:.3f} % of one core" + _split_text(ov),
                 "status": _ok(v, TARGETS["sampler_cpu_pct"])})
    h = ov.get("h100_projected_pct_of_core")
    if h is not None:
        rows.append({"what": "Sampler CPU, 8 GPUs, projected on H100 call costs (own CPU + the same calls at "
                             "the driver's measured cost)", "target": "<= 0.5 % of one core",
                     "value": f"{h:.3f} % of one core", "status": _ok(h, TARGETS["sampler_cpu_pct"])})
    ovp = res.get("overhead", {}).get("meters", {}).get("wattmeter-power", {})
    v = ovp.get("cpu_pct_of_core")
    rows.append({"what": "Sampler CPU, 8 fake power-only GPUs (no counter; every 20 ms field-186 box read)",
                 "target": "<= 0.5 % of one core",
                 "value": None if v is None else f"{v:.3f} % of one core" + _split_text(ovp),
                 "status": _ok(v, TARGETS["sampler_cpu_pct"])})
    for meter, what in (("wattmeter-h100", "8 fake H100s as measured (counter clock 99.97 ms +-2.5 ms, 3.5 ms counter calls)"),
                        ("wattmeter-sample", "same, field 186 as 100 ms samples stamped at the read"),
                        ("wattmeter-slow", "8 fake GPUs at `--interval 0.5`"),
                        ("wattmeter-power-slow", "8 fake power-only GPUs at `--interval 0.5`"),
                        ("wattmeter-idle", "8 fake idle GPUs (quiet: power within a band for 5 s)"),
                        ("wattmeter-power-idle", "8 fake idle power-only GPUs (quiet)")):
        ovx = res.get("overhead", {}).get("meters", {}).get(meter, {})
        v = ovx.get("cpu_pct_of_core")
        h = ovx.get("h100_projected_pct_of_core")
        rows.append({"what": f"Sampler CPU, {what}", "target": "<= 0.5 % of one core",
                     "value": None if v is None else f"{v:.3f} % of one core" + _split_text(ovx) +
                     ("" if h is None else f"; {h:.3f} % at H100 call costs"),
                     "status": _ok(v if h is None else max(v or 0.0, h), TARGETS["sampler_cpu_pct"])})
    v = res.get("overhead", {}).get("meters", {}).get("wattmeter-discover", {}).get("cpu_pct_of_core")
    rows.append({"what": "Sampler CPU, 8 fake GPUs at 10 Hz, as discover() wires it (NVML deadlines)",
                 "target": "<= 0.5 % of one core",
                 "value": None if v is None else f"{v:.3f} % of one core", "status": _ok(v, TARGETS["sampler_cpu_pct"])})
    wl = res.get("window_latency", {}).get("wattmeter-1gpu", {})
    v = wl.get("median_us")
    rows.append({"what": "Window begin+end, median (1 GPU)", "target": "<= 20 us",
                 "value": None if v is None else f"{v:.2f} us (p90 {wl.get('p90_us')}, p99 {wl.get('p99_us')})",
                 "status": _ok(v, TARGETS["window_us"])})
    wl8 = res.get("window_latency", {}).get("wattmeter-8gpu", {})
    v8 = wl8.get("median_us")
    rows.append({"what": "Window begin+end, median (8 GPUs)", "target": "<= 20 us",
                 "value": None if v8 is None else f"{v8:.2f} us (p90 {wl8.get('p90_us')}, p99 {wl8.get('p99_us')})",
                 "status": _ok(v8, TARGETS["window_us"])})
    ro = res.get("run_overhead", {})
    v = ro.get("overhead_ms_median")
    rows.append({"what": "`wattmeter run` start-up overhead over the bare command", "target": "<= 300 ms",
                 "value": None if v is None else f"{v:.0f} ms", "status": _ok(v, TARGETS["run_overhead_ms"])})
    su = res.get("startup_rss", {})
    v = su.get("wattmeter", {}).get("first_window_ms")
    rows.append({"what": "First window's start (Meter() with discovery + start + window)", "target": "<= 50 ms",
                 "value": None if v is None else f"{v:.1f} ms", "status": _ok(v, TARGETS["first_window_ms"])})
    v = su.get("wattmeter", {}).get("rss_above_bare_mb")
    rows.append({"what": "RSS above a bare Python (imports, runs a window)", "target": "<= 40 MB",
                 "value": None if v is None else f"{v:.1f} MB", "status": _ok(v, TARGETS["rss_mb"])})
    real = res.get("real_gpu")
    if real:
        gpu = (real.get("nvidia_smi") or "real GPU").split(",")[0]
        ov = real.get("overhead", {}).get("meters", {}).get("wattmeter", {})
        v = ov.get("cpu_pct_of_core")
        rows.append({"what": f"Sampler CPU, real {gpu} (1 GPU) at 10 Hz", "target": "<= 0.5 % of one core",
                     "value": None if v is None else f"{v:.2f} % of one core (counter read {ov.get('counter_call_cpu_us')} us CPU)",
                     "status": _ok(v, TARGETS["sampler_cpu_pct"])})
        wl = real.get("window_latency", {}).get("wattmeter-1gpu", {})
        v = wl.get("median_us")
        rows.append({"what": f"Window begin+end, median, real {gpu}", "target": "<= 20 us",
                     "value": None if v is None else f"{v:.2f} us", "status": _ok(v, TARGETS["window_us"])})
        ro = real.get("run_overhead", {})
        v = ro.get("overhead_ms_median")
        rows.append({"what": f"`wattmeter run` overhead, real {gpu}", "target": "<= 300 ms",
                     "value": None if v is None else f"{v:.0f} ms", "status": _ok(v, TARGETS["run_overhead_ms"])})
        su = real.get("startup_rss", {}).get("wattmeter", {})
        v = su.get("first_window_ms")
        rows.append({"what": f"First window's start, real {gpu}", "target": "<= 50 ms",
                     "value": None if v is None else f"{v:.1f} ms", "status": _ok(v, TARGETS["first_window_ms"])})
        v = su.get("rss_above_bare_mb")
        rows.append({"what": f"RSS above a bare Python, real {gpu}", "target": "<= 40 MB",
                     "value": None if v is None else f"{v:.1f} MB", "status": _ok(v, TARGETS["rss_mb"])})
    return rows


def _split_text(ov: dict) -> str:
    if "own_pct_of_core" not in ov:
        return ""
    calls = ", ".join(f"{f.replace('nvmlDevice', '')} {n:g}/s" for f, n in ov.get("calls_per_s", {}).items())
    return (f" (wattmeter's own {ov['own_pct_of_core']:.3f} %, inside the simulated driver "
            f"{ov['driver_pct_of_core']:.3f} %; calls: {calls})")


def comparison(res: dict) -> list[dict]:
    """Per meter: error per case, start-call latency, CPU, RSS."""
    acc = res.get("accuracy", {})
    ov = res.get("overhead", {}).get("meters", {})
    su = res.get("startup_rss", {})
    rows = []
    names = [("wm-live", "wattmeter", "wattmeter"), ("wm-fresh", "wattmeter", "wattmeter"),
             ("zeus", "zeus", "zeus"), ("cc-cold", "codecarbon", "codecarbon"), ("cc-warm", "codecarbon", "codecarbon")]
    for key, ovkey, sukey in names:
        row: dict = {"meter": key}
        for scen, case in (("counter", "counter_ge1s"), ("counter", "counter_0.7s"), ("power", "power_ge1s")):
            m = acc.get(scen, {}).get(key)
            if not m:
                continue
            row["label"] = m.get("label")
            c = m.get("cases", {}).get(case)
            if c:
                row[case] = {g: {"median": c[g]["abs_err_pct"].get("median"), "p90": c[g]["abs_err_pct"].get("p90"),
                                 "max": c[g]["abs_err_pct"].get("max"), "signed_median": c[g].get("signed_err_pct_median"),
                                 "n": c[g]["abs_err_pct"].get("n")}
                             for g in c}
                row.setdefault("start_call_ms", c["all"]["start_call_ms"].get("median"))
            elif m.get("failures"):
                row[case] = {"failure": m["failures"][0]}
        o = ov.get(ovkey, {})
        if key in ("wm-live", "zeus", "cc-cold") and "cpu_pct_of_core" in o:
            row["cpu_pct_8gpu"] = o["cpu_pct_of_core"]
            row["cpu_pct_8gpu_h100"] = o.get("h100_projected_pct_of_core")
        s = su.get(sukey, {})
        if key in ("wm-live", "zeus", "cc-cold"):
            row["first_start_ms"] = s.get("first_window_ms")
            row["import_ms"] = s.get("import_ms")
            row["rss_above_bare_mb"] = s.get("rss_above_bare_mb")
            row["rss_above_fake_only_mb"] = s.get("rss_above_fake_only_mb")
        rows.append(row)
    return rows


def print_report(res: dict) -> None:
    print()
    print("| What | Target | Measured | Status | Sensor floor (abs err) |")
    print("|---|---|---|---|---|")
    for r in res["table"]:
        print(f"| {r['what']} | {r['target']} | {r['value'] or 'n/a'} | {r['status']} | {r.get('floor') or ''} |")
    print()
    print("Side by side (abs error %, median / p90 over jobs and both traces; start call ms; CPU % of a core, 8 GPUs, "
          "and projected with H100 driver call costs; RSS MB above bare python):")
    for r in res["comparison"]:
        def e(case):
            v = r.get(case)
            if not v:
                return "-"
            if "failure" in v:
                return "raises"
            a = v.get("all", {})
            return f"{C.fmt(a.get('median'), '', 2)}/{C.fmt(a.get('p90'), '', 2)}"
        print(f"  {r['meter']:9s} >=1s {e('counter_ge1s'):>13s}  0.7s {e('counter_0.7s'):>13s}  power {e('power_ge1s'):>13s}"
              f"  start {C.fmt(r.get('start_call_ms'), 'ms', 1):>10s}  cpu {C.fmt(r.get('cpu_pct_8gpu'), '%', 3):>8s}"
              f" (H100 calls {C.fmt(r.get('cpu_pct_8gpu_h100'), '%', 3)})"
              f"  rss {C.fmt(r.get('rss_above_bare_mb'), 'MB', 1):>8s}")


def make_snapshot(rev: str, dest: str) -> str:
    """A frozen copy of the package to measure while others keep editing the tree: tracked files
    of agent/ and exporters/ as of ``rev``, plus files git does not track yet (new modules),
    laid out as an importable ``wattmeter`` package. Returns the folder for PYTHONPATH."""
    import tarfile
    src = os.path.join(dest, "src")
    os.makedirs(src)
    arch = os.path.join(dest, "src.tar")
    subprocess.run(["git", "archive", "--format=tar", "-o", arch, rev, "agent", "exporters"], cwd=REPO, check=True)
    with tarfile.open(arch) as t:
        t.extractall(src)
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "agent", "exporters"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()
    for rel in untracked:
        target = os.path.join(src, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), target)
    site = os.path.join(dest, "site")
    os.makedirs(site)
    shutil.copytree(os.path.join(src, "agent"), os.path.join(site, "wattmeter"))
    shutil.copytree(os.path.join(src, "exporters"), os.path.join(site, "wattmeter", "exporters"))
    # As `pip install` does: an installed package carries its bytecode. Without it every
    # child compiles each module from source (~25 ms more start-up where
    # PYTHONDONTWRITEBYTECODE is set), which no installed copy pays.
    import compileall
    compileall.compile_dir(os.path.join(site, "wattmeter"), quiet=1)
    return site


def _imported_package_dir() -> str:
    """Where children import ``wattmeter`` from (the editable tree, or a --snapshot)."""
    p = subprocess.run([sys.executable, "-c", "import os, wattmeter; print(os.path.dirname(wattmeter.__file__))"],
                       capture_output=True, text=True, env=_env())
    return p.stdout.strip() or os.path.join(REPO, "agent")


def _tree_hash(pkg_dir: str | None = None) -> str:
    """Hash of the wattmeter sources the children import: pins the code measured."""
    import hashlib
    h = hashlib.sha256()
    pkg_dir = pkg_dir or _imported_package_dir()
    exp = os.path.join(pkg_dir, "exporters")
    tops = [pkg_dir] + ([] if os.path.isdir(exp) else [os.path.join(REPO, "exporters")])
    for top in tops:
        for root, dirs, files in sorted(os.walk(top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".toml", ".json", ".csv")):
                    path = os.path.join(root, name)
                    h.update(os.path.relpath(path, top).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()[:16]


def main_parent(a: argparse.Namespace) -> None:
    started = time.monotonic()
    quick = a.quick
    n_jobs = 4 if quick else 12
    n_cold = 2 if quick else 6
    cpu_s = 4.0 if quick else 10.0
    tmp = tempfile.mkdtemp(prefix="wattmeter-bench-")
    log_dir = os.path.join(tmp, "logs")
    os.makedirs(log_dir)
    res: dict = {"machine": C.machine_info(), "quick": quick, "targets": TARGETS}
    if a.snapshot:
        site = make_snapshot(a.snapshot, os.path.join(tmp, "snapshot"))
        os.environ["PYTHONPATH"] = site + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
        res["snapshot"] = {"rev": a.snapshot, "site": site,
                           "note": "tracked agent/ and exporters/ files at rev + untracked files, imported via PYTHONPATH"}
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "agent", "exporters"], capture_output=True,
                                    text=True, cwd=REPO).stdout.strip())
        res["git"] = {"head": rev, "agent_dirty_in_working_tree": dirty}
    except OSError:
        pass
    res.setdefault("git", {})["package_dir"] = _imported_package_dir()
    res["git"]["package_sha256"] = _tree_hash()
    have = {"zeus": _have("zeus.monitor"), "codecarbon": _have("codecarbon")}
    res["competitors"] = {k: (v or "importable") for k, v in have.items()}

    only = set(a.only.split(",")) if a.only else None

    def step(name, fn, *args):
        if only is not None and name not in only:
            return
        t = time.monotonic()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            res[name] = fn(*args)
        except Exception as exc:   # keep the rest of the run
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[bench] {name} done in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)

    res["accuracy"] = {}
    for kind in ("counter", "counter_h100clock", "power") if only is None or "accuracy" in only else ():
        t = time.monotonic()
        print(f"[bench] accuracy/{kind} ...", file=sys.stderr, flush=True)
        try:
            res["accuracy"][kind] = phase_accuracy(kind, n_jobs, n_cold, tmp, have, log_dir)
        except Exception as exc:
            res["accuracy"][kind] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[bench] accuracy/{kind} done in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    step("overhead", phase_overhead, cpu_s, have, tmp, log_dir)
    step("window_latency", phase_window_latency, 2000 if quick else 10000, have, log_dir)
    step("window_cpu", lambda: C.run_child([sys.executable, HERE, "--case", "window-cpu"], env=_env(), timeout=120))
    step("startup_rss", phase_startup_rss,
         {"bare": 3, "fake-only": 3, "wattmeter": 3 if quick else 7, "wattmeter-gpu-only": 3 if quick else 5,
          "wattmeter-fake-preimported": 3 if quick else 5, "wattmeter-pid": 3 if quick else 5,
          "zeus": 2 if quick else 3, "codecarbon": 2 if quick else 3}, tmp, have, log_dir)
    step("run_overhead", phase_run_overhead, 4 if quick else 10, tmp)
    if a.attach_real:
        with open(a.attach_real, encoding="utf-8") as f:
            res["real_gpu"] = json.load(f)
    res["table"] = build_table(res)
    res["comparison"] = comparison(res)
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    res["git"]["package_sha256_at_end"] = _tree_hash()
    if res["git"]["package_sha256_at_end"] != res["git"]["package_sha256"]:
        print("[bench] WARNING: the measured package changed during the run (use --snapshot)", file=sys.stderr)
    res["logs"] = log_dir
    name = "core.json" if only is None else f"core-{'-'.join(sorted(only))}.json"
    out = a.out or (os.path.join(C.RESULTS_DIR, name) if not quick
                    else os.path.join(tempfile.gettempdir(), "wattmeter-" + name.replace(".json", "-quick.json")))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, sort_keys=False)
        f.write("\n")
    print_report(res)
    print(f"\nwrote {os.path.relpath(out, os.getcwd())} in {res['elapsed_s']} s (child logs in {log_dir})")


def main_real(a: argparse.Namespace) -> None:
    """The fake-independent measurements, on this machine's real GPUs (run on a GPU host)."""
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="wattmeter-bench-real-")
    log_dir = os.path.join(tmp, "logs")
    os.makedirs(log_dir)
    res: dict = {"machine": C.machine_info(), "mode": "real NVML"}
    try:
        res["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        res["nvidia_smi"] = f"unavailable: {exc}"
    have = {"zeus": "skipped in --real", "codecarbon": "skipped in --real"}
    for key, argv in (("nvml_costs", ["--case", "nvml-costs"]), ("window_cpu", ["--case", "window-cpu", "--real"])):
        try:
            res[key] = C.run_child([sys.executable, HERE] + argv, env=_env(), timeout=120)
        except Exception as exc:
            res[key] = {"error": str(exc)}
    for name, fn, args in (("overhead", phase_overhead, (10.0, have, tmp, log_dir, True)),
                           ("window_latency", phase_window_latency, (10000, have, log_dir, True)),
                           ("startup_rss", phase_startup_rss, ({"bare": 3, "wattmeter": 5, "wattmeter-gpu-only": 5,
                                                                "wattmeter-pid": 3}, tmp, have, log_dir, True)),
                           ("run_overhead", phase_run_overhead, (7, tmp, True))):
        t = time.monotonic()
        try:
            res[name] = fn(*args)
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[bench] {name} done in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    out = a.out or os.path.join(tempfile.gettempdir(), "wattmeter-core-real.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    ov = res.get("overhead", {}).get("meters", {}).get("wattmeter", {})
    wl = res.get("window_latency", {}).get("wattmeter-1gpu", {})
    su = res.get("startup_rss", {}).get("wattmeter", {})
    ro = res.get("run_overhead", {})
    print(json.dumps({"gpus": res.get("nvidia_smi"), "sampler_cpu_pct": ov.get("cpu_pct_of_core"),
                      "counter_call_wall_us": ov.get("counter_call_wall_us"), "counter_call_cpu_us": ov.get("counter_call_cpu_us"),
                      "window_median_us": wl.get("median_us"), "first_window_ms": su.get("first_window_ms"),
                      "construct_ms": su.get("construct_ms"), "rss_above_bare_mb": su.get("rss_above_bare_mb"),
                      "run_overhead_ms": ro.get("overhead_ms_median"), "window_cpu": res.get("window_cpu"),
                      "nvml_costs": res.get("nvml_costs")}, indent=1))
    print(f"wrote {out} in {res['elapsed_s']} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer jobs and shorter runs (not for the docs)")
    ap.add_argument("--out", default=None, help="result file (default bench/results/core.json)")
    ap.add_argument("--real", action="store_true",
                    help="overhead, latency, start-up and memory on this machine's real GPUs (no fake, no competitors)")
    ap.add_argument("--snapshot", default=None, metavar="REV",
                    help="measure a frozen copy of the package at git REV (plus untracked files) instead of the live tree")
    ap.add_argument("--attach-real", default=None, metavar="JSON",
                    help="include a --real run's result file (from a GPU host) in core.json under 'real_gpu'")
    ap.add_argument("--only", default=None, metavar="PHASES",
                    help="run only these phases (comma list of accuracy, overhead, window_latency, window_cpu, "
                         "startup_rss, run_overhead); writes bench/results/core-PHASES.json")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--meter", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scenario", default="counter", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=12, help=argparse.SUPPRESS)
    ap.add_argument("--gpus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ngpus", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=10000, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case is None:
        main_real(a) if a.real else main_parent(a)
    elif a.case == "accuracy":
        child_accuracy(a)
    elif a.case == "overhead":
        child_overhead(a)
    elif a.case == "window-latency":
        child_window_latency(a)
    elif a.case == "nvml-costs":
        child_nvml_costs(a)
    elif a.case == "window-cpu":
        child_window_cpu(a)
    else:
        raise SystemExit(f"unknown case {a.case}")


if __name__ == "__main__":
    main()
