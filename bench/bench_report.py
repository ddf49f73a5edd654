"""`wattmeter report` over many records: wall time and peak RSS (issue 8: 200k records in <= 10 s
and <= 200 MB). Writes results/report.json.

The records are copies of one real `wattmeter run --fake-gpus 2` record (timeline, devices and
carbon included, ~2.4 kB a line like the issue's 470 MB / 200k), each with its own run_id, job,
team label and start; one run in 20 also has an earlier checkpoint line that the final line
supersedes, and one line in 10,000 is broken (NaN energy, 1e300 W, or not JSON).

    python bench/bench_report.py               # 200,000 records, every format, twice each
    python bench/bench_report.py --formats json --repeat 1
    python bench/bench_report.py --records 20000 --out /tmp/report.json

Each format is measured --repeat times on the same file, the runs of one format back to back;
CPU time is the figure to compare (the machine is shared: wall time moves with its load).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, machine_info  # noqa: E402


def template(workdir: str) -> dict:
    path = os.path.join(workdir, "one.jsonl")
    subprocess.run([sys.executable, "-m", "wattmeter", "run", "--fake-gpus", "2", "--zone", "FR", "--quiet",
                    "--records", path, "--", sys.executable, "-c", "import time; time.sleep(3)"],
                   check=True, cwd=workdir)
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read().splitlines()[-1])


def write_records(path: str, base: dict, n: int) -> tuple[int, int]:
    broken = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = dict(base, run_id=f"{i:012x}", job=f"job{i % 50}", labels={"team": f"t{i % 7}"},
                       start_unix=base["start_unix"] + i * 60, end_unix=base["end_unix"] + i * 60)
            if i % 20 == 0:
                f.write(json.dumps(dict(rec, checkpoint=True, status="running")) + "\n")
            if i % 10000 == 1:
                f.write(["{not json\n", json.dumps(dict(rec, run_id=f"bad{i}", energy_j={"total": float("nan")})) + "\n",
                         json.dumps(dict(rec, run_id=f"big{i}", duration_s=1.0, energy_j={"gpu": 1e300, "total": 1e300}))
                         + "\n"][i // 10000 % 3])
                broken += 1
            f.write(json.dumps(rec) + "\n")
    return n, broken


CHILD = ("import resource, sys\n"
         "from wattmeter.cli import main\n"
         "rc = main(sys.argv[1:])\n"
         "u = resource.getrusage(resource.RUSAGE_SELF)\n"
         "sys.stderr.write('@@RSS_KB %d %.3f\\n' % (u.ru_maxrss, u.ru_utime + u.ru_stime))\n"
         "sys.exit(rc)\n")


def measure(path: str, fmt: str) -> dict:
    """One `wattmeter report` in its own process; the child reports its own peak RSS."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "report", path, "--format", fmt, "-o", os.devnull],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"report --format {fmt} failed ({proc.returncode}): {proc.stderr.strip()}")
    lines = proc.stderr.strip().splitlines()
    _, rss_kb, cpu_s = lines[-1].split()
    # wall time moves with the machine's other load; the child's CPU time much less
    return {"format": fmt, "wall_s": round(wall, 2), "cpu_s": round(float(cpu_s), 2),
            "peak_rss_mb": round(int(rss_kb) / 1024, 1),
            "stderr": "\n".join(lines[:-1])[:400]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--formats", default="table,markdown,csv,json,codecarbon")
    ap.add_argument("--repeat", type=int, default=2, help="runs per format (default 2)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "report.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = template(tmp)
        path = os.path.join(tmp, "records.jsonl")
        n, broken = write_records(path, base, args.records)
        size_mb = os.path.getsize(path) / 1e6
        results = [dict(measure(path, fmt), run=k + 1) for fmt in args.formats.split(",") for k in range(args.repeat)]
    out = {"machine": machine_info(), "records": n, "broken_lines": broken, "file_mb": round(size_mb, 1),
           "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
