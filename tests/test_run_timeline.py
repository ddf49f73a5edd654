"""A run's power timeline and peak come from the ledger's one E(t): the timeline integrates to the
recorded energy, shows no 0 W start and no spikes, and the peak lies between the average and the
most the GPU ever drew. Also: the summary is rendered from the WindowResult, and jobrun needs no
exporter (any RunSink will do)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wattmeter.discovery import SensorPlan, discover
from wattmeter import jobrun
from wattmeter.jobrun import JobRunner
from wattmeter.meter import Meter
from wattmeter.model import WindowResult
from wattmeter.runsink import RunFacts, RunIdentity, SinkClose

SCENARIOS = Path(__file__).resolve().parent.parent / "agent" / "sim" / "scenarios"


class MemorySink:
    """A RunSink that keeps what it is given: jobrun needs nothing from exporters."""

    def __init__(self) -> None:
        self.written: list[tuple[WindowResult, RunFacts]] = []

    def write(self, result: WindowResult, facts: RunFacts) -> None:
        self.written.append((result, facts))

    def close(self) -> SinkClose:
        return SinkClose()


def _run(plan: SensorPlan, seconds: float, **kw):
    found = discover(plan)
    meter = Meter(found.sensors, notes=found.notes)
    sink = MemorySink()
    ident = RunIdentity(run_id="t1", job="timeline", hostname="h", command="python")
    runner = JobRunner(meter, ident, sink, **kw)
    try:
        outcome = runner.run([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    finally:
        meter.close()
    return outcome, sink


def _integral_j(timeline: dict, key: str) -> float:
    t_prev, total = 0.0, 0.0
    for t, w in zip(timeline["t_s"], timeline["power_w"][key]):
        total += w * (t - t_prev)
        t_prev = t
    return total


def _spans(timeline: dict, key: str) -> list[tuple[float, float]]:
    """(span length, watts) per point."""
    out, t_prev = [], 0.0
    for t, w in zip(timeline["t_s"], timeline["power_w"][key]):
        out.append((t - t_prev, w))
        t_prev = t
    return out


@pytest.mark.parametrize("scenario,high_w,lag_s", [("bursty.toml", 650.0, 30.0), ("h100x2.toml", 700.0, 30.0),
                                                   ("bursty.toml", 650.0, 2.0), ("a100_power_only.toml", 398.0, 30.0)],
                         ids=["bursty-read-at-end", "h100x2-read-at-end", "bursty-read-during-run",
                              "a100-power-only"])
def test_timeline_integrates_to_the_energy_and_peak_is_bounded(scenario, high_w, lag_s, monkeypatch):
    # lag_s 2: most spans are read during the run, as on a run longer than TIMELINE_LAG_S.
    monkeypatch.setattr(jobrun, "TIMELINE_LAG_S", lag_s)
    outcome, sink = _run(SensorPlan(fake_scenario=str(SCENARIOS / scenario), cpu="none", ram="none"), 5.0)
    assert outcome.exit_code == 0
    timeline = outcome.facts.timeline
    gpus = [d for d in outcome.result.devices if d.component.value == "gpu"]
    assert gpus
    for d in gpus:
        assert abs(_integral_j(timeline, d.key) - d.energy_j) <= 0.005 * d.energy_j, d.key
        spans = _spans(timeline, d.key)
        assert len(spans) >= 4
        # No 0 W start and no spikes (earlier: 0 W, then 940-1,790 W on 700 W GPUs). Inside a long
        # counter segment the ledger places one power step, so a second may read up to the
        # GPU's high power (plus the anchoring to the window's energy).
        assert all(30.0 < w <= 1.05 * high_w for _, w in spans), spans
        assert d.avg_power_w <= d.peak_power_w <= high_w
    # The final record and the summary read the same result.
    final_result, final_facts = sink.written[-1]
    assert final_facts.exit_code == 0 and final_result is outcome.result


def test_peak_is_not_the_average_when_power_steps_up():
    # 58 W for 3 s, then 300-395 W: the peak is a ~1 s mean from the busy part, not the average
    # (earlier, short runs reported peak == average).
    outcome, _ = _run(SensorPlan(fake_scenario=str(SCENARIOS / "a100_power_only.toml"), cpu="none", ram="none"), 5.0)
    [gpu] = [d for d in outcome.result.devices if d.component.value == "gpu"]
    assert gpu.peak_power_w > 1.5 * gpu.avg_power_w
    assert 280.0 <= gpu.peak_power_w <= 398.0


def test_first_checkpoint_comes_early_and_carries_energy():
    outcome, sink = _run(SensorPlan(fake_gpus=1, cpu="none", ram="none"), 3.5, checkpoint_s=30.0)
    checkpoints = [(r, f) for r, f in sink.written if f.checkpoint]
    assert len(checkpoints) == 1                       # at ~2 s, though the interval is 30 s
    r, f = checkpoints[0]
    assert f.status == "running" and f.exit_code is None
    assert 1.9 <= r.duration_s < 3.5 and r.total_energy_j > 0
    assert outcome.result.total_energy_j > r.total_energy_j


def test_str_of_a_window_result_is_the_run_summary():
    outcome, _ = _run(SensorPlan(fake_gpus=1, cpu="none", ram="none"), 0.3)
    text = str(outcome.result)
    assert text.splitlines()[0].startswith("wattmeter: timeline in ")
    assert "[SIMULATED GPUs]" in text
    gpu = next(d for d in outcome.result.devices if d.component.value == "gpu")
    assert f"avg {gpu.avg_power_w:.1f} W" in text
    from wattmeter.summary import render

    with_facts = render(outcome.result, outcome.facts)
    assert with_facts.splitlines()[0].startswith("wattmeter: timeline completed (exit 0) in ")
    assert with_facts.splitlines()[1:] == text.splitlines()[1:]


def test_a_steady_gpu_reads_steady_from_the_back_dated_start(tmp_path):
    # `run` counts energy from when it was called, before the meter started (the window is
    # back-dated). The timeline started at the meter's start and was anchored to the window's
    # energy, so that set-up's energy was spread over every span (a steady 300 W read ~306 W);
    # started at the window's start, its first span read E(t) clamped at 0 before the first
    # reading (~262 W) and the rest ~309 W.
    scenario = tmp_path / "steady.toml"
    scenario.write_text('[[gpu]]\nmodel = "NVIDIA H100 80GB HBM3"\n[gpu.trace]\nkind = "constant"\npower_w = 300.0\n')
    found = discover(SensorPlan(fake_scenario=str(scenario), cpu="none", ram="none"))
    meter = Meter(found.sensors, notes=found.notes)
    ident = RunIdentity(run_id="t2", job="steady", hostname="h", command="python")
    runner = JobRunner(meter, ident, MemorySink(), start_t=meter.clock.now() - 0.4)   # 0.4 s of set-up
    try:
        outcome = runner.run([sys.executable, "-c", "import time; time.sleep(4)"])
    finally:
        meter.close()
    [gpu] = [d for d in outcome.result.devices if d.component.value == "gpu"]
    timeline = outcome.facts.timeline
    assert abs(timeline["t_s"][-1] - outcome.result.duration_s) < 0.05      # the whole window
    spans = _spans(timeline, gpu.key)
    assert all(abs(w - 300.0) <= 0.015 * 300.0 for _, w in spans), spans
    assert abs(gpu.energy_j - 300.0 * outcome.result.duration_s) <= 0.01 * gpu.energy_j
