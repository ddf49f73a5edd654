"""`serve` exports value per kWh for token series (wattmeter_tokens_per_kwh)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from prometheus_client.registry import CollectorRegistry

from wattmeter.clock import VirtualClock
from wattmeter.exporters.jobexport import JobCollector
from wattmeter.exporters.prometheus import ExportSources, build_registry
from wattmeter.meter import Meter


@dataclass
class Stat:
    model: str
    prompt_tokens_total: int
    generation_tokens_total: int
    energy_per_token_j: float | None


class Tokens:
    def snapshot(self) -> list[Stat]:
        return [Stat("llama", 1000, 4000, 0.36), Stat("cold", 0, 0, None)]


def test_tokens_per_kwh_is_exported_beside_joules_per_token() -> None:
    meter = Meter([], clock=VirtualClock())
    registry, _ = build_registry(ExportSources(meter, "node-a", tokens=Tokens()))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    # 0.36 J per token -> 3.6e6 J / 0.36 J = 10,000,000 tokens per kWh; no J/token, no series.
    assert samples[("wattmeter_tokens_per_kwh", (("model", "llama"),))] == pytest.approx(1e7)
    assert ("wattmeter_tokens_per_kwh", (("model", "cold"),)) not in samples


def test_job_projected_energy_gauge() -> None:
    from wattmeter.projection import ProgressTracker

    tracker = ProgressTracker()
    for i in range(11):                          # 1 % per 10 s at 200 W
        tracker.add(10.0 * i, i / 100.0, 2000.0 * i)
    meter = Meter([], clock=VirtualClock())
    # A run exports only job-scoped series (JobCollector, issue 9); the projection is one of them.
    collector = JobCollector("train", "node-a", meter, projection=tracker.projection)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    def samples() -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}

    key = lambda bound: ("wattmeter_job_projected_energy_joules",   # noqa: E731
                         (("bound", bound), ("hostname", "node-a"), ("job", "train")))
    live = samples()
    assert live[key("central")] == pytest.approx(200_000.0)    # 20,000 J at 10 % -> 200,000 J
    assert live[key("low")] < live[key("central")] < live[key("high")]
    # Once the job has ended, the final push carries its totals only: no projection of a finished job.
    collector.final = []
    assert not any(name == "wattmeter_job_projected_energy_joules" for name, _ in samples())
