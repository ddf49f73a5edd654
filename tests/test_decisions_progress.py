"""`run --progress-file`: the projection follows the file between checkpoints (DecisionWriter.poll)."""
from __future__ import annotations

import io
import os
import time

import pytest

from wattmeter.decisions import DecisionWriter
from wattmeter.projection import POLL_MIN_S, ProgressFile


def set_mtime(path, unix_ns: int) -> None:
    os.utime(path, ns=(unix_ns, unix_ns))


# -- ProgressFile: one stat per look, a read only on change ------------------------------------
def test_reads_only_when_the_file_changed_and_at_most_every_half_second(tmp_path) -> None:
    path = tmp_path / "progress"
    f = ProgressFile(str(path))
    assert f.read_if_changed(100.0) is None and f.reads == 0          # no file yet: nothing read
    path.write_text("0.1")
    assert f.read_if_changed(100.1) is None                           # 0.1 s after the last look: skipped
    assert f.read_if_changed(100.0 + POLL_MIN_S) == "0.1" and f.reads == 1
    old = time.time_ns() - 3600 * 10**9                               # an hour old: no longer racy
    set_mtime(path, old)
    assert f.read_if_changed(101.0) is None and f.reads == 2          # new mtime, same text: read, no news
    for t in (101.5, 102.0, 102.5, 103.0):
        assert f.read_if_changed(t) is None
    assert f.reads == 2                                               # unchanged stat: no reads at all
    path.write_text("0.25")                                           # size and mtime change
    set_mtime(path, old + 10**9)
    assert f.read_if_changed(103.5) == "0.25" and f.reads == 3
    assert f.read_if_changed(103.6, force=True) is None and f.reads == 3   # force skips the wait only


def test_a_same_size_write_inside_one_mtime_tick_is_still_seen(tmp_path) -> None:
    """'0.41' then '0.42' with the same mtime, size and inode: the racy re-read catches it."""
    path = tmp_path / "progress"
    tick = time.time_ns()
    path.write_text("0.41")
    set_mtime(path, tick)
    f = ProgressFile(str(path))
    assert f.read_if_changed(10.0) == "0.41"
    with open(path, "r+") as out:                                     # rewrite in place: same inode
        out.write("0.42")
    set_mtime(path, tick)
    assert f.read_if_changed(11.0) == "0.42"


# -- DecisionWriter.poll -----------------------------------------------------------------------
def test_the_projection_follows_polls_without_any_record(tmp_path) -> None:
    path = tmp_path / "progress"
    w = DecisionWriter(progress_file=str(path), err=io.StringIO())
    # 10 % per 10 s at 300 W: 3,000 J per 10 %, so 30,000 J and the end at t = 100 s.
    for i in range(1, 5):
        path.write_text(f"{i}/10")
        assert w.poll(10.0 * i, 3000.0 * i)
    p = w.projection()
    assert p.fraction == pytest.approx(0.4)
    assert p.total_j == pytest.approx(30_000.0) and p.end_t_s == pytest.approx(100.0)


def test_poll_is_rate_limited_and_pairs_progress_with_energy_now(tmp_path) -> None:
    path = tmp_path / "progress"
    energy = {"j": 1000.0}
    calls = []

    def energy_now() -> float:
        calls.append(energy["j"])
        return energy["j"]

    w = DecisionWriter(progress_file=str(path), err=io.StringIO(), energy_now=energy_now)
    path.write_text("0.1")
    assert w.poll(50.0) and calls == [1000.0]
    path.write_text("0.2")
    energy["j"] = 2000.0
    assert not w.poll(50.0 + POLL_MIN_S / 2)          # too soon: not even a stat
    assert not w.poll(50.0 + POLL_MIN_S / 2)
    assert w.poll(50.0 + POLL_MIN_S) and calls == [1000.0, 2000.0]
    assert not w.poll(51.0 + POLL_MIN_S) and calls == [1000.0, 2000.0]   # no change: energy not asked for
    # 1,000 J per 10 %: 10,000 J in all
    assert w.projection().total_j == pytest.approx(10_000.0)


def test_without_an_energy_source_poll_waits_for_the_records(tmp_path) -> None:
    path = tmp_path / "progress"
    path.write_text("0.5")
    w = DecisionWriter(progress_file=str(path), err=io.StringIO())
    assert not w.poll(1.0)
    assert not DecisionWriter(err=io.StringIO()).poll(1.0, 5.0)      # no progress file: nothing to do


def test_records_use_poll_and_the_final_record_always_looks(tmp_path) -> None:
    path = tmp_path / "progress"
    w = DecisionWriter(progress_file=str(path), err=io.StringIO())
    for i in range(1, 5):                               # polled between checkpoints: 3,000 J per 10 %
        path.write_text(f"{i}/10")
        w.poll(10.0 * i, 3000.0 * i)
    path.write_text("5/10")
    # A checkpoint 0.1 s after the last poll does not look again; the 13,000 J spent at 40 %
    # still count: 13,000 + 0.6 x 30,000 = 31,000 J.
    cp = w.extra_fields({"end_unix": 40.1, "energy_j": {"total": 13_000.0}, "checkpoint": True})
    assert cp["projection"]["fraction"] == pytest.approx(0.4)
    assert cp["projection"]["projected_energy_j"] == pytest.approx(31_000.0)
    # The final record looks at once: the job's last write (done) is in it.
    path.write_text("10/10")
    final = w.extra_fields({"end_unix": 40.2, "energy_j": {"total": 30_500.0}, "checkpoint": False})
    assert final["projection"]["fraction"] == 1.0
    assert final["projection"]["projected_energy_j"] == pytest.approx(30_500.0)   # done: what was metered


def test_bad_progress_in_a_poll_is_one_warning_never_an_error(tmp_path) -> None:
    path = tmp_path / "progress"
    err = io.StringIO()
    w = DecisionWriter(progress_file=str(path), err=err)
    path.write_text("0.6")
    assert w.poll(1.0, 600.0)
    path.write_text("1.7")
    assert not w.poll(2.0, 700.0)
    path.write_text("0.3")
    assert w.poll(3.0, 800.0)                                         # backwards: a warning, then on
    path.write_text("1.70")
    assert not w.poll(4.0, 900.0)
    lines = err.getvalue().splitlines()
    assert len(lines) == 3
    assert "'1.7' is outside [0, 1]" in lines[0] and "went backwards from 0.6 to 0.3" in lines[1]
    assert w.tracker.fraction == 0.3


def test_follow_polls_from_the_meters_sampler(tmp_path) -> None:
    """A real meter on a fake GPU: each write shows in the projection within a second, no record."""
    from wattmeter.meter import Meter

    path = tmp_path / "progress"
    w = DecisionWriter(progress_file=str(path), err=io.StringIO())
    meter = Meter(fake_gpus=1, interval_s=0.05)
    try:
        w.follow(meter)
        meter.start()
        for step in range(1, 5):
            time.sleep(0.3)
            path.write_text(f"{step}/100")
            deadline = time.monotonic() + 1.5
            while w.tracker.fraction != step / 100 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert w.tracker.fraction == step / 100, f"step {step} not seen within 1.5 s"
        p = w.projection()
        assert p is not None and p.fraction == pytest.approx(0.04)
        assert p.energy_j > 0 and p.total_j > p.energy_j                  # paired with metered energy
        assert abs(p.end_t_s - time.time()) < 3600                        # on the wall clock, like records
    finally:
        meter.close()
