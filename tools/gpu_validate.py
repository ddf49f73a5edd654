"""Real-GPU validation (run on a machine with an NVIDIA GPU; results go to docs/gpu-validation.md).

1. Counter refresh: poll nvmlDeviceGetTotalEnergyConsumption at ~1 kHz and record change times.
2. Counter vs integrated power: during idle -> matmul burst -> idle, integrate field 186 (instant)
   and nvmlDeviceGetPowerUsage sampled at ~100 Hz, compare with the counter delta.
3. wattmeter windows vs the counter delta read around the same calls.
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


def main():
    import torch  # noqa: F401  (warm up CUDA before timing)
    from wattmeter.meter import Meter
    from wattmeter.sensors.nvml import NvmlSensor

    torch.zeros(1, device="cuda")
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    res = {"gpu": pynvml.nvmlDeviceGetName(h), "driver": pynvml.nvmlSystemGetDriverVersion()}
    res["refresh_idle"] = refresh_period(h, 2.0)
    # Counter vs integrated power over idle 2 s -> burst 4 s -> idle 2 s.
    stop, out = threading.Event(), {}
    th = threading.Thread(target=integrate, args=(h, stop, out))
    e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    th.start()
    time.sleep(2)
    burst(4)
    time.sleep(2)
    stop.set()
    th.join()
    e1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    res["counter_vs_power"] = {"counter_j": (e1 - e0) / 1000, "instant_field_j": out["inst_j"],
                               "power_usage_avg_j": out["avg_j"], "samples": out["samples"]}
    # wattmeter windows vs counter deltas read right around the calls (burst starts inside).
    sensor = NvmlSensor()
    meter = Meter([sensor]).start()
    time.sleep(1)
    rows = []
    for dur in (0.7, 1.5, 3.0):
        for _ in range(3):
            time.sleep(1.0)
            c0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            w = meter.window("v")
            burst(dur)
            w.end()
            c1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            r = w.result()
            g = [d for d in r.devices if d.labels.get("gpu") == "0"][0]
            rows.append({"duration_s": round(r.duration_s, 3), "wattmeter_j": round(g.energy_j, 2),
                         "counter_delta_j": (c1 - c0) / 1000, "avg_w": round(g.avg_power_w, 1),
                         "approximate": r.approximate})
    meter.close()
    res["windows"] = rows
    res["refresh_busy"] = None
    json.dump(res, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
