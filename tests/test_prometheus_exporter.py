"""The Prometheus collector: DESIGN §4 names and labels, monotonic counters, snapshot-only scrapes."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wattmeter.attribution import AttributionConfig, Attributor
from wattmeter.carbon.accounting import CarbonResult
from wattmeter.clock import VirtualClock
from wattmeter.exporters.prometheus import (ExportSources, Health, JobEnergy, build_registry, job_energy)
from wattmeter.meter import Meter
from wattmeter.model import Component
from wattmeter.sim.fake_nvml import FakeNVML, build_module
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sim.scenario import Scenario

from scripted import ScriptedSensor, constant

H100 = "NVIDIA H100 80GB HBM3"


def _samples(registry) -> dict[str, list]:
    text = generate_latest(registry).decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _one(samples, name, **labels):
    hits = [s for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, samples.get(name))
    return hits[0]


@dataclass
class Rig:
    clock: VirtualClock
    fake: FakeNVML
    module: object
    meter: Meter
    attributor: Attributor
    n: int = 0

    def step(self, seconds: float) -> None:
        for _ in range(int(round(seconds / 0.1))):
            self.clock.advance(0.1)
            self.meter.poll()
            self.n += 1
            if self.n % 10 == 0:      # the process query runs at 1 Hz
                self.attributor.tick(self.clock.now(), self.meter.snapshot())


def _rig(scenario: Scenario, host_sensors=(), pid_labels=False) -> Rig:
    clock = VirtualClock(start=1000.0)
    fake = FakeNVML(scenario, clock)
    module = build_module(fake)
    sensor = NvmlSensor(module, GpuSelection(None))
    meter = Meter([sensor, *host_sensors], clock=clock)
    att = Attributor(sensor.read_processes, config=AttributionConfig(pid_labels=pid_labels))
    meter.poll()
    return Rig(clock, fake, module, meter, att)


def _two_gpus() -> Scenario:
    return Scenario.from_dict({"gpu": [
        {"model": H100, "trace": {"kind": "constant", "power_w": 300.0},
         "process": [{"pid": 101, "sm_util": 60}, {"pid": 102, "sm_util": 20}]},
        {"model": H100, "trace": {"kind": "constant", "power_w": 80.0}},     # idle: no process
    ]})


def _host_sensors():
    cpu_e, cpu_p = constant(50.0)
    ram_e, ram_p = constant(6.0)
    return [ScriptedSensor(cpu_e, cpu_p, key="cpu.package-0", component=Component.CPU, name="rapl"),
            ScriptedSensor(ram_e, ram_p, key="ram", component=Component.RAM, name="ram_model")]


@dataclass
class _Carbon:
    def snapshot(self) -> CarbonResult:
        return CarbonResult("FR", "France", 56.0, "table:ember-owid-2023", 1.1, 0.01,
                            {"location": 0.616, "market": 0.3}, water_l=0.018)


@dataclass
class _Tokens:
    stats: list = field(default_factory=list)

    def snapshot(self) -> list:
        from wattmeter.tokens import TokenStat
        return [TokenStat("llama-3.1-8b", 1000, 4000, 0.31, None)]

    def request_view(self) -> None:
        return None


def test_metric_names_and_labels_follow_design_section_4() -> None:
    rig = _rig(_two_gpus(), _host_sensors())
    rig.step(10.0)
    registry, _ = build_registry(ExportSources(rig.meter, "node-a", attribution=rig.attributor, carbon=_Carbon(),
                                               tokens=_Tokens(), jobs=lambda: [JobEnergy("train", "gpu", 12.5)]))
    s = _samples(registry)
    g0 = _one(s, "wattmeter_gpu_energy_joules_total", gpu="0")
    assert set(g0.labels) == {"gpu", "uuid", "model", "hostname"}
    assert g0.labels["model"] == H100 and g0.labels["hostname"] == "node-a" and g0.labels["uuid"].startswith("GPU-")
    # 300 W x 10 s; counters may trail the clock by up to a counter read (the core's business)
    assert 0.85 * 3000.0 <= g0.value <= 1.02 * 3000.0
    assert _one(s, "wattmeter_gpu_power_watts", gpu="0").value == pytest.approx(300.0, rel=0.05)
    cpu = _one(s, "wattmeter_cpu_energy_joules_total")
    assert cpu.labels == {"domain": "cpu.package-0", "hostname": "node-a", "source": "counter"}
    assert _one(s, "wattmeter_ram_energy_joules_total").labels == {"hostname": "node-a", "source": "counter"}
    idle1 = _one(s, "wattmeter_gpu_idle_energy_joules_total", gpu="1")
    assert set(idle1.labels) == {"gpu", "uuid", "hostname"}
    assert idle1.value == pytest.approx(_one(s, "wattmeter_gpu_energy_joules_total", gpu="1").value)  # nobody on it
    assert set(_one(s, "wattmeter_gpu_unattributed_energy_joules_total", gpu="0").labels) == {"gpu", "uuid", "hostname"}
    proc = _one(s, "wattmeter_process_gpu_energy_joules_total", gpu="0")
    assert set(proc.labels) == {"gpu", "uuid", "hostname", "container_id", "pod", "namespace", "mig_instance",
                                "estimated"}                              # no pid label by default
    assert _one(s, "wattmeter_job_energy_joules_total").labels == {"job": "train", "component": "gpu",
                                                                   "hostname": "node-a"}
    assert _one(s, "wattmeter_tokens_total", model="llama-3.1-8b", kind="generation").value == 4000
    assert _one(s, "wattmeter_energy_per_token_joules", model="llama-3.1-8b").value == 0.31
    assert _one(s, "wattmeter_emissions_grams_total", scope="location").value == 0.616
    assert _one(s, "wattmeter_grid_intensity_grams_per_kwh").labels == {"zone": "FR",
                                                                        "source": "table:ember-owid-2023"}
    assert _one(s, "wattmeter_water_litres_total").value == 0.018
    assert _one(s, "wattmeter_up", sensor="nvml").value == 1.0
    assert _one(s, "wattmeter_build_info").labels["simulated"] == "true"
    assert _one(s, "wattmeter_series_dropped_total", metric="wattmeter_process_gpu_energy_joules_total").value == 0


def test_process_parts_plus_idle_equal_the_device_counter_in_every_scrape() -> None:
    rig = _rig(_two_gpus(), pid_labels=True)
    registry, _ = build_registry(ExportSources(rig.meter, "h", attribution=rig.attributor, pid_labels=True))
    for _ in range(5):
        rig.step(1.3)
        s = _samples(registry)
        for gpu in ("0", "1"):
            device = _one(s, "wattmeter_gpu_energy_joules_total", gpu=gpu).value
            parts = sum(x.value for x in s["wattmeter_process_gpu_energy_joules_total"] if x.labels["gpu"] == gpu)
            parts += _one(s, "wattmeter_gpu_idle_energy_joules_total", gpu=gpu).value
            parts += _one(s, "wattmeter_gpu_unattributed_energy_joules_total", gpu=gpu).value
            assert parts == pytest.approx(device, rel=1e-3)
    by_pid = {x.labels["pid"]: x.value for x in s["wattmeter_process_gpu_energy_joules_total"]}
    assert by_pid["101"] / by_pid["102"] == pytest.approx(3.0, rel=0.01)   # 60 % vs 20 % SM


def test_scrape_reads_snapshots_only_never_nvml() -> None:
    rig = _rig(_two_gpus())
    rig.step(2.0)
    registry, _ = build_registry(ExportSources(rig.meter, "h", attribution=rig.attributor))
    calls: Counter = Counter()
    for name in dir(rig.module):
        if name.startswith("nvml"):
            original = getattr(rig.module, name)
            setattr(rig.module, name, lambda *a, _n=name, _o=original, **k: (calls.update([_n]), _o(*a, **k))[1])
    for _ in range(3):
        generate_latest(registry)
    assert not calls


def test_counters_stay_monotonic_across_counter_reset_and_gpu_loss() -> None:
    scenario = Scenario.from_dict({
        "gpu": [{"model": H100, "trace": {"kind": "constant", "power_w": 250.0},
                 "process": [{"pid": 7, "sm_util": 50}]}],
        "fault": [{"kind": "counter_reset", "gpu": 0, "at_s": 3.0},
                  {"kind": "gpu_lost", "gpu": 0, "at_s": 6.0, "for_s": 2.0}],
    })
    rig = _rig(scenario)
    registry, _ = build_registry(ExportSources(rig.meter, "h", attribution=rig.attributor))
    last: dict = {}
    saw_down = False
    for i in range(24):
        rig.step(0.5)
        s = _samples(registry)
        if i == 1:
            start_t, start_j = rig.clock.now(), _one(s, "wattmeter_gpu_energy_joules_total").value
        saw_down |= _one(s, "wattmeter_up", sensor="nvml").value == 0.0
        for name in ("wattmeter_gpu_energy_joules_total", "wattmeter_process_gpu_energy_joules_total",
                     "wattmeter_gpu_idle_energy_joules_total", "wattmeter_gpu_unattributed_energy_joules_total"):
            for x in s.get(name, []):
                key = (name, tuple(sorted(x.labels.items())))
                assert x.value >= last.get(key, 0.0), key
                last[key] = x.value
    assert saw_down
    lost = _one(s, "wattmeter_sensor_errors_total", sensor="nvml", error="gpu_lost")
    assert lost.value > 0
    device = _one(s, "wattmeter_gpu_energy_joules_total").value - start_j
    # 11 s at 250 W (from the second scrape: the total counts from the first reading): the spans
    # a reset and the loss hide from the counter are bridged from power.
    truth = 250.0 * (rig.clock.now() - start_t)
    assert 0.99 * truth <= device <= 1.01 * truth, (device, truth)


def test_pid_labels_only_when_asked() -> None:
    rig = _rig(_two_gpus(), pid_labels=True)
    rig.step(2.0)
    registry, _ = build_registry(ExportSources(rig.meter, "h", attribution=rig.attributor, pid_labels=True))
    pids = {x.labels["pid"] for x in _samples(registry)["wattmeter_process_gpu_energy_joules_total"]}
    assert pids == {"101", "102"}


def test_job_label_cap_is_counted() -> None:
    rig = _rig(_two_gpus())
    jobs = [JobEnergy(f"job-{i}", "gpu", float(i)) for i in range(5)]
    registry, _ = build_registry(ExportSources(rig.meter, "h", jobs=lambda: jobs, max_jobs=3))
    for _ in range(2):
        s = _samples(registry)
    assert len(s["wattmeter_job_energy_joules_total"]) == 3
    assert _one(s, "wattmeter_series_dropped_total", metric="wattmeter_job_energy_joules_total").value == 2


def test_extra_health_sources_and_job_energy_from_a_job_meter() -> None:
    rig = _rig(_two_gpus(), _host_sensors())
    rig.step(3.0)
    registry, _ = build_registry(ExportSources(
        rig.meter, "h", jobs=lambda: job_energy("train", rig.meter.snapshot()),
        health=[lambda: [Health("pushgateway", True, {"unreachable": 2})]]))
    s = _samples(registry)
    assert _one(s, "wattmeter_sensor_errors_total", sensor="pushgateway", error="unreachable").value == 2
    assert _one(s, "wattmeter_up", sensor="pushgateway").value == 1
    gpu = _one(s, "wattmeter_job_energy_joules_total", component="gpu").value
    assert gpu > 0 and gpu == pytest.approx(sum(x.value for x in s["wattmeter_gpu_energy_joules_total"]))
    assert {x.labels["component"] for x in s["wattmeter_job_energy_joules_total"]} == {"gpu", "cpu", "ram"}


def test_exporters_import_no_sensor_pynvml_or_psutil() -> None:
    code = ("import sys, wattmeter.exporters.prometheus, wattmeter.exporters.http, wattmeter.exporters.pushgateway, "
            "wattmeter.exporters.webconfig, wattmeter.exporters.jobexport;"
            "bad = [m for m in sys.modules if m in ('pynvml', 'psutil') or m.startswith('wattmeter.sensors')];"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_fast_text_renderer_matches_prometheus_client() -> None:
    from prometheus_client import Counter as PCounter, Gauge

    from wattmeter.exporters.prometheus import TextRenderer

    rig = _rig(_two_gpus(), _host_sensors(), pid_labels=True)
    rig.step(2.0)
    registry, _ = build_registry(ExportSources(rig.meter, "h", attribution=rig.attributor, pid_labels=True,
                                               jobs=lambda: [JobEnergy('we"ird\\job\nname', "gpu", 1.5)]))
    g = Gauge("odd_values", "inf and nan", ["k"], registry=registry)
    g.labels("inf").set(float("inf"))
    g.labels("nan").set(float("nan"))
    PCounter("plain", "no labels", registry=registry).inc(3)

    def parsed(text: str) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): repr(s.value)
                for f in text_string_to_metric_families(text) for s in f.samples if not s.name.endswith("_created")}

    renderer = TextRenderer(registry)
    for _ in range(2):     # the second render comes from the label cache
        assert parsed(renderer.render().decode()) == parsed(generate_latest(registry).decode())
