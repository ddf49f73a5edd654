"""Real-GPU validation (run on a machine with an NVIDIA GPU; results go to docs/gpu-validation.md).

1. Counter refresh: poll nvmlDeviceGetTotalEnergyConsumption at ~1 kHz and record change times;
   then for 30 s, whether its refresh phase drifts away from a grid fitted to the first 5 s.
2. Counter vs integrated power: during idle -> matmul burst -> idle, integrate field 186 (instant)
   and nvmlDeviceGetPowerUsage sampled at ~100 Hz, compare with the counter delta.
3. wattmeter windows vs the counter delta read around the same calls.
4. A running meter's NVML calls and CPU a second with the GPU idle (meter_idle_cost).
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time

import pynvml


def refresh_period(h, seconds=2.0):
    changes, last = [], pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        v = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        lat.append(time.perf_counter() - t0)
        if v != last:
            changes.append(time.monotonic())
            last = v
        time.sleep(0.0005)
    gaps = [b - a for a, b in zip(changes, changes[1:])]
    return {"changes": len(changes), "median_gap_ms": 1000 * statistics.median(gaps) if gaps else None,
            "min_gap_ms": 1000 * min(gaps) if gaps else None, "max_gap_ms": 1000 * max(gaps) if gaps else None,
            "call_latency_us_median": 1e6 * statistics.median(lat)}


def refresh_drift(h, seconds=30.0):
    """Whether the counter's refresh phase wanders (a random walk) or jitters around a fixed
    grid: decides how far apart the pairs that keep it locked may be (docs/performance.md).
    Each change is dated at the middle of the gap between the read that still saw the old value
    and the one that saw the new; a grid is fitted to the first 5 s and its predictions are
    compared with the refreshes seen later."""
    changes, last = [], pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    prev_end = time.monotonic()
    end = prev_end + seconds
    while prev_end < end:
        start = time.monotonic()
        v = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        now = time.monotonic()
        if v != last:
            changes.append((0.5 * (prev_end + now), now - prev_end))
            last = v
        prev_end = now
    ts = [t for t, width in changes if width < 0.01]   # only changes bracketed to 10 ms
    if len(ts) < 20:
        return {"changes": len(changes), "narrow": len(ts)}
    gap = statistics.median(b - a for a, b in zip(ts, ts[1:]))
    first = [t for t in ts if t - ts[0] < 5.0]
    ks = [round((t - ts[0]) / gap) for t in first]
    km, tm = statistics.fmean(ks), statistics.fmean(first)
    period = sum((k - km) * (t - tm) for k, t in zip(ks, first)) / sum((k - km) ** 2 for k in ks)
    zero = tm - km * period          # refresh 0 on the fitted grid
    out = {"changes": len(changes), "narrow": len(ts), "period_ms_fitted_5s": round(1000 * period, 4)}
    for after in (5, 10, 20, seconds - 5):
        near = [t for t in ts if after <= t - ts[0] < after + 2.0]
        misses = [abs((t - zero) - round((t - zero) / period) * period) for t in near]
        if misses:
            out[f"miss_ms_median_after_{int(after)}s"] = round(1000 * statistics.median(misses), 3)
    return out


def burst(seconds):
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(5):
            a = (a @ b).clamp_(-1, 1)
        torch.cuda.synchronize()


def integrate(h, stop, out):
    last = None
    inst_j = avg_j = 0.0
    n = 0
    while not stop.is_set():
        t = time.monotonic()
        vals = pynvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT])
        inst = vals[0].value.uiVal / 1000.0 if vals[0].nvmlReturn == 0 else None
        avg = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
        if last is not None:
            dt = t - last[0]
            if inst is not None and last[1] is not None:
                inst_j += 0.5 * (inst + last[1]) * dt
            avg_j += 0.5 * (avg + last[2]) * dt
        last = (t, inst, avg)
        n += 1
        time.sleep(0.01)
    out.update(inst_j=inst_j, avg_j=avg_j, samples=n)


class Reference(threading.Thread):
    """Polls field 186 (instant power) as fast as it can, for an independent reference:
    the integral over any interval, scaled so the whole run matches the energy counter."""

    def __init__(self, h):
        super().__init__(daemon=True)
        self.h, self.stop, self.samples = h, threading.Event(), []

    def run(self):
        while not self.stop.is_set():
            v = pynvml.nvmlDeviceGetFieldValues(self.h, [pynvml.NVML_FI_DEV_POWER_INSTANT])[0]
            if v.nvmlReturn == 0:
                self.samples.append((time.monotonic(), v.value.uiVal / 1000.0))
            time.sleep(0.001)

    def integral(self, a, b):
        pts = [(t, w) for t, w in self.samples if a <= t <= b]
        return sum(0.5 * (w0 + w1) * (t1 - t0) for (t0, w0), (t1, w1) in zip(pts, pts[1:]))


def nvml_cost(h, n=300):
    out = {}
    for name, call in (("energy_counter", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h)),
                       ("field_186", lambda: pynvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT])),
                       ("power_usage", lambda: pynvml.nvmlDeviceGetPowerUsage(h))):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            call()
        out[name] = {"wall_us": 1e6 * (time.perf_counter() - w0) / n, "cpu_us": 1e6 * (time.process_time() - c0) / n}
    return out


def meter_idle_cost(seconds=30.0, settle_s=10.0):
    """A running meter on this GPU with a window open and the GPU idle: NVML calls and process
    CPU per second after its start-up, and what it learnt of the sensors (field 186's stamps,
    the counter's refresh). Session 10 cut the counter reads on jittering counter clocks and on
    dear calls in the fake NVML only: this is the real figure (an H100's counter call costs
    ~3.5 ms of CPU)."""
    from wattmeter.meter import Meter
    from wattmeter.sensors.nvml import NvmlSensor

    functions = {"counter": "nvmlDeviceGetTotalEnergyConsumption", "fields": "nvmlDeviceGetFieldValues",
                 "power_usage": "nvmlDeviceGetPowerUsage"}
    calls = dict.fromkeys(functions, 0)
    real = {name: getattr(pynvml, fn) for name, fn in functions.items()}

    def counting(name):
        def call(*args):
            calls[name] += 1
            return real[name](*args)
        return call

    for name, fn in functions.items():
        setattr(pynvml, fn, counting(name))
    try:
        sensor = NvmlSensor(pynvml)
        meter = Meter([sensor]).start()
        w = meter.window("idle")
        time.sleep(settle_s)
        before, c0, t0 = dict(calls), time.process_time(), time.monotonic()
        time.sleep(seconds)
        dt = time.monotonic() - t0
        out = {"seconds": round(dt, 1),
               "calls_per_s": {k: round((calls[k] - before[k]) / dt, 2) for k in calls},
               "process_cpu_pct_of_core": round(100.0 * (time.process_time() - c0) / dt, 3),
               "references": {k: str(v) for k, v in sensor.references().items()}}
        w.end()
        meter.close()
        return out
    finally:
        for name, fn in functions.items():
            setattr(pynvml, fn, real[name])


def main():
    import torch  # noqa: F401  (warm up CUDA before timing)
    from wattmeter.meter import Meter
    from wattmeter.sensors.nvml import NvmlSensor

    torch.zeros(1, device="cuda")
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    res = {"gpu": pynvml.nvmlDeviceGetName(h), "driver": pynvml.nvmlSystemGetDriverVersion()}
    res["nvml_call_cost"] = nvml_cost(h)
    res["refresh_idle"] = refresh_period(h, 1.0)
    res["refresh_drift"] = refresh_drift(h, 30.0)
    try:
        res["meter_idle_cost"] = meter_idle_cost(30.0)
    except Exception as exc:  # noqa: BLE001 - the rest of the check still runs
        res["meter_idle_cost"] = {"error": f"{type(exc).__name__}: {exc}"}
    ref = Reference(h)
    ref.start()
    sensor = NvmlSensor()
    meter = Meter([sensor]).start()
    time.sleep(1.0)
    c_start, tc_start = pynvml.nvmlDeviceGetTotalEnergyConsumption(h), time.monotonic()
    time.sleep(0.5)
    rows = []
    for dur in (0.3, 0.7, 1.5, 3.0):
        for _ in range(4):
            time.sleep(0.6)
            t0 = time.monotonic()
            w = meter.window("v")
            burst(dur)
            w.end()
            t1 = time.monotonic()
            rows.append((dur, t0, t1, w))
    time.sleep(0.5)
    c_end, tc_end = pynvml.nvmlDeviceGetTotalEnergyConsumption(h), time.monotonic()
    time.sleep(0.2)
    t_all = (ref.samples[0][0], ref.samples[-1][0])
    ref.stop.set()
    ref.join()
    # Counter reads are up to one refresh stale at both ends; over ~30 s that is < 0.5 %.
    scale = ((c_end - c_start) / 1000.0) / ref.integral(tc_start, tc_end)
    out = []
    for dur, t0, t1, w in rows:
        r = w.result()
        g = [d for d in r.devices if d.labels.get("gpu") == "0"][0]
        truth = ref.integral(t0, t1) * scale
        out.append({"duration_s": round(r.duration_s, 3), "wattmeter_j": round(g.energy_j, 2),
                    "reference_j": round(truth, 2), "error_pct": round(100 * (g.energy_j - truth) / truth, 2),
                    "approximate": r.approximate})
    meter.close()
    res["reference_samples_per_s"] = round(len(ref.samples) / (t_all[1] - t_all[0]), 1)
    res["reference_scale_counter_over_field186"] = round(scale, 4)
    res["windows"] = out
    json.dump(res, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
