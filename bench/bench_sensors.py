"""Sensor behaviours beyond the robustness matrix (issue 11: numbers that hold on any GPU).

    python bench/bench_sensors.py            # ~1 min on 2 cores, writes bench/results/sensors.{json,md}
    python bench/bench_sensors.py --quick    # 3 loads, writes to /tmp
    python bench/bench_sensors.py --interval 0.5 --variants counter_box,nocounter_box
                                             # as `--interval 0.5`: writes sensors-interval-0.5.{json,md}

The robustness matrix (``bench_robustness.py``) runs real time against wattmeter, Zeus and
CodeCarbon on the sensor behaviours the issue names. This sweep asks a different question:
does wattmeter hold when the simulated GPU differs in ways no test was written for -- counter
refresh periods of 20, 50, 200 ms or 1 s, a trailing mean refreshed once a second or every
250 ms, field 186 boxes stamped at read time, 50 ms boxes, 100 ms samples stamped at refresh?
wattmeter only, in virtual time (``tests/vdrive.py``), so every cell is deterministic and the
machine's load does not matter. Each cell: 12 jobs at random phases, |error| % over the true
window; p90, the signed median and how many windows were flagged approximate.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import bench_robustness as BR  # noqa: E402
from vdrive import window_jobs  # noqa: E402

VARIANTS = {
    # name: (label, sensor table on top of the grid phase)
    "counter_box": ("counter 100 ms, field 186 20 ms boxes (the matrix's H100)", dict(BR.SENSORS["counter_box"][1])),
    "counter_sample": ("counter 100 ms, field 186 100 ms samples stamped at read", dict(BR.SENSORS["counter_sample"][1])),
    "counter_h100clock": ("counter 99.97 ms +-2.5 ms, 100 ms samples stamped at read",
                          {"energy_counter": True, "counter_refresh_s": 0.09997, "counter_jitter_s": 0.0025,
                           "instant_kind": "sample", "instant_refresh_s": 0.1, "field_timestamp": "read"}),
    "counter_h100_dear": ("counter 99.97 ms +-2.5 ms, 3.5 ms calls, field 186 20 ms boxes (the H100 as measured)",
                          {"energy_counter": True, "counter_refresh_s": 0.09997, "counter_jitter_s": 0.0025,
                           "function_latency_s": {"nvmlDeviceGetTotalEnergyConsumption": 0.0035}}),
    "counter_sample_dear": ("same, each counter call 3.5 ms (an H100's)",
                            {"energy_counter": True, "counter_refresh_s": 0.09997, "counter_jitter_s": 0.0025,
                             "instant_kind": "sample", "instant_refresh_s": 0.1, "field_timestamp": "read",
                             "function_latency_s": {"nvmlDeviceGetTotalEnergyConsumption": 0.0035}}),
    "counter_box_read_stamp": ("counter 100 ms, field 186 20 ms boxes stamped at read",
                               {"energy_counter": True, "field_timestamp": "read"}),
    "counter_box_read_stamp_dear": ("same, 3.5 ms counter calls",
                                    {"energy_counter": True, "field_timestamp": "read",
                                     "function_latency_s": {"nvmlDeviceGetTotalEnergyConsumption": 0.0035}}),
    "counter_box50_read_stamp": ("counter 100 ms, field 186 50 ms boxes stamped at read",
                                 {"energy_counter": True, "instant_refresh_s": 0.05, "field_timestamp": "read"}),
    "counter_sample20_read_stamp": ("counter 100 ms, field 186 20 ms point samples stamped at read",
                                    {"energy_counter": True, "instant_kind": "sample", "instant_refresh_s": 0.02,
                                     "field_timestamp": "read"}),
    "counter_1ms": ("counter refreshing every 1 ms (as if computed at each call)",
                    {"energy_counter": True, "counter_refresh_s": 0.001, "counter_phase_s": 0.0}),
    "counter_5ms": ("counter refreshing every 5 ms", {"energy_counter": True, "counter_refresh_s": 0.005,
                                                      "counter_phase_s": 0.002}),
    "counter_20ms": ("counter refreshing every 20 ms", {"energy_counter": True, "counter_refresh_s": 0.02}),
    "counter_50ms": ("counter every 50 ms +-2.5 ms", {"energy_counter": True, "counter_refresh_s": 0.05,
                                                      "counter_jitter_s": 0.0025}),
    "counter_200ms": ("counter every 200 ms", {"energy_counter": True, "counter_refresh_s": 0.2}),
    "counter_1s": ("counter every 1 s", {"energy_counter": True, "counter_refresh_s": 1.0}),
    "counter_jitter_7ms": ("counter 100 ms, each refresh +-7.5 ms", {"energy_counter": True, "counter_jitter_s": 0.0075}),
    "counter_jitter_20ms": ("counter 100 ms, each refresh +-20 ms", {"energy_counter": True, "counter_jitter_s": 0.02}),
    "counter_500ms_jitter": ("counter every 500 ms +-50 ms", {"energy_counter": True, "counter_refresh_s": 0.5,
                                                              "counter_jitter_s": 0.05}),
    "counter_usage_instant": ("counter, no fields, GetPowerUsage a 100 ms point sample (older driver)",
                              {"energy_counter": True, "instant_field": False, "power_usage": "instant"}),
    "counter_usage_mean": ("counter, no fields, GetPowerUsage a 1 s mean (older driver)",
                           {"energy_counter": True, "instant_field": False}),
    "nocounter_box": ("no counter, 20 ms boxes, mean every 100 ms", dict(BR.SENSORS["nocounter_box"][1])),
    "nocounter_sample": ("no counter, 100 ms samples at read, mean every 100 ms", dict(BR.SENSORS["nocounter_sample"][1])),
    "mean_1s_box": ("no counter, mean refreshed every 1 s, 20 ms boxes",
                    {"energy_counter": False, "power_refresh_s": 1.0}),
    "mean_1s_sample": ("no counter, mean refreshed every 1 s, 100 ms samples at read",
                       {"energy_counter": False, "power_refresh_s": 1.0, "instant_kind": "sample",
                        "instant_refresh_s": 0.1, "field_timestamp": "read"}),
    "mean_250ms_sample": ("no counter, mean every 250 ms, 100 ms samples at read",
                          {"energy_counter": False, "power_refresh_s": 0.25, "instant_kind": "sample",
                           "instant_refresh_s": 0.1, "field_timestamp": "read"}),
    "mean_20ms_box": ("no counter, mean refreshed every 20 ms, 20 ms boxes",
                      {"energy_counter": False, "power_refresh_s": 0.02}),
    "mean_20ms_sample": ("no counter, mean refreshed every 20 ms, 100 ms samples at read",
                         {"energy_counter": False, "power_refresh_s": 0.02, "instant_kind": "sample",
                          "instant_refresh_s": 0.1, "field_timestamp": "read"}),
    "box_read_stamp": ("no counter, 20 ms boxes stamped at read", {"energy_counter": False, "field_timestamp": "read"}),
    "box_50ms": ("no counter, 50 ms boxes", {"energy_counter": False, "instant_refresh_s": 0.05}),
    "sample_refresh_stamp": ("no counter, 100 ms samples stamped at refresh",
                             {"energy_counter": False, "instant_kind": "sample", "instant_refresh_s": 0.1}),
    "instant_only": ("instant GetPowerUsage only (A100-like)", dict(BR.SENSORS["instant_only"][1])),
}
LOADS = ("steady", "sq100_jitter", "sq400_jitter", "sq1000_locked", "ramp_spikes")
QUICK_LOADS = ("steady", "sq400_jitter", "ramp_spikes")
DURATIONS_S = (1.5, 8.0)


def run_cell(variant: str, load: str, duration_s: float, jobs: int = 12, seed: int = 1,
             interval_s: float | None = None) -> dict:
    clock, fake, meter, drive = BR.virtual_meter(VARIANTS[variant][1], load, 40 + jobs * (duration_s + 4.0),
                                                 f"sw-{seed}", seed, interval_s=interval_s)
    rng = random.Random(f"{variant}-{load}-{duration_s}-{seed}")
    results = window_jobs(meter, drive, fake, jobs=jobs, rng=rng, start_s=6.0 + rng.random(), duration_s=duration_s)
    errors = [100.0 * err for err, _ in results]
    approx = sum(flagged for _, flagged in results)
    meter.close()
    a = sorted(abs(e) for e in errors)
    return {"p50": round(statistics.median(a), 3), "p90": round(a[round(0.9 * (len(a) - 1))], 3),
            "max": round(a[-1], 3), "signed_median": round(statistics.median(errors), 3), "approximate": approx,
            "jobs": jobs}


def markdown(res: dict) -> str:
    loads = res["loads"]
    out = ["| sensors | job | " + " | ".join(loads) + " |",
           "|---|---|" + "---|" * len(loads)]
    for v, by_d in res["cells"].items():
        for d, cells in by_d.items():
            row = [f"{c['p90']:.2f} ({c['signed_median']:+.2f}{', a' + str(c['approximate']) if c['approximate'] else ''})"
                   for c in (cells[l] for l in loads)]
            out.append(f"| {VARIANTS[v][0]} | {d} s | " + " | ".join(row) + " |")
    out.append("")
    out.append("Each cell: p90 of |error| % over 12 jobs (signed median; `a N`: N windows flagged approximate).")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 loads, writes to /tmp")
    ap.add_argument("--variants", default=None, help=f"comma list (default all: {','.join(VARIANTS)})")
    ap.add_argument("--interval", type=float, default=None, help="the meter's --interval (default: its own cadence)")
    a = ap.parse_args()
    loads = QUICK_LOADS if a.quick else LOADS
    variants = a.variants.split(",") if a.variants else list(VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    res = {"loads": list(loads), "interval_s": a.interval, "cells": {}}
    for v in variants:
        res["cells"][v] = {}
        for d in DURATIONS_S:
            res["cells"][v][str(d)] = {l: run_cell(v, l, d, interval_s=a.interval) for l in loads}
            print(v, d, {l: c["p90"] for l, c in res["cells"][v][str(d)].items()}, flush=True)
    out_dir = "/tmp" if a.quick else os.path.join(HERE, "results")
    stem = "sensors" if a.interval is None else f"sensors-interval-{a.interval:g}"
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(markdown(res) + "\n")
    print(markdown(res))


if __name__ == "__main__":
    main()
