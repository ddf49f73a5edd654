"""`serve` exports value per kWh for token series (wattmeter_tokens_per_kwh)."""
from __future__ import annotations

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from prometheus_client.registry import CollectorRegistry

from wattmeter.clock import VirtualClock
from wattmeter.exporters.jobexport import JobCollector
from wattmeter.exporters.prometheus import ExportSources, build_registry
from wattmeter.meter import Meter
from wattmeter.tokens.join import TokenStat


class Tokens:
    """A token source as serve's joiner presents it (real TokenStat rows, no per-request view)."""

    def snapshot(self) -> list[TokenStat]:
        return [TokenStat("llama", 1000, 4000, 0.36, 0.1), TokenStat("cold", 0, 0, None, None)]

    def request_view(self) -> None:
        return None


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
