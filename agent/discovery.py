"""The one place that picks sensor backends for this machine (psutil-style selection point)."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Any, Callable

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
    nvml_deadline_s: float | None = 1.0  # every NVML call (init: 10 s); past it the GPU is stale. None: off
    gpu_wait_s: float = 1.0             # how long discover() waits for NVML before going on without it


@dataclass
class Discovered:
    sensors: list[Sensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unavailable: dict[str, SensorUnavailable] = field(default_factory=dict)
    fake: Any = None                     # the FakeNVML driving simulated GPUs, if any
    # GPUs that came late: NVML was not ready within gpu_wait_s and is retried in the background.
    # ``gpus_appeared_at`` is the clock time they appeared (None: not yet, or not late).
    gpus_pending: bool = False
    gpus_appeared_at: float | None = None

    def record_fields(self, wall: Callable[[float], float]) -> dict[str, Any]:
        """What a run record says about GPUs that were not ready at start: when they appeared
        (Unix seconds, null while still pending). Nothing when they were there from the start."""
        if not self.gpus_pending:
            return {}
        at = self.gpus_appeared_at
        return {"gpus_appeared_unix": None if at is None else round(wall(at), 3)}


def fake_requested(plan: SensorPlan, env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(plan.fake_scenario or plan.fake_gpus or env.get("WATTMETER_FAKE_NVML"))


def _gpu_sensor(plan: SensorPlan, out: Discovered) -> None:
    from .sensors.guard import with_deadlines
    from .sensors.late import LateNvmlSensor, unavailable_reason
    from .sensors.nvml import GpuSelection, NvmlSensor, load_pynvml

    # the environment is a fallback for the Python API only: a plan's own fake request wins
    scenario_path = plan.fake_scenario or (None if plan.fake_gpus else os.environ.get("WATTMETER_FAKE_NVML")) or None
    clock = plan.clock or SystemClock()
    if scenario_path or plan.fake_gpus:
        from .sim import fake_nvml
        from .sim.scenario import Scenario, load_scenario

        scenario = load_scenario(scenario_path) if scenario_path else Scenario.default(int(plan.fake_gpus or 1))
        out.fake = fake_nvml.FakeNVML(scenario, clock)
        nvml = fake_nvml.build_module(out.fake)
        out.notes.append(f"SIMULATED GPUs: fake NVML ({scenario_path or f'{plan.fake_gpus} x default'}); "
                         "GPU figures are not real measurements")
    else:
        try:
            nvml = load_pynvml()
        except ImportError:
            exc = SensorUnavailable("nvml", "the nvidia-ml-py package is not installed", "pip install nvidia-ml-py")
            out.unavailable["nvml"] = exc
            out.notes.append(f"No GPU metering: {exc.reason}. Metering CPU and RAM only ({exc.fix}).")
            return
    # Every NVML call gets a deadline, so a hung driver marks its GPU stale instead of
    # blocking the sampler, window ends or scrapes.
    guarded = nvml if plan.nvml_deadline_s is None else with_deadlines(nvml, plan.nvml_deadline_s)
    selection = GpuSelection.from_env() if plan.visible_devices is None else \
        GpuSelection([e for e in plan.visible_devices.split(",") if e.strip()])

    def connect() -> NvmlSensor:
        if plan.nvml_deadline_s is None:
            return NvmlSensor(guarded, selection, period_s=plan.gpu_period_s, wall=clock.wall, clock=clock)
        # This attempt runs on its own thread, which discover() waits on with a timeout: a hung
        # init or discovery holds only it, so its calls need no lanes; later reads get deadlines.
        with guarded.WATTMETER_DEADLINES.inline():
            return NvmlSensor(guarded, selection, period_s=plan.gpu_period_s, wall=clock.wall, clock=clock)

    def on_ready(sensor: NvmlSensor, t: float) -> None:
        out.gpus_appeared_at = t
        if out.gpus_pending:   # only a late arrival is news; on time, nothing to say
            keys = ", ".join(f"{d.key} ({d.labels.get('model', '?')})" for d in sensor.devices())
            out.notes.append(f"GPUs appeared at clock time {t:.3f} s, after NVML was retried in the "
                             f"background: {keys}; metered from then on")

    # NVML init and discovery run in the background and are retried with backoff: a driver that
    # is still loading, or hung, never delays the job's start by more than gpu_wait_s.
    late = LateNvmlSensor("nvml", connect, clock, plan.gpu_period_s, permanent=lambda exc: _nvml_gone(nvml, exc), on_ready=on_ready)
    if late.wait(plan.gpu_wait_s):
        out.sensors.append(late.connected_sensor)   # ready at once: the NVML sensor itself, as before
        return
    if late.given_up:
        exc = late.last_error if isinstance(late.last_error, SensorUnavailable) else \
            SensorUnavailable("nvml", unavailable_reason(late.last_error))
        out.unavailable["nvml"] = exc
        out.notes.append(f"No GPU metering: {exc.reason}. Metering CPU and RAM only ({exc.fix}).")
        return
    out.gpus_pending = True
    out.sensors.append(late)
    out.notes.append(f"GPU metering pending: NVML is not ready after {plan.gpu_wait_s:g} s "
                     f"({unavailable_reason(late.last_error)}); retrying in the background, "
                     "GPUs are metered from when they appear")


def _nvml_gone(nvml: Any, exc: BaseException) -> bool:
    """Failures that retrying cannot fix: no NVIDIA library on this machine, or a working driver
    that shows this job no GPU. A driver that is loading, unknown errors and timeouts are retried."""
    if not isinstance(exc, SensorUnavailable):
        return False
    cause = exc.__cause__
    if cause is None:
        return True                        # "no GPU is visible to this job"
    return isinstance(cause, nvml.NVMLError) and cause.value == nvml.NVML_ERROR_LIBRARY_NOT_FOUND


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
