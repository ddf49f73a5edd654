"""`wattmeter run` under faults: every case asserts the exit code, the record on disk and the
energy kept, with real files, devices, FIFOs, pipes, signals, ptys and (as root) a small tmpfs.

The fault matrix in docs/reliability.md is generated from the cases registered here
(``tests/reliability_cases.py``; ``python tests/reliability_cases.py`` rewrites it), and
``test_reliability_doc_matches_the_cases`` fails when the doc and the tests drift apart.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from reliability_cases import CASES, DOC, ROOT, Case, all_cases, case, doc_table, render_table

# Earlier cases, covered in tests/test_cli_run.py.
CASES += [
    Case("Child exits non-zero", "tests/test_cli_run.py::test_child_exit_code_is_propagated_and_crash_recorded",
         "final record, `failed`", "the child's (3)", "kept"),
    Case("Command not found", "tests/test_cli_run.py::test_command_not_found_exits_127_and_still_writes_record",
         "final record, `not_found`", "127", "kept (start-up only)", "one-line error"),
    Case("Child killed by a signal", "tests/test_cli_run.py::test_child_killed_by_signal_is_recorded_as_killed",
         "final record, `killed`", "128+N (137)", "kept"),
    Case("SIGTERM to the agent", "tests/test_cli_run.py::test_sigterm_is_forwarded_and_record_still_written",
         "final record", "the child's (143)", "kept", "child got SIGTERM"),
    Case("Agent SIGKILLed (checkpoints every 0.5 s)", "tests/test_cli_run.py::test_checkpoints_survive_sigkill_of_the_agent",
         "checkpoints, monotonic energy", "-", "up to the last checkpoint"),
]

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
for _k in ("CUDA_VISIBLE_DEVICES", "WATTMETER_FAKE_NVML", "WATTMETER_RECORDS", "WATTMETER_JOB"):
    ENV.pop(_k, None)
WM = [sys.executable, "-m", "wattmeter"]
FALLBACK = Path("wattmeter") / "unwritten-records.jsonl"


def env_for(tmp_path: Path) -> dict[str, str]:
    return {**ENV, "XDG_STATE_HOME": str(tmp_path / "state")}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fallback_records(tmp_path: Path) -> list[dict]:
    path = tmp_path / "state" / FALLBACK
    return lines(path) if path.exists() else []


def run_wm(tmp_path: Path, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    return subprocess.run([*WM, *args], text=True, timeout=timeout, env=env_for(tmp_path), cwd=str(tmp_path), **kw)


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "wattmeter: warning" in line]


def assert_fallback(tmp_path: Path, p: subprocess.CompletedProcess, exit_code: int) -> dict:
    """The record went to the fallback file, whole, with its energy; one warning names it."""
    assert p.returncode == exit_code, p.stderr
    assert "Traceback" not in p.stderr
    [rec] = fallback_records(tmp_path)
    assert rec["exit_code"] == exit_code and rec["checkpoint"] is False
    assert rec["energy_j"]["gpu"] > 0
    [warn] = warnings(p.stderr)
    assert str(tmp_path / "state" / FALLBACK) in warn
    return rec


# -- unit level: one line, whole or not at all --------------------------------------------
from wattmeter.exporters.records import RecordSink, append_line  # noqa: E402


@case("Short write (disk full mid-line), simulated at the write call",
      records="file keeps only whole lines; record kept for retry", exit_code="-", energy="kept in memory")
def test_short_write_truncates_back_and_next_record_starts_on_its_own_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_line(str(path), '{"a":1}\n')

    def half(fd: int, data: bytes) -> int:
        return os.write(fd, data[: len(data) // 2])

    with pytest.raises(OSError) as err:
        append_line(str(path), '{"b":2,"pad":"' + "x" * 100 + '"}\n', write=half)
    assert err.value.errno == errno.ENOSPC
    assert path.read_text() == '{"a":1}\n'         # the half line was cut back off
    append_line(str(path), '{"c":3}\n')
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"a": 1}, {"c": 3}]


@case("I/O error on the records file", records="kept in memory, retried at each checkpoint, then written",
      exit_code="-", energy="kept")
def test_io_error_keeps_record_and_retries_at_next_checkpoint(tmp_path):
    path = tmp_path / "r.jsonl"
    failing = {"on": True}

    def flaky(p: str, text: str, **kw) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, "Input/output error")
        append_line(p, text, **kw)

    sink = RecordSink(str(path), env={"XDG_STATE_HOME": str(tmp_path / "state")}, append=flaky)
    sink.write_record({"run_id": "r1", "checkpoint": False, "energy_j": {"gpu": 5.0}})
    assert sink.pending == 1 and not path.exists()
    failing["on"] = False
    sink.write_record({"run_id": "r1", "checkpoint": True, "energy_j": {"gpu": 6.0}})   # a later checkpoint retries
    assert sink.pending == 0
    assert [r["energy_j"]["gpu"] for r in lines(path)] == [5.0, 6.0]
    assert sink.close().warning is None


def test_superseded_checkpoints_are_dropped_and_the_final_record_falls_back(tmp_path):
    sink = RecordSink(str(tmp_path / "r.jsonl"), env={"XDG_STATE_HOME": str(tmp_path / "state")},
                      append=lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    for e in (1.0, 2.0):
        sink.write_record({"run_id": "r1", "checkpoint": True, "energy_j": {"gpu": e}})
    assert sink.pending == 1                         # the older checkpoint was superseded
    sink.write_record({"run_id": "r1", "checkpoint": False, "energy_j": {"gpu": 3.0}})
    closed = sink.close()
    assert closed.pending == 1 and closed.fallback == str(tmp_path / "state" / FALLBACK)
    assert "No space left on device" in closed.warning
    assert [r["energy_j"]["gpu"] for r in fallback_records(tmp_path)] == [3.0]


def test_fallback_goes_to_stderr_as_json_when_the_state_folder_fails(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    r, w = os.pipe()
    sink = RecordSink("/dev/full", env={"XDG_STATE_HOME": str(blocker)}, stderr_fd=w)
    sink.write_record({"run_id": "r1", "checkpoint": False, "energy_j": {"gpu": 3.0}})
    closed = sink.close()
    os.close(w)
    with os.fdopen(r) as f:
        assert json.loads(f.read())["energy_j"]["gpu"] == 3.0
    assert closed.fallback == "stderr" and "stderr (as JSON)" in closed.warning


def test_a_failing_enricher_keeps_the_record_without_its_extras(tmp_path):
    def extras(record) -> dict:
        if record.get("checkpoint"):
            raise ValueError("bad value file")
        return {"value": {"images": 3.0}}

    sink = RecordSink(str(tmp_path / "r.jsonl"), env={"XDG_STATE_HOME": str(tmp_path / "state")}, enrich=extras)
    sink.write_record({"run_id": "r1", "checkpoint": True, "energy_j": {"gpu": 1.0}})
    sink.write_record({"run_id": "r1", "checkpoint": False, "energy_j": {"gpu": 2.0}})
    assert sink.enrich_error == "ValueError: bad value file"
    assert lines(tmp_path / "r.jsonl") == [
        {"run_id": "r1", "checkpoint": True, "energy_j": {"gpu": 1.0}},
        {"run_id": "r1", "checkpoint": False, "energy_j": {"gpu": 2.0}, "value": {"images": 3.0}}]
    assert sink.last_record["value"] == {"images": 3.0}


# -- end to end: the final record write fails -------------------------------------------
@case("Records path is `/dev/full` (every write fails)", records="fallback file in `$XDG_STATE_HOME/wattmeter/`",
      exit_code="the child's (3)", energy="kept", metrics="one warning naming the fallback; summary printed")
def test_dev_full(tmp_path):
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", "/dev/full", "--", sys.executable, "-c",
               "raise SystemExit(3)")
    assert_fallback(tmp_path, p, 3)
    assert "No space left on device" in p.stderr
    assert "failed (exit 3)" in p.stderr          # the summary is still printed


@case("Records path is `/dev/null`", records="accepted by the device (discarded, as asked)",
      exit_code="the child's (3)", energy="in the summary and `--json`")
def test_dev_null(tmp_path):
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", "/dev/null", "--json", "--", sys.executable, "-c",
               "raise SystemExit(3)")
    assert p.returncode == 3, p.stderr
    assert json.loads(p.stdout)["energy_j"]["gpu"] > 0
    assert not warnings(p.stderr) and not fallback_records(tmp_path)


@case("Records path is `/dev/stdout` and stdout is a closed pipe", records="fallback file",
      exit_code="the child's (3)", energy="kept", metrics="one warning")
def test_dev_stdout_closed_pipe(tmp_path):
    r, w = os.pipe()
    os.close(r)
    try:
        p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", "/dev/stdout", "--", sys.executable, "-c",
                   "raise SystemExit(3)", stdout=w, stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(w)
    assert_fallback(tmp_path, p, 3)


@case("Records folder deleted while the job runs", records="fallback file", exit_code="the child's (3)",
      energy="kept", metrics="one warning")
def test_deleted_folder(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    ready = tmp_path / "ready"
    proceed = tmp_path / "proceed"
    child = (f"import os, time\nopen({str(ready)!r}, 'w').close()\n"
             f"while not os.path.exists({str(proceed)!r}): time.sleep(0.05)\nraise SystemExit(3)\n")
    proc = subprocess.Popen([*WM, "run", "--fake-gpus", "1", "--records", str(folder / "r.jsonl"), "--",
                             sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env_for(tmp_path), cwd=str(tmp_path))
    _wait_for(ready)
    folder.rmdir()
    proceed.touch()
    out, err = proc.communicate(timeout=60)
    assert_fallback(tmp_path, subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 3)
    assert "No such file or directory" in err


@case("Records path is a FIFO with no reader", records="fallback file after a 2 s deadline (no hang)",
      exit_code="the child's (3)", energy="kept", metrics="one warning: no reader")
def test_fifo_without_reader(tmp_path):
    fifo = tmp_path / "r.fifo"
    os.mkfifo(fifo)
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", str(fifo), "--", sys.executable, "-c",
               "raise SystemExit(3)", timeout=30)
    assert_fallback(tmp_path, p, 3)
    assert "has no reader" in p.stderr


@case("Records path is a FIFO with a reader", records="the reader gets the record, one whole line",
      exit_code="the child's (3)", energy="kept")
def test_fifo_with_reader(tmp_path):
    fifo = tmp_path / "r.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with open(fifo, "rb") as f:     # blocks until a writer opens; EOF when it closes
                got.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", str(fifo), "--", sys.executable, "-c",
               "raise SystemExit(3)", timeout=30)
    stop.set()
    with open(fifo, "wb"):                   # release the reader's last open
        pass
    t.join(5)
    assert p.returncode == 3, p.stderr
    recs = [json.loads(x) for x in b"".join(got).decode().splitlines() if x.strip()]
    assert [r["exit_code"] for r in recs] == [3] and recs[0]["energy_j"]["gpu"] > 0
    assert not warnings(p.stderr) and not fallback_records(tmp_path)


@case("Records path is a FIFO whose reader stops reading", records="fallback file after a 2 s deadline "
      "(the reader may hold a cut line)", exit_code="the child's (3)", energy="kept", metrics="one warning")
def test_fifo_with_a_stalled_reader(tmp_path):
    fifo = tmp_path / "r.fifo"
    os.mkfifo(fifo)
    held = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)    # a reader that never reads
    try:
        labels = [a for i in range(80) for a in ("--label", f"k{i}={'v' * 1000}")]   # > the 64 KiB pipe
        p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", str(fifo), *labels, "--", sys.executable,
                   "-c", "raise SystemExit(3)", timeout=60)
    finally:
        os.close(held)
    rec = assert_fallback(tmp_path, p, 3)
    assert len(rec["labels"]) == 80
    assert "stopped reading" in p.stderr


# -- a real small filesystem (root only) -------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 64 KiB tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave_bytes: int) -> Path:
    """Fill the filesystem, then free about ``leave_bytes``."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave_bytes))
    os.close(fd)
    return filler


BIG_LABELS = [a for i in range(12) for a in ("--label", f"k{i}={'v' * 1000}")]   # a ~13 KB record


@case("Disk nearly full (64 KiB tmpfs): the record does not fit", records="file keeps only whole lines; "
      "record in the fallback; the next record starts on its own line", exit_code="the child's (3)",
      energy="kept", metrics="one warning")
def test_nearly_full_tmpfs(tmp_path, small_tmpfs):
    rec = small_tmpfs / "r.jsonl"
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", str(rec), "--quiet", "--", "true")
    assert p.returncode == 0, p.stderr
    before = rec.read_bytes()
    filler = _fill(small_tmpfs, 4096)
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", str(rec), *BIG_LABELS, "--", sys.executable, "-c",
               "raise SystemExit(3)")
    fb = assert_fallback(tmp_path, p, 3)
    assert fb["labels"]["k0"] == "v" * 1000
    assert rec.read_bytes() == before                 # the cut-off line was truncated away
    filler.unlink()
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", str(rec), "--quiet", "--", "true")
    assert p.returncode == 0, p.stderr
    assert [r["status"] for r in lines(rec)] == ["completed", "completed"]   # every line parses


@case("Records file on a filesystem remounted read-only mid-run", records="fallback file",
      exit_code="the child's (3)", energy="kept", metrics="one warning")
def test_read_only_file(tmp_path, small_tmpfs):
    rec = small_tmpfs / "r.jsonl"
    ready, proceed = tmp_path / "ready", tmp_path / "proceed"
    child = (f"import os, time\nopen({str(ready)!r}, 'w').close()\n"
             f"while not os.path.exists({str(proceed)!r}): time.sleep(0.05)\nraise SystemExit(3)\n")
    proc = subprocess.Popen([*WM, "run", "--fake-gpus", "1", "--records", str(rec), "--", sys.executable, "-c", child],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(tmp_path),
                            cwd=str(tmp_path))
    _wait_for(ready)
    m = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True, text=True)
    proceed.touch()
    out, err = proc.communicate(timeout=60)
    if m.returncode != 0:
        pytest.skip(f"cannot remount read-only: {m.stderr.strip()}")
    assert_fallback(tmp_path, subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 3)
    assert "Read-only file system" in err
    assert not rec.exists() or rec.read_text() == ""


# -- the exit code wins over closed pipes -------------------------------------------------
@case("stdout is a closed pipe (the CI log reader is gone), with `--json -`", records="final record on disk",
      exit_code="the child's (3), never 0", energy="kept", metrics="warning on stderr")
def test_closed_stdout_pipe(tmp_path):
    r, w = os.pipe()
    os.close(r)
    try:
        p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", "r.jsonl", "--json", "-", "--", sys.executable,
                   "-c", "raise SystemExit(3)", stdout=w, stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(w)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and "stdout is closed" in p.stderr
    [rec] = lines(tmp_path / "r.jsonl")
    assert rec["exit_code"] == 3 and rec["energy_j"]["gpu"] > 0


@case("stderr is a closed pipe", records="final record on disk", exit_code="the child's (3), never 0",
      energy="kept", metrics="summary dropped silently")
def test_closed_stderr_pipe(tmp_path):
    r, w = os.pipe()
    os.close(r)
    try:
        p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", "r.jsonl", "--", sys.executable, "-c",
                   "raise SystemExit(3)", stdout=subprocess.PIPE, stderr=w, capture_output=False)
    finally:
        os.close(w)
    assert p.returncode == 3
    [rec] = lines(tmp_path / "r.jsonl")
    assert rec["exit_code"] == 3 and rec["energy_j"]["gpu"] > 0


# -- the agent dies ------------------------------------------------------------------------
def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:    # a zombie is dead too (its parent, the test, may not have reaped it)
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _until(cond: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _gone_within(pid: int, seconds: float) -> bool:
    return _until(lambda: not _alive(pid), seconds)


@case("Agent SIGKILLed at 5 s (default 30 s checkpoints)", records="the first checkpoint (at 2 s)",
      exit_code="-", energy="up to the checkpoint", metrics="the child is killed with the agent (PR_SET_PDEATHSIG)")
def test_agent_sigkill_at_5s_leaves_a_record_and_no_orphan(tmp_path):
    rec, pidfile = tmp_path / "r.jsonl", tmp_path / "child.pid"
    child = f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n"
    proc = subprocess.Popen([*WM, "run", "--fake-gpus", "1", "--records", str(rec), "--", sys.executable, "-c", child],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_for(tmp_path))
    _wait_for(pidfile)
    child_pid = int(pidfile.read_text())
    time.sleep(5)
    proc.kill()                    # the agent only, not its process group
    proc.wait(timeout=10)
    assert _gone_within(child_pid, 2.0), "the child outlived the agent"
    [first] = lines(rec)
    assert first["checkpoint"] is True and first["status"] == "running"
    assert first["energy_j"]["gpu"] > 0 and first["duration_s"] >= 1.5


@case("Agent killed where PR_SET_PDEATHSIG does not exist", records="-", exit_code="-", energy="-",
      metrics="the watchdog process kills the child")
def test_watchdog_kills_the_child_when_the_agent_dies(tmp_path):
    # A stand-in agent: it starts the job and the watchdog, reports their pids, then waits.
    script = ("import subprocess, sys, os, time\n"
              "from wattmeter.orphans import start_watchdog\n"
              "job = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "dog = start_watchdog(os.getpid(), job.pid)\n"
              "print(job.pid, dog.pid, flush=True)\n"
              "time.sleep(120)\n")
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    job_pid, dog_pid = map(int, agent.stdout.readline().split())
    assert _alive(job_pid) and _alive(dog_pid)
    agent.kill()
    agent.wait(timeout=10)
    assert _gone_within(job_pid, 2.0)
    assert _gone_within(dog_pid, 2.0)


@case("Agent SIGKILLed while the job runs under a shell script", records="-", exit_code="-", energy="-",
      metrics="the watchdog kills the job's whole process tree, grandchildren included")
def test_agent_sigkill_takes_the_jobs_grandchildren_with_it(tmp_path):
    # `run -- sh -c "python train.py & wait"`: PR_SET_PDEATHSIG kills only sh; the python under
    # it would run on, unmetered, holding the GPU.
    pidfile = tmp_path / "grandchild.pid"
    grandchild = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    script = f"{sys.executable} -c \"{grandchild}\" & wait"
    proc = subprocess.Popen([*WM, "run", "--fake-gpus", "1", "--records", str(tmp_path / "r.jsonl"), "--",
                             "sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env_for(tmp_path))
    _wait_for(pidfile)
    pid = int(pidfile.read_text())
    time.sleep(0.5)                # the watchdog has seen the tree
    proc.kill()                    # the agent only
    proc.wait(timeout=10)
    assert _gone_within(pid, 2.0), "the job's grandchild outlived the agent"


def test_a_normal_run_leaves_the_jobs_background_processes_alone(tmp_path):
    # The watchdog acts only when the agent dies; a job that leaves a daemon behind on purpose
    # (and exits) keeps it.
    pidfile = tmp_path / "daemon.pid"
    daemon = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    script = f"{sys.executable} -c \"{daemon}\" > /dev/null 2>&1 & sleep 0.5"
    out = subprocess.run([*WM, "run", "--fake-gpus", "1", "--records", str(tmp_path / "r.jsonl"), "--",
                          "sh", "-c", script], capture_output=True, env=env_for(tmp_path), timeout=60)
    assert out.returncode == 0
    pid = int(pidfile.read_text())
    time.sleep(0.6)
    try:
        assert _alive(pid), "a normal run's end killed the job's daemon"
    finally:
        os.kill(pid, 9)


@case("NVML init fails for the first 3 s (driver still loading)", records="the record says when the GPUs appeared",
      exit_code="the child's", energy="GPU metered from then on", metrics="-")
def test_a_late_driver_is_metered_from_when_it_appears_and_the_record_says_when(tmp_path):
    scen = tmp_path / "late.json"
    scen.write_text(json.dumps({"gpu": [{"model": "NVIDIA H100 80GB HBM3", "trace": {"kind": "constant", "power_w": 300.0}}],
                                "fault": [{"kind": "driver_not_loaded", "for_s": 3.0}]}))
    rec = tmp_path / "r.jsonl"
    t0 = time.time()
    p = run_wm(tmp_path, "run", "--fake-nvml", str(scen), "--records", str(rec), "--",
               sys.executable, "-c", "import time; time.sleep(7); raise SystemExit(3)")
    assert p.returncode == 3
    [r] = [x for x in lines(rec) if not x["checkpoint"]]
    appeared = r["gpus_appeared_unix"]
    assert appeared is not None and t0 + 2.5 <= appeared <= r["end_unix"] - 1.0
    metered_s = r["end_unix"] - appeared
    assert r["energy_j"]["gpu"] == pytest.approx(300.0 * metered_s, rel=0.15)
    assert "GPU metering pending" in p.stderr


def test_gpus_there_from_the_start_add_no_late_field(tmp_path):
    rec = tmp_path / "r.jsonl"
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", str(rec), "--", sys.executable, "-c", "pass")
    assert p.returncode == 0
    assert "gpus_appeared_unix" not in lines(rec)[-1]


# -- SIGINT at a terminal --------------------------------------------------------------------
SIGINT_CHILD = """\
import os, signal, sys, time
marks = sys.argv[1]
got = []
signal.signal(signal.SIGINT, lambda s, f: (got.append(s), open(marks, "a").write("int\\n")))
open(sys.argv[2], "w").write(str(os.getpid()))
while not got:
    time.sleep(0.02)
time.sleep(1.0)          # a second (duplicate) SIGINT would land here
sys.exit(130)
"""


def _agent_on_a_pty(tmp_path: Path, rec: Path) -> tuple[subprocess.Popen, int, Path, Path]:
    master, slave = os.openpty()

    def become_session_leader() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)      # the pty becomes the controlling terminal

    marks, pidfile = tmp_path / "marks", tmp_path / "child.pid"
    proc = subprocess.Popen([*WM, "run", "--fake-gpus", "1", "--records", str(rec), "--", sys.executable, "-c",
                             SIGINT_CHILD, str(marks), str(pidfile)], stdin=slave, stdout=slave, stderr=slave,
                            env=env_for(tmp_path), preexec_fn=become_session_leader)
    os.close(slave)
    threading.Thread(target=_drain, args=(master,), daemon=True).start()
    _wait_for(pidfile)
    time.sleep(0.3)
    return proc, master, marks, pidfile


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


@case("`kill -INT` to the agent while stdin is a terminal", records="final record", exit_code="the child's (130)",
      energy="kept", metrics="the child gets exactly one SIGINT")
def test_sigint_by_kill_with_a_terminal_is_forwarded(tmp_path):
    rec = tmp_path / "r.jsonl"
    proc, master, marks, _ = _agent_on_a_pty(tmp_path, rec)
    try:
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        os.close(master)
    assert marks.read_text() == "int\n"
    [r] = lines(rec)
    assert r["exit_code"] == 130 and r["energy_j"]["gpu"] > 0


@case("Ctrl-C at the terminal", records="final record", exit_code="the child's (130)", energy="kept",
      metrics="the child gets exactly one SIGINT (from the terminal; the agent does not repeat it)")
def test_ctrl_c_at_the_terminal_reaches_the_child_once(tmp_path):
    rec = tmp_path / "r.jsonl"
    proc, master, marks, _ = _agent_on_a_pty(tmp_path, rec)
    try:
        os.write(master, b"\x03")
        assert proc.wait(timeout=30) == 130
    finally:
        os.close(master)
    assert marks.read_text() == "int\n"
    [r] = lines(rec)
    assert r["exit_code"] == 130


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return "?"


@case("SIGINT during start-up, before the command runs", records="final record, `killed`",
      exit_code="128+2", energy="recorded (start-up only)", metrics="the command is never started")
def test_signal_before_the_command_starts_stops_the_run(tmp_path):
    from wattmeter.jobrun import SIGWAIT

    if not SIGWAIT:
        pytest.skip("SIGINT is held for the runner on Linux only")
    marker = tmp_path / "started"
    # In its own process, in `wattmeter run`'s order: hold SIGINT, then discovery (during which
    # the Ctrl-C lands), then the runner.
    script = f"""
import os, signal, sys
from wattmeter.discovery import SensorPlan, discover
from wattmeter.exporters.records import RecordSink
from wattmeter.jobrun import JobRunner, hold_signals
from wattmeter.meter import Meter
from wattmeter.runsink import RunIdentity
hold_signals()
os.kill(os.getpid(), signal.SIGINT)
found = discover(SensorPlan(fake_gpus=1, cpu="none", ram="none"))
meter = Meter(found.sensors)
sink = RecordSink({str(tmp_path / "r.jsonl")!r})
outcome = JobRunner(meter, RunIdentity("r1", "job", "h", "python"), sink).run(
    [sys.executable, "-c", "open({str(marker)!r}, 'w').close()"])
meter.close()
print(outcome.message)
sys.exit(outcome.exit_code)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env=env_for(tmp_path))
    assert p.returncode == 130, p.stderr
    assert p.stdout.strip() == "interrupted by SIGINT before the command started"
    assert not marker.exists()
    [r] = lines(tmp_path / "r.jsonl")
    assert r["exit_code"] == 130 and r["status"] == "killed"


@case("Ctrl-Z, `fg`, then Ctrl-C in an interactive bash", records="final record", exit_code="the child's (130)",
      energy="kept", metrics="the job stops and resumes as one; the child gets one SIGINT")
def test_job_control_in_an_interactive_shell(tmp_path):
    import pty
    import shutil

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    rec, marks, pidfile = tmp_path / "r.jsonl", tmp_path / "marks", tmp_path / "child.pid"
    script = tmp_path / "child.py"
    script.write_text(SIGINT_CHILD)
    pid, fd = pty.fork()
    if pid == 0:   # pragma: no cover - the shell, on the pty
        os.environ.update(env_for(tmp_path))
        os.execv(bash, [bash, "--norc", "--noprofile", "-i"])
    out = bytearray()

    def pump_until(pred: Callable[[], bool], timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                return False
            r, _, _ = select.select([fd], [], [], 0.05)
            if r:
                try:
                    out.extend(os.read(fd, 65536))
                except OSError:
                    return pred()
        return True

    try:
        cmd = " ".join([*WM, "run", "--fake-gpus", "1", "--quiet", "--records", str(rec), "--", sys.executable,
                        str(script), str(marks), str(pidfile)])
        os.write(fd, f"{cmd}\n".encode())
        assert pump_until(pidfile.exists)
        child = int(pidfile.read_text())
        os.write(fd, b"\x1a")                                   # Ctrl-Z: the whole job stops
        assert pump_until(lambda: _state(child) == "T"), out.decode(errors="replace")
        os.write(fd, b"fg; echo FG=$?\n")                    # fg's status is the job's
        assert pump_until(lambda: _state(child) in "RS"), out.decode(errors="replace")
        os.write(fd, b"\x03")                                   # Ctrl-C
        assert pump_until(lambda: b"FG=130" in out), out.decode(errors="replace")
        os.write(fd, b"exit\n")
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    assert marks.read_text() == "int\n"
    [r] = [x for x in lines(rec) if not x["checkpoint"]]
    assert r["exit_code"] == 130 and r["energy_j"]["gpu"] > 0


# -- --json ---------------------------------------------------------------------------------
@case("`run --json - -- CMD | jq` with a child that prints to stdout", records="final record; stdout holds "
      "only it", exit_code="the child's (3)", energy="kept", metrics="the child's stdout goes to stderr")
def test_json_dash_keeps_stdout_for_the_record(tmp_path):
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", "r.jsonl", "--json", "-", "--", sys.executable,
               "-c", "print('hello from the job'); raise SystemExit(3)")
    assert p.returncode == 3, p.stderr
    [line] = p.stdout.splitlines()
    assert json.loads(line)["run_id"] == lines(tmp_path / "r.jsonl")[0]["run_id"]
    assert "hello from the job" in p.stderr


def test_json_file_gets_the_final_record(tmp_path):
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", "r.jsonl", "--json", "out.json", "--", sys.executable,
               "-c", "print('job output'); raise SystemExit(3)")
    assert p.returncode == 3, p.stderr
    assert p.stdout == "job output\n"                 # the child keeps its stdout
    [rec] = lines(tmp_path / "out.json")
    assert rec == lines(tmp_path / "r.jsonl")[0]


def test_plain_json_flag_still_means_stdout(tmp_path):
    p = run_wm(tmp_path, "run", "--fake-gpus", "1", "--records", "r.jsonl", "--quiet", "--json", "--", "true")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["status"] == "completed"


# -- exporters and values that fail ----------------------------------------------------------
@case("A Pushgateway push (any exporter hook) raises at every tick and at the end",
      records="checkpoints and the final record", exit_code="the child's (3)", energy="kept",
      metrics="one warning, however many pushes failed")
def test_failing_exporter_hooks_never_cost_the_run(tmp_path):
    from wattmeter.discovery import SensorPlan, discover
    from wattmeter.jobrun import JobRunner
    from wattmeter.meter import Meter
    from wattmeter.runsink import RunIdentity

    calls = []

    def push(*_args) -> None:
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    found = discover(SensorPlan(fake_gpus=1, cpu="none", ram="none"))
    meter = Meter(found.sensors)
    sink = RecordSink(str(tmp_path / "r.jsonl"), env={"XDG_STATE_HOME": str(tmp_path / "state")})
    runner = JobRunner(meter, RunIdentity("r1", "job", "h", "python"), sink, first_checkpoint_s=0.3,
                       checkpoint_s=0.3, on_tick=[push], on_result=[push])
    try:
        outcome = runner.run([sys.executable, "-c", "import time; time.sleep(1.5); raise SystemExit(3)"])
    finally:
        meter.close()
    assert outcome.exit_code == 3 and len(calls) >= 3
    assert outcome.hook_errors == ["an exporter hook failed (ConnectionRefusedError: [Errno 111] Connection "
                                   "refused); the run went on"]
    recs = lines(tmp_path / "r.jsonl")
    assert recs[-1]["exit_code"] == 3 and recs[-1]["energy_j"]["gpu"] > 0
    assert any(r["checkpoint"] for r in recs[:-1])


@case("A non-finite value (NaN, inf) reaches a record", records="written, the value as null",
      exit_code="-", energy="every finite figure kept")
def test_non_finite_values_become_null_not_a_lost_record(tmp_path):
    sink = RecordSink(str(tmp_path / "r.jsonl"), env={"XDG_STATE_HOME": str(tmp_path / "state")})
    sink.write_record({"run_id": "r1", "checkpoint": False, "energy_j": {"gpu": 5.0, "cpu": float("nan")},
                       "joules_per_token": float("inf")})
    assert sink.close().warning is None
    assert lines(tmp_path / "r.jsonl") == [{"run_id": "r1", "checkpoint": False,
                                            "energy_j": {"gpu": 5.0, "cpu": None}, "joules_per_token": None}]


# -- the doc is generated from the registry ----------------------------------------------------
def test_reliability_doc_matches_the_cases():
    cases = all_cases()
    table = doc_table(DOC.read_text())
    assert table is not None, f"{DOC} lost its generated-table markers"
    assert table == render_table(cases), "docs/reliability.md is stale: run `python tests/reliability_cases.py`"
    for c in cases:     # every row names a test that exists
        file, name = c.test.split("::")
        assert f"def {name}(" in (ROOT / file).read_text(), c.test
