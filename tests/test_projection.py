"""Projection to completion against scripted jobs whose true totals are known by hand."""
from __future__ import annotations

import math

import pytest

from wattmeter.errors import UsageError
from wattmeter.projection import ProgressError, ProgressTracker, parse_progress_text

STEP_S = 4.0            # one training step: 2 s at 360 W then 2 s at 240 W (mean 300 W)
STEPS = 250             # 1000 s of steady training


def steady_energy_j(t: float) -> float:
    """Energy of the alternating 360/240 W step profile after ``t`` seconds (exact)."""
    full, rest = divmod(t, STEP_S)
    return full * 1200.0 + min(rest, 2.0) * 360.0 + max(0.0, rest - 2.0) * 240.0


def steady_job(warmup_s: float = 0.0, warmup_w: float = 120.0):
    """(t, fraction, energy) at each 5 s sample. Warm-up: ``warmup_s`` at ``warmup_w`` with no progress
    (data loading, compilation); then 250 steps, progress moving once per finished step."""
    def at(t: float) -> tuple[float, float]:
        if t <= warmup_s:
            return 0.0, warmup_w * t
        s = t - warmup_s
        return min(1.0, math.floor(s / STEP_S) / STEPS), warmup_w * warmup_s + steady_energy_j(s)
    end = warmup_s + STEPS * STEP_S
    t = 0.0
    while t <= end:
        yield (t, *at(t))
        t += 5.0


def project_at(job, fraction: float):
    tracker = ProgressTracker()
    for t, f, e in job:
        tracker.add(t, f, e)
        if f >= fraction:
            return tracker.projection(), t
    raise AssertionError("job never reached the fraction")


@pytest.mark.parametrize("warmup_s", [0.0, 40.0], ids=["steady", "warmup-then-steady"])
@pytest.mark.parametrize("fraction, tolerance", [(0.10, 0.10), (0.50, 0.03)])
def test_projection_within_tolerance(warmup_s: float, fraction: float, tolerance: float) -> None:
    true_total = 120.0 * warmup_s + 300.0 * 1000.0         # 300,000 J steady; 304,800 J with warm-up
    true_end = warmup_s + 1000.0
    p, _t = project_at(steady_job(warmup_s), fraction)
    assert p is not None
    assert p.total_j == pytest.approx(true_total, rel=tolerance)
    assert p.total_low_j <= true_total <= p.total_high_j        # the band holds the truth
    assert p.end_t_s == pytest.approx(true_end, rel=tolerance)


def test_recent_rate_beats_the_average_since_start() -> None:
    # Warm-up at 120 W for 200 s with no progress, then steady: average-since-start at 10 %
    # would say (24,000 + 30,000) / 0.1 = 540,000 J; the truth is 24,000 + 300,000 = 324,000 J.
    p, _ = project_at(steady_job(200.0), 0.10)
    assert p.total_j == pytest.approx(324_000.0, rel=0.05)
    assert p.energy_j / p.fraction > 500_000.0               # what the naive average would have said


def test_band_narrows_as_the_job_advances() -> None:
    p10, _ = project_at(steady_job(40.0), 0.10)
    p50, _ = project_at(steady_job(40.0), 0.50)
    p90, _ = project_at(steady_job(40.0), 0.90)
    widths = [p.total_high_j - p.total_low_j for p in (p10, p50, p90)]
    assert widths[0] > widths[1] > widths[2] > 0


def test_exact_linear_job_golden_numbers() -> None:
    # 200 W, 1 % per 10 s: at 20 % after 200 s, 40,000 J; remaining 80 % x 200,000 J = 160,000 J.
    tracker = ProgressTracker()
    for i in range(21):
        tracker.add(10.0 * i, i / 100.0, 2000.0 * i)
    p = tracker.projection()
    assert p.total_j == pytest.approx(200_000.0)
    assert p.end_t_s == pytest.approx(1000.0)
    # Perfectly steady: the band is the 1 % floor of the remaining 160,000 J.
    assert p.total_high_j - p.total_j == pytest.approx(1600.0)
    assert p.total_kwh == pytest.approx(200_000.0 / 3.6e6)
    c, lo, hi = p.emissions_g(56.0, pue=1.1)                  # FR, PUE 1.1
    assert c == pytest.approx(200_000.0 / 3.6e6 * 1.1 * 56.0)
    assert lo < c < hi


def test_nothing_published_before_the_first_percent() -> None:
    tracker = ProgressTracker()
    tracker.add(0.0, 0.0, 0.0)
    tracker.add(10.0, 0.005, 100.0)
    assert tracker.projection() is None
    tracker.add(20.0, 0.01, 200.0)
    assert tracker.projection() is not None


def test_progress_going_backwards_warns_and_restarts() -> None:
    tracker = ProgressTracker()
    for i in range(6):
        tracker.add(10.0 * i, 0.1 * i, 1000.0 * i)            # 0 .. 50 %
    warning = tracker.add(60.0, 0.3, 6000.0)                  # resumed from an older checkpoint
    assert warning == "progress went backwards from 0.5 to 0.3; projection restarts from here"
    assert tracker.projection() is None                       # one sample since the restart
    tracker.add(70.0, 0.4, 7000.0)
    p = tracker.projection()
    assert p.total_j == pytest.approx(7000.0 + 0.6 * 10_000.0)   # energy before the restart is kept
    assert tracker.warnings == [warning]


@pytest.mark.parametrize("bad, message", [
    (1.5, "progress 1.5 is outside [0, 1]"),
    (-0.1, "progress -0.1 is outside [0, 1]"),
    ("half", "progress 'half' is not a number"),
])
def test_progress_outside_unit_interval_is_a_usage_error(bad, message) -> None:
    with pytest.raises(ProgressError) as exc:
        ProgressTracker().add(0.0, bad, 0.0)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)
    assert isinstance(exc.value, UsageError) and exc.value.exit_code == 2


def test_progress_file_text() -> None:
    assert parse_progress_text("0.42\n", "f") == 0.42
    assert parse_progress_text("420/1000", "f") == 0.42
    with pytest.raises(ProgressError, match="outside"):
        parse_progress_text("1200/1000", "progress file p.txt")
    with pytest.raises(ProgressError, match="not STEP/TOTAL"):
        parse_progress_text("a/b", "p")


def test_energy_spent_while_progress_stalls_still_counts() -> None:
    tracker = ProgressTracker()
    for i in range(6):
        tracker.add(10.0 * i, 0.1 * i, 1000.0 * i)            # 1,000 J per 10 %: 10,000 J projected
    tracker.add(60.0, 0.5, 8000.0)                            # stalled at 50 % while 3,000 J more went in
    p = tracker.projection()
    assert p.energy_j == 8000.0 and p.total_j == pytest.approx(8000.0 + 0.5 * 10_000.0)
    assert p.end_t_s == pytest.approx(60.0 + 0.5 * 100.0)
    tracker.add(70.0, 1.0, 9000.0)
    assert tracker.projection().total_j == pytest.approx(9000.0)   # done: the projection is the energy metered
