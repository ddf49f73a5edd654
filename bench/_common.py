"""Helpers shared by the benchmarks in bench/: machine facts, percentiles, child processes.

Only the standard library is imported here, so a child process that measures memory or start-up
time pays nothing for the harness beyond what it measures.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence

RESULT_TAG = "@@RESULT "
READY_TAG = "@@READY"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


# -- machine --------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    mem_kb = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": nproc,
        "cpu_model": _cpu_model(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in load],
        "packages": {d: _version(d) for d in ("wattmeter", "nvidia-ml-py", "codecarbon", "zeus-ml", "psutil")},
    }


# -- statistics -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        return math.nan
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def summarize(values: Iterable[float], digits: int = 4) -> dict[str, Any]:
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": round(median(xs), digits), "p90": round(percentile(xs, 90), digits),
            "max": round(max(xs), digits), "min": round(min(xs), digits),
            "mean": round(sum(xs) / len(xs), digits)}


# -- process facts ---------------------------------------------------------------------------------
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM / Threads of a process, from /proc (kB and counts)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def sleep_until(deadline: float, clock=time.monotonic) -> None:
    """Sleep to within ~1 ms of ``deadline`` then spin the rest (time.sleep alone overshoots)."""
    while True:
        left = deadline - clock()
        if left <= 0:
            return
        if left > 0.002:
            time.sleep(left - 0.0015)


# -- child processes -------------------------------------------------------------------------------
def emit(obj: Any) -> None:
    sys.stdout.write(RESULT_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> Any:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError("child printed no result line")


class ChildError(RuntimeError):
    pass


def run_child(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120,
              log_path: str | None = None, cwd: str | None = None) -> Any:
    """Run a child to completion and return its result object (raises ChildError with its stderr)."""
    p = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(argv)}\n{p.stderr}\n")
    if p.returncode != 0:
        raise ChildError(f"{' '.join(argv[-6:])} exited {p.returncode}: {p.stderr[-3000:]}")
    return parse_result(p.stdout)


def run_children_in_step(argvs: dict[str, Sequence[str]], *, env: dict[str, str] | None = None,
                         envs: dict[str, dict[str, str]] | None = None, timeout: float = 300,
                         log_dir: str | None = None, go: Any = None) -> dict[str, Any]:
    """Start several children; once every one has printed READY (imports done, set-up done),
    tell them all to go at the same moment, then collect each one's result. A child that fails
    gives ``{"error": ...}`` instead of a result, so one broken meter cannot sink the run.
    ``go()``, if given, is called at that moment and its text follows ``GO`` on the line (e.g. a
    shared start time that only makes sense once every child is ready)."""
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Any] = {}
    for name, argv in argvs.items():
        err = open(os.path.join(log_dir, f"{name}.stderr"), "w", encoding="utf-8") if log_dir else subprocess.DEVNULL
        logs[name] = err
        procs[name] = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                       text=True, env=(envs or {}).get(name, env), bufsize=1)
    results: dict[str, Any] = {}
    early: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    for name, p in procs.items():
        seen = []
        while True:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            seen.append(line)
            if line.startswith(READY_TAG):
                break
        if not seen or not seen[-1].startswith(READY_TAG):
            early[name] = "".join(seen)
    line = f"GO {go()}\n" if go is not None else "GO\n"
    for name, p in procs.items():
        if name in early:
            continue
        try:
            p.stdin.write(line)  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
    for name, p in procs.items():
        left = max(1.0, deadline - time.monotonic())
        try:
            out, _ = p.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            results[name] = {"error": f"timed out after {timeout:.0f} s"}
            continue
        out = early.get(name, "") + (out or "")
        try:
            results[name] = parse_result(out)
        except Exception:
            tail = ""
            if log_dir:
                try:
                    with open(os.path.join(log_dir, f"{name}.stderr"), encoding="utf-8") as f:
                        tail = f.read()[-2000:]
                except OSError:
                    pass
            results[name] = {"error": f"exit {p.returncode}; {tail.strip() or out[-2000:]}"}
    for f in logs.values():
        if f is not subprocess.DEVNULL:
            f.close()
    return results


def wait_for_go() -> str:
    """Say READY, wait for GO; returns what the parent sent after ``GO`` (often nothing)."""
    sys.stdout.write(READY_TAG + "\n")
    sys.stdout.flush()
    return sys.stdin.readline()[2:].strip()


def fmt(x: Any, unit: str = "", digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"
