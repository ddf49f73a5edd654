"""What `/metrics` shows between scrapes (issue 11): the exported energy counter against truth.

    python bench/bench_exported.py            # ~1 min on 2 cores, writes bench/results/exported.json
    python bench/bench_exported.py --quick    # fewer loads and scrapes, writes to /tmp

A Prometheus server scrapes every second. A user then asks for the energy between two scrapes
5 s apart (``increase(...[5s])``) or the rate over 30 s. Each is scored against the simulation's
true energy between the two scrape instants. One GPU per cell, driven in virtual time the way
the sampler's reader threads read it (``tests/vdrive.py``), so every cell is deterministic and
the machine's load does not matter. The loads and sensor behaviours are the robustness matrix's
(``bench_robustness.py``).

Targets: 5 s differences within +-3 % of truth; 30 s rates within +-1 %. Also checked: the counter
never goes down, and how long it stays flat while the GPU draws power (a held total).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import _common as C  # noqa: E402
import bench_robustness as BR  # noqa: E402

GROUPS = ("counter_box", "counter_sample", "nocounter_box", "nocounter_sample")
LOADS = ("steady", "sq100_jitter", "sq400_jitter", "sq1000_jitter", "ramp_spikes", "idle_jobs")
QUICK_LOADS = ("steady", "sq400_jitter", "ramp_spikes")
WARMUP_S = 10.0
TARGETS = {"diff5_pct": 3.0, "rate30_pct": 1.0}


def run_cell(group: str, load: str, scrapes: int, seed: int, interval_s: float | None = None) -> dict:
    clock, fake, meter, drive = BR.virtual_meter(BR.SENSORS[group][1], load, WARMUP_S + scrapes + 40.0,
                                                 f"exported-{seed}", seed, interval_s=interval_s)
    rng = random.Random(f"scrapes-{group}-{load}-{seed}")
    drive.run_until(WARMUP_S + rng.random())
    pts: list[tuple[float, float]] = []
    for _ in range(scrapes):
        drive.run_until(clock.now() + 1.0 + rng.uniform(-0.01, 0.01))   # Prometheus' own jitter
        t = clock.now()
        pts.append((t, meter.ledger.snapshot(t)["gpu0"].energy_j))
    out: dict = {"group": group, "load": load}
    for key, lag in (("diff5", 5), ("rate30", 30)):
        errs = []
        for (t0, e0), (t1, e1) in zip(pts, pts[lag:]):
            truth = fake.true_energy_j(0, t0, t1)
            errs.append(100.0 * ((e1 - e0) - truth) / truth)
        mags = [abs(e) for e in errs]
        out[key] = {"p50": round(C.median(mags), 3), "p90": round(C.percentile(mags, 90), 3),
                    "max": round(max(mags), 3), "n": len(errs)}
    steps = [b - a for (_, a), (_, b) in zip(pts, pts[1:])]
    out["decreases"] = sum(1 for s in steps if s < 0)
    out["flat_1s_scrapes"] = sum(1 for s in steps if s <= 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scrapes", type=int, default=None, help="scrapes per cell (default 300, 60 with --quick)")
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--loads", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--interval", type=float, default=None,
                    help="the meter's --interval (default: its own cadence); writes exported-interval-S.json")
    ap.add_argument("--no-quiet", action="store_true",
                    help="for comparison: GPUs whose power holds still are read as often as the others "
                         "(sensors/quiet.py); writes exported-no-quiet.json")
    a = ap.parse_args()
    if a.no_quiet:
        import math

        from wattmeter.sensors import quiet
        quiet.QUIET_SPAN_S = math.inf      # never quiet: every GPU at the sensor's own cadence
    scrapes = a.scrapes or (60 if a.quick else 300)
    loads = a.loads.split(",") if a.loads else (QUICK_LOADS if a.quick else LOADS)
    cells = [run_cell(g, load, scrapes, seed=7, interval_s=a.interval) for g in a.groups.split(",") for load in loads]
    worst = {k: max(c[k]["p90"] for c in cells) for k in ("diff5", "rate30")}
    worst_max = {k: max(c[k]["max"] for c in cells) for k in ("diff5", "rate30")}
    result = {"machine": C.machine_info(), "scrapes_per_cell": scrapes, "interval_s": a.interval,
              "quiet": not a.no_quiet, "cells": cells,
              "worst_p90_pct": worst, "worst_max_pct": worst_max,
              "verdict": {"diff5": worst["diff5"] <= TARGETS["diff5_pct"],
                          "rate30": worst["rate30"] <= TARGETS["rate30_pct"]},
              "decreases": sum(c["decreases"] for c in cells)}
    print(f"{'group':<17}{'load':<15}{'5 s diff p50/p90/max %':>26}{'30 s rate p50/p90/max %':>28}  flat")
    for c in cells:
        d, r = c["diff5"], c["rate30"]
        print(f"{c['group']:<17}{c['load']:<15}{d['p50']:>10.2f}{d['p90']:>8.2f}{d['max']:>8.2f}"
              f"{r['p50']:>12.2f}{r['p90']:>8.2f}{r['max']:>8.2f}  {c['flat_1s_scrapes']}")
    print(f"worst p90: 5 s {worst['diff5']:.2f} % (target {TARGETS['diff5_pct']}), "
          f"30 s {worst['rate30']:.2f} % (target {TARGETS['rate30_pct']}); decreases {result['decreases']}")
    name = "exported.json" if a.interval is None else f"exported-interval-{a.interval:g}.json"
    if a.no_quiet:
        name = name.replace(".json", "-no-quiet.json")
    path = a.out or (os.path.join("/tmp", name) if a.quick else os.path.join(C.RESULTS_DIR, name))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
