"""The Prometheus collector: one ``collect()`` that renders snapshots (DESIGN §4).

A scrape reads the ledger snapshot, the attribution totals, the carbon account and the token
stats, and nothing else: no sensor, no NVML, no psutil. Energy is exposed as counters in
joules from the ledger's monotonic totals, so counters never go backwards across sensor
resets, GPU loss or driver reloads; watts and kWh are derived in PromQL.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .. import __version__
from ..attribution import PROCESS_METRIC, AttributionSnapshot
from ..health import DeviceHealth, error_kinds
from ..ledger import DeviceSnapshot
from ..model import Component, Scope

JOB_METRIC = "wattmeter_job_energy_joules_total"
GPU_LABELS = ("gpu", "uuid", "model", "hostname")
PROCESS_LABELS = ("gpu", "uuid", "hostname", "container_id", "pod", "namespace", "mig_instance", "estimated")


class MeterLike(Protocol):
    """What the collector needs of a meter (``wattmeter.meter.Meter`` has it)."""

    def snapshot(self) -> dict[str, DeviceSnapshot]: ...

    @property
    def status(self) -> Mapping[str, Any]: ...     # name -> SensorStatus(up, errors: Counter)


@dataclass(frozen=True)
class Health:
    """Health of a non-sensor component (process query, pushgateway, token scraper)."""

    sensor: str
    up: bool | None                            # None: do not export wattmeter_up for it
    errors: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class JobEnergy:
    job: str
    component: str
    energy_j: float


@dataclass
class ExportSources:
    """Everything one collector reads. Only ``meter`` is required."""

    meter: MeterLike
    hostname: str
    attribution: Any = None        # .snapshot(ledger_snapshot) -> AttributionSnapshot
    carbon: Any = None             # .snapshot() -> CarbonResult
    tokens: Any = None             # .snapshot() -> [TokenStat], .request_view() -> RequestView | None
    jobs: Callable[[], Iterable[JobEnergy]] | None = None
    health: list[Callable[[], Iterable[Health]]] = field(default_factory=list)
    pid_labels: bool = False
    max_jobs: int = 1000           # live job label values; more are dropped and counted
    # Per-device freshness (wattmeter.health.Freshness.devices): wattmeter_up{sensor,device} and a
    # sensor-level wattmeter_up that is 1 while any of its devices delivers data.
    freshness: Callable[[], list[DeviceHealth]] | None = None


def job_energy(job: str, snapshot: Mapping[str, DeviceSnapshot]) -> list[JobEnergy]:
    """A job's energy per component from a meter that belongs to the job (``wattmeter run``):
    the process-tree share where a component has one, else the host device (GPUs)."""
    out = []
    for comp in Component:
        devs = [s for s in snapshot.values() if s.device.component == comp]
        scoped = [s for s in devs if s.device.scope == Scope.PROCESS]
        if devs:
            out.append(JobEnergy(job, comp.value, sum(s.energy_j for s in (scoped or devs))))
    return out


class WattmeterCollector(Collector):
    def __init__(self, sources: ExportSources) -> None:
        self.sources = sources
        self._dropped_jobs: set[str] = set()
        self._dropped_job_count = 0
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []     # no describe-time collect: registering must never read a snapshot

    def collect(self) -> Iterator[Metric]:
        src = self.sources
        snap = src.meter.snapshot()
        attribution: AttributionSnapshot | None = src.attribution.snapshot(snap) if src.attribution else None
        yield from self._devices(snap)
        if attribution is not None:
            yield from self._attribution(snap, attribution)
        if src.jobs is not None:
            yield self._jobs()
        if src.tokens is not None:
            yield from self._tokens()
        if src.carbon is not None:
            yield from self._carbon()
        yield from self._health(attribution, snap)

    # -- devices -----------------------------------------------------------------------------
    def _devices(self, snap: Mapping[str, DeviceSnapshot]) -> Iterator[Metric]:
        host = self.sources.hostname
        gpu_e = CounterMetricFamily("wattmeter_gpu_energy_joules", "GPU energy since the agent started (J).",
                                    labels=GPU_LABELS)
        gpu_p = GaugeMetricFamily("wattmeter_gpu_power_watts", "Latest GPU power (W).", labels=GPU_LABELS)
        cpu_e = CounterMetricFamily("wattmeter_cpu_energy_joules", "CPU energy by domain since the agent started (J).",
                                    labels=("domain", "hostname", "source"))
        ram_e = CounterMetricFamily("wattmeter_ram_energy_joules", "RAM energy since the agent started (J).",
                                    labels=("hostname", "source"))
        cpu: dict[tuple[str, str], float] = {}
        ram: dict[str, float] = {}
        for key, s in snap.items():
            dev = s.device
            if dev.scope != Scope.HOST:
                continue      # process-tree shares belong to jobs, not to node-level series
            if dev.component == Component.GPU:
                labels = _gpu_labels(dev.labels, host)
                gpu_e.add_metric(labels, s.energy_j)
                if s.power_w is not None:
                    gpu_p.add_metric(labels, s.power_w)
            elif dev.component == Component.CPU:
                k = (dev.labels.get("domain", key), dev.source.value)
                cpu[k] = cpu.get(k, 0.0) + s.energy_j
            else:     # several DRAM zones of one source are one RAM series
                ram[dev.source.value] = ram.get(dev.source.value, 0.0) + s.energy_j
        for (domain, source), e in sorted(cpu.items()):
            cpu_e.add_metric([domain, host, source], e)
        for source, e in sorted(ram.items()):
            ram_e.add_metric([host, source], e)
        return iter((gpu_e, gpu_p, cpu_e, ram_e))

    def _attribution(self, snap: Mapping[str, DeviceSnapshot], a: AttributionSnapshot) -> Iterator[Metric]:
        host = self.sources.hostname
        pid = self.sources.pid_labels
        idle = CounterMetricFamily("wattmeter_gpu_idle_energy_joules",
                                   "GPU energy burned while no process used the GPU (J).",
                                   labels=("gpu", "uuid", "hostname"))
        unattr = CounterMetricFamily("wattmeter_gpu_unattributed_energy_joules",
                                     "GPU energy with processes present that no process could be charged for (J).",
                                     labels=("gpu", "uuid", "hostname"))
        proc = CounterMetricFamily(PROCESS_METRIC[:-len("_total")],
                                   "GPU energy split among processes by SM-utilisation share (J).",
                                   labels=PROCESS_LABELS + (("pid",) if pid else ()))
        for key, s in snap.items():
            if s.device.component != Component.GPU:
                continue
            gl = s.device.labels
            base = [gl.get("gpu", key), gl.get("uuid", ""), host]
            idle.add_metric(base, a.idle_j.get(key, 0.0))
            unattr.add_metric(base, a.unattributed_j.get(key, 0.0))
        for k, e in a.processes.items():
            d = snap.get(k.device_key)
            gl = d.device.labels if d is not None else {}
            values = [gl.get("gpu", k.device_key), gl.get("uuid", ""), host, k.container_id, k.pod, k.namespace,
                      k.mig_instance, "true" if k.estimated else "false"]
            proc.add_metric(values + ([k.pid] if pid else []), e)
        return iter((idle, unattr, proc))

    def _jobs(self) -> Metric:
        src = self.sources
        fam = CounterMetricFamily(JOB_METRIC[:-len("_total")], "Energy of each job by component (J).",
                                  labels=("job", "component", "hostname"))
        names: set[str] = set()
        for j in src.jobs():   # type: ignore[misc]
            if j.job not in names and len(names) >= src.max_jobs:
                self._drop_job(j.job)
                continue
            names.add(j.job)
            fam.add_metric([j.job, j.component, src.hostname], j.energy_j)
        return fam

    def _drop_job(self, job: str) -> None:
        with self._lock:
            if job not in self._dropped_jobs:
                self._dropped_jobs.add(job)
                self._dropped_job_count += 1
                if len(self._dropped_jobs) > 4 * self.sources.max_jobs:
                    self._dropped_jobs.clear()     # bounded; a job may be counted again later

    def _tokens(self) -> Iterator[Metric]:
        total = CounterMetricFamily("wattmeter_tokens", "Tokens counted by the inference server.",
                                    labels=("model", "kind"))
        per = GaugeMetricFamily("wattmeter_energy_per_token_joules",
                                "GPU energy per generated token over the recent window (J); absent while the "
                                "token source is down past its window.", labels=("model",))
        above = GaugeMetricFamily("wattmeter_energy_above_idle_per_token_joules",
                                  "GPU energy above idle per generated token over the recent window (J).",
                                  labels=("model",))
        age = GaugeMetricFamily("wattmeter_energy_per_token_age_seconds",
                                "How long ago the J/token window ended (its last token scrape) (s).", labels=("model",))
        per_kwh = GaugeMetricFamily("wattmeter_tokens_per_kwh",   # decisions: value per kWh
                                    "Generated tokens per kWh of GPU energy over the recent window.", labels=("model",))
        tokens = self.sources.tokens
        for st in tokens.snapshot():
            total.add_metric([st.model, "prompt"], st.prompt_tokens_total)
            total.add_metric([st.model, "generation"], st.generation_tokens_total)
            if st.energy_per_token_j is not None:
                per.add_metric([st.model], st.energy_per_token_j)
                if st.energy_per_token_j > 0:
                    per_kwh.add_metric([st.model], 3.6e6 / st.energy_per_token_j)
            if st.energy_above_idle_per_token_j is not None:
                above.add_metric([st.model], st.energy_above_idle_per_token_j)
            if st.age_s is not None:
                age.add_metric([st.model], st.age_s)
        yield from (total, per, above, age, per_kwh)
        view = tokens.request_view()
        if view is None:
            return
        if view.totals or view.idle_j:
            n = CounterMetricFamily("wattmeter_requests", "Requests whose energy is final.", labels=("model",))
            e = CounterMetricFamily("wattmeter_request_energy_joules", "GPU energy of final requests (J).",
                                    labels=("model",))
            gap = CounterMetricFamily("wattmeter_request_idle_energy_joules",
                                      "GPU energy while no request was open on the GPU (J).", labels=("device",))
            for m, (count, joules) in sorted(view.totals.items()):
                n.add_metric([m], count)
                e.add_metric([m], joules)
            for gpu, joules in sorted(view.idle_j.items()):
                gap.add_metric([gpu], joules)
            yield from (n, e, gap)
        if view.summary:
            req_e = GaugeMetricFamily("wattmeter_request_energy_quantile_joules",
                                      "GPU energy per request over recent requests, by quantile (J).",
                                      labels=("model", "quantile"))
            req_jpt = GaugeMetricFamily("wattmeter_request_energy_per_token_quantile_joules",
                                        "GPU energy per generated token of a request, by quantile (J).",
                                        labels=("model", "quantile"))
            for m, s in view.summary.items():
                req_e.add_metric([m, "0.5"], s.energy_j_p50)
                req_e.add_metric([m, "0.9"], s.energy_j_p90)
                if s.energy_per_token_j_p50 is not None and s.energy_per_token_j_p90 is not None:
                    req_jpt.add_metric([m, "0.5"], s.energy_per_token_j_p50)
                    req_jpt.add_metric([m, "0.9"], s.energy_per_token_j_p90)
            yield from (req_e, req_jpt)

    def _carbon(self) -> Iterator[Metric]:
        res = self.sources.carbon.snapshot()
        em = CounterMetricFamily("wattmeter_emissions_grams", "Emissions since the agent started (g CO2e).",
                                 labels=("scope",))
        for scope, grams in sorted(res.emissions_g.items()):
            em.add_metric([scope], grams)
        grid = GaugeMetricFamily("wattmeter_grid_intensity_grams_per_kwh", "Grid carbon intensity in use (g/kWh).",
                                 labels=("zone", "source"))
        grid.add_metric([res.zone, res.intensity_source], res.intensity_g_per_kwh)
        yield em
        yield grid
        if res.water_l is not None:
            water = CounterMetricFamily("wattmeter_water_litres", "Water use since the agent started (L).")
            water.add_metric([], res.water_l)
            yield water

    def _health(self, a: AttributionSnapshot | None, snap: Mapping[str, DeviceSnapshot]) -> Iterator[Metric]:
        src = self.sources
        up = GaugeMetricFamily("wattmeter_up", "1 while the sensor (device=\"\") or the device delivers data.",
                               labels=("sensor", "device"))
        errors = CounterMetricFamily("wattmeter_sensor_errors", "Failed sensor reads by error kind.",
                                     labels=("sensor", "error"))
        devices = src.freshness() if src.freshness is not None else []
        fresh_sensors: dict[str, bool] = {}
        for d in devices:
            fresh_sensors[d.sensor] = fresh_sensors.get(d.sensor, False) or d.up
        for name, st in sorted(src.meter.status.items()):
            up.add_metric([name, ""], 1.0 if fresh_sensors.get(name, st.up) else 0.0)
            # Every known kind from 0, so increase() sees the first error (issue 9: alerts that fire).
            for kind in sorted(set(error_kinds(name)) | set(st.errors)):
                errors.add_metric([name, kind], st.errors.get(kind, 0))
        for d in devices:
            up.add_metric([d.sensor, d.device], 1.0 if d.up else 0.0)
        extra = [h for fn in src.health for h in fn()]
        if a is not None:
            extra.append(Health("processes", None, {"exception": a.errors}))
        for h in extra:
            if h.up is not None:
                up.add_metric([h.sensor, ""], 1.0 if h.up else 0.0)
            for kind, n in sorted(h.errors.items()):
                errors.add_metric([h.sensor, kind], n)
        dropped = CounterMetricFamily("wattmeter_series_dropped", "Series refused by a cardinality cap.",
                                      labels=("metric",))
        if a is not None:
            dropped.add_metric([PROCESS_METRIC], a.dropped_series)
        if src.jobs is not None:
            dropped.add_metric([JOB_METRIC], self._dropped_job_count)
        simulated = any(s.device.simulated for s in snap.values())
        build = GaugeMetricFamily("wattmeter_build_info", "wattmeter version; simulated=\"true\" for fake GPUs.",
                                  labels=("version", "simulated"))
        build.add_metric([__version__, "true" if simulated else "false"], 1.0)
        return iter((up, errors, dropped, build))


def _gpu_labels(labels: Mapping[str, str], hostname: str) -> list[str]:
    return [labels.get("gpu", ""), labels.get("uuid", ""), labels.get("model", ""), hostname]


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TYPES = {"counter": "counter", "gauge": "gauge", "info": "gauge", "stateset": "gauge", "histogram": "histogram",
          "summary": "summary", "gaugehistogram": "histogram"}


class TextRenderer:
    """The Prometheus text format (0.0.4), faster than ``generate_latest`` for many series.

    prometheus_client re-validates and re-escapes every label of every sample on each scrape;
    here the rendered label block of each series is cached (label sets change rarely), so a
    scrape costs about one dict lookup and one float format per sample.
    """

    MAX_CACHED = 100_000

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._labels: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def render(self) -> bytes:
        out: list[str] = []
        cache = self._labels
        for fam in self.registry.collect():
            name = fam.name + "_total" if fam.type == "counter" else fam.name
            doc = fam.documentation.replace("\\", r"\\").replace("\n", r"\n")
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {_TYPES.get(fam.type, 'untyped')}\n")
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, *s.labels.items())
                block = cache.get(key)
                if block is None:
                    block = _label_block(s.labels)
                    with self._lock:
                        if len(cache) >= self.MAX_CACHED:
                            cache.clear()       # bounded: churned label sets never pile up
                        cache[key] = block
                out.append(f"{s.name}{block} {_value(s.value)}\n")
        return "".join(out).encode("utf-8")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_block(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _value(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    if v == float("-inf"):
        return "-Inf"
    if v != v:
        return "NaN"
    return repr(float(v))


def build_registry(sources: ExportSources) -> tuple[CollectorRegistry, WattmeterCollector]:
    """A private registry (no import-time global state) holding one wattmeter collector."""
    registry = CollectorRegistry(auto_describe=False)
    collector = WattmeterCollector(sources)
    registry.register(collector)
    return registry, collector
