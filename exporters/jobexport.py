"""Metrics of one ``wattmeter run`` job: a scrape port while it runs, and/or Pushgateway pushes.

The composition root (``wattmeter.compose``) fills a :class:`JobExportOptions` from the typed
settings and calls ``start_job_exporter``; this module knows neither the command line nor the
settings engine.
The returned exporter's ``tick()`` runs at every checkpoint and at the end, ``close()`` once after.

Series that add up (issue 9): a run exports ONLY job-scoped series (``wattmeter_job_*``). The
host-level names (``wattmeter_gpu_*``, ``wattmeter_cpu_*``, ``wattmeter_up``...) belong to the
``serve`` daemon, so summing any metric over the fleet never counts a GPU twice, however many
runs share it. While the job runs it pushes its energy counters and a power gauge; the final push
replaces the group with the final energy totals only (no gauge), and the Pushgateway stamps the
group with ``push_time_seconds``. A finished run so never shows in a power panel, while its
energy stays queryable beside its record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..ledger import DeviceSnapshot
from .http import ListenAddress, MetricsServer
from ..model import Component, Scope
from .prometheus import JOB_METRIC, Health, JobEnergy, MeterLike, job_energy
from .pushgateway import Pusher
from .webconfig import WebConfig


@dataclass(frozen=True)
class JobExportOptions:
    """What a run exports, already parsed and checked: a scrape address (with its TLS / auth
    web-config) and/or a Pushgateway URL with the push period."""

    address: ListenAddress | None = None
    web: WebConfig | None = None
    pushgateway: str | None = None
    push_interval_s: float = 15.0


JOB_POWER_METRIC = "wattmeter_job_power_watts"
JOB_EMISSIONS_METRIC = "wattmeter_job_emissions_grams_total"
JOB_PROJECTED_METRIC = "wattmeter_job_projected_energy_joules"
JOB_HTTP_ERRORS_METRIC = "wattmeter_job_http_errors_total"


def job_power(snapshot: Mapping[str, DeviceSnapshot]) -> dict[str, float]:
    """The job's latest power per component: its process-tree share where a component has one,
    else the host device (GPUs a run uses are its own; see ``job_energy``)."""
    out: dict[str, float] = {}
    for comp in Component:
        devs = [s for s in snapshot.values() if s.device.component == comp]
        scoped = [s for s in devs if s.device.scope == Scope.PROCESS]
        powers = [s.power_w for s in (scoped or devs) if s.power_w is not None]
        if powers:
            out[comp.value] = float(sum(powers))
    return out


class JobCollector(Collector):
    """The series of one run, all named ``wattmeter_job_*`` and labelled with the job.

    ``final`` set (the job has ended): the energy totals of the record, and nothing else.
    ``projection`` (decisions): a callable giving the job's ``Projection`` or None; while the job
    runs it is exported as ``wattmeter_job_projected_energy_joules{job,hostname,bound}``.
    """

    def __init__(self, job: str, hostname: str, meter: MeterLike, carbon: Any = None,
                 projection: Callable[[], Any] | None = None) -> None:
        self.job, self.hostname, self.meter, self.carbon = job, hostname, meter, carbon
        self.projection = projection
        self.final: list[JobEnergy] | None = None
        # ``--metrics-port``: the job's own server's refused or cut-off connections, by kind
        self.http_health: Callable[[], list[Health]] | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ("job", "component", "hostname")
        energy = CounterMetricFamily(JOB_METRIC[:-len("_total")], "Energy of the job by component (J).",
                                     labels=labels)
        final = self.final
        snap = self.meter.snapshot() if final is None else {}
        for j in (final if final is not None else job_energy(self.job, snap)):
            energy.add_metric([j.job, j.component, self.hostname], j.energy_j)
        yield energy
        if self.carbon is not None:
            res = self.carbon.snapshot()      # CarbonAccountant -> CarbonResult
            em = CounterMetricFamily(JOB_EMISSIONS_METRIC[:-len("_total")], "Emissions of the job (g CO2e).",
                                     labels=("job", "scope", "hostname"))
            for scope, grams in sorted(res.emissions_g.items()):
                em.add_metric([self.job, scope, self.hostname], grams)
            yield em
        if final is None:     # a gauge only while the job runs: an ended job has no power
            power = GaugeMetricFamily(JOB_POWER_METRIC, "Latest power of the running job by component (W).",
                                      labels=labels)
            for comp, watts in sorted(job_power(snap).items()):
                power.add_metric([self.job, comp, self.hostname], watts)
            yield power
            if self.projection is not None:     # a forecast of a running job; an ended job has its total
                yield self._projected()
            if self.http_health is not None:
                yield self._http_errors(self.http_health())

    def _http_errors(self, health: list[Health]) -> Metric:
        # Every kind from 0, so an alert sees the first refusal (as serve's sensor="http" series).
        fam = CounterMetricFamily(JOB_HTTP_ERRORS_METRIC[:-len("_total")],
                                  "Connections the job's metrics server refused or cut off, by kind.",
                                  labels=("job", "hostname", "error"))
        for h in health:
            for kind, n in sorted(h.errors.items()):
                fam.add_metric([self.job, self.hostname, kind], n)
        return fam

    def _projected(self) -> Metric:
        fam = GaugeMetricFamily(JOB_PROJECTED_METRIC,
                                "Projected energy of the job at completion, with its band (J).",
                                labels=("job", "hostname", "bound"))
        p = self.projection() if self.projection is not None else None
        if p is not None:
            for bound, value in (("central", p.total_j), ("low", p.total_low_j), ("high", p.total_high_j)):
                fam.add_metric([self.job, self.hostname, bound], value)
        return fam


@dataclass
class JobExporter:
    job: str = ""
    server: MetricsServer | None = None
    pusher: Pusher | None = None
    notes: list[str] = field(default_factory=list)
    collector: JobCollector | None = None

    @property
    def final(self) -> list[JobEnergy] | None:
        return self.collector.final if self.collector is not None else None

    def finish(self, result: Any) -> None:
        """Freeze the job series to the job's window result (so the last push equals the record,
        without the few hundred ms the meter runs on after the command exits), and drop the
        power gauge: the final push leaves only totals in the gateway."""
        if self.collector is not None:
            self.collector.final = [JobEnergy(self.job, c.value, result.component_energy_j(c)) for c in Component
                                    if any(d.component == c for d in result.devices)]

    def tick(self) -> None:
        """At a checkpoint and at the end: ask for a push now (never blocks the job)."""
        if self.pusher is not None:
            self.pusher.request()

    def close(self) -> None:
        """Final push (with retries; a failure is reported, never raised), then stop serving."""
        if self.pusher is not None:
            self.pusher.close()
        if self.server is not None:
            self.server.stop()


def start_job_exporter(options: JobExportOptions, meter: Any, ident: Any, carbon: Any = None,
                       projection: Any = None) -> JobExporter | None:
    """None when neither a port nor a gateway is asked for. The exporter's ``notes`` say where
    its metrics go (the caller prints them); a gateway that is down later is only counted."""
    if options.address is None and options.pushgateway is None:
        return None
    out = JobExporter(job=ident.job, collector=JobCollector(ident.job, ident.hostname, meter, carbon,
                                                            projection=projection))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(out.collector)
    if options.address is not None:
        out.server = MetricsServer(registry, options.address, options.web, flag="--metrics-port").start()
        out.collector.http_health = out.server.health
        out.notes.append(f"serving the job's metrics at {out.server.url}/metrics")
    if options.pushgateway is not None:
        out.pusher = Pusher(options.pushgateway, ident.job, {"run_id": ident.run_id, "instance": ident.hostname},
                            registry, interval_s=options.push_interval_s)
        out.pusher.start()
        out.notes.append(f"pushing the job's metrics to {out.pusher.url} every {options.push_interval_s:g} s "
                         f"(job={ident.job}, run_id={ident.run_id})")
    return out


__all__ = ["JobExportOptions", "start_job_exporter", "JobExporter", "Health"]
