"""The one place that picks sensor backends for this machine (psutil-style selection point)."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Any

from .clock import Clock, SystemClock
from .sensors.base import Sensor, SensorUnavailable


@dataclass
class SensorPlan:
    gpu: str = "auto"                   # auto | none
    fake_scenario: str | None = None    # path to a fake-NVML scenario
    fake_gpus: int | None = None        # shortcut: N simulated H100s
    gpu_period_s: float = 0.1
    cpu: str = "auto"                   # auto | rapl | model | none
    ram: str = "auto"                   # auto | model | none
    pid: int | None = None              # process tree whose CPU/RAM share is metered
    cpu_tdp_w: float | None = None
    ram_w_per_gb: float | None = None
    powercap_root: str = "/sys/class/powercap"
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES override (None: from the environment)
    clock: Clock | None = None


@dataclass
class Discovered:
    sensors: list[Sensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unavailable: dict[str, SensorUnavailable] = field(default_factory=dict)
    fake: Any = None                     # the FakeNVML driving simulated GPUs, if any


def fake_requested(plan: SensorPlan, env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(plan.fake_scenario or plan.fake_gpus or env.get("WATTMETER_FAKE_NVML"))


def _gpu_sensor(plan: SensorPlan, out: Discovered) -> None:
    from .sensors.nvml import GpuSelection, NvmlSensor

    nvml = None
    # the environment is a fallback for the Python API only: a plan's own fake request wins
    scenario_path = plan.fake_scenario or (None if plan.fake_gpus else os.environ.get("WATTMETER_FAKE_NVML")) or None
    if scenario_path or plan.fake_gpus:
        from .sim import fake_nvml
        from .sim.scenario import Scenario, load_scenario

        scenario = load_scenario(scenario_path) if scenario_path else Scenario.default(int(plan.fake_gpus or 1))
        out.fake = fake_nvml.FakeNVML(scenario, plan.clock or SystemClock())
        nvml = fake_nvml.build_module(out.fake)
        out.notes.append(f"SIMULATED GPUs: fake NVML ({scenario_path or f'{plan.fake_gpus} x default'}); "
                         "GPU figures are not real measurements")
    selection = GpuSelection.from_env() if plan.visible_devices is None else \
        GpuSelection([e for e in plan.visible_devices.split(",") if e.strip()])
    try:
        clock = plan.clock or SystemClock()
        out.sensors.append(NvmlSensor(nvml, selection, period_s=plan.gpu_period_s, wall=clock.wall))
    except SensorUnavailable as exc:
        out.unavailable["nvml"] = exc
        out.notes.append(f"No GPU metering: {exc.reason}. Metering CPU and RAM only ({exc.fix}).")


def _cpu_sensor(plan: SensorPlan, out: Discovered) -> Sensor | None:
    if plan.cpu in ("auto", "rapl"):
        from .sensors.rapl import RaplSensor

        try:
            return RaplSensor(root=plan.powercap_root)
        except SensorUnavailable as exc:
            out.unavailable["rapl"] = exc
            if plan.cpu == "rapl":
                out.notes.append(f"RAPL unavailable: {exc.reason} ({exc.fix}).")
                return None
            out.notes.append(f"CPU power is modelled from utilisation: RAPL unavailable ({exc.reason}; {exc.fix}).")
    from .sensors.cpu import CpuModelSensor  # only now: hosts with RAPL never import the model

    try:
        return CpuModelSensor(tdp_w=plan.cpu_tdp_w)
    except SensorUnavailable as exc:
        out.unavailable["cpu_model"] = exc
        out.notes.append(f"No CPU metering: {exc.reason} ({exc.fix}).")
        return None


def discover(plan: SensorPlan) -> Discovered:
    # Discovery imports the sensor modules (many classes, few cycles): the cyclic collector
    # ran several full passes here that freed nothing and cost ~5 ms of the first window.
    # Reference counting still frees memory meanwhile; the collector is back on at the end.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _discover(plan)
    finally:
        if was_enabled:
            gc.enable()


def _discover(plan: SensorPlan) -> Discovered:
    out = Discovered()
    if plan.gpu != "none":    # gpu="none" (--no-gpu) beats WATTMETER_FAKE_NVML: settings resolved it
        _gpu_sensor(plan, out)
    host: list[Sensor] = []
    if plan.cpu != "none":
        cpu = _cpu_sensor(plan, out)
        if cpu is not None:
            host.append(cpu)
    has_dram = any(d.component.value == "ram" for s in host for d in s.devices())
    if plan.ram != "none" and not has_dram:
        from .sensors.ram import RamModelSensor

        kwargs = {} if plan.ram_w_per_gb is None else {"w_per_gb": plan.ram_w_per_gb}
        try:
            host.append(RamModelSensor(**kwargs))
        except SensorUnavailable as exc:
            out.unavailable["ram_model"] = exc
            out.notes.append(f"No RAM metering: {exc.reason} ({exc.fix}).")
    if plan.pid is not None and host:
        from .sensors.process import ProcessShareSensor, ProcessTree

        tree = ProcessTree(plan.pid)
        host = [ProcessShareSensor(s, tree) for s in host]
    out.sensors.extend(host)
    return out
