"""A drop-in for the ``pynvml`` module (nvidia-ml-py) driven by a scenario and an injectable clock.

``FakeNVML(scenario, clock)`` has pynvml's function names, signatures, units, return types and
error classes (the real ``pynvml.NVMLError_*``), so the NVML sensor code under test is the code
that runs on real GPUs. ``install(fake)`` puts a module built from it in ``sys.modules["pynvml"]``
so that other meters (CodeCarbon, Zeus) imported afterwards read the same simulated GPUs.

Functions of pynvml that the fake does not simulate raise ``NVMLError_NotSupported`` (or
``NVMLError_NoPermission`` for setters), never reaching a real driver. Scenario t=0 is ``t0``
(default: the clock's time at construction); see docs/fake-nvml.md for the timing model.

Here: init, call faults and hangs, discovery, energy and power calls. Identity, memory, process
and MIG calls are in fake_nvml_info.py, what each field id answers in fake_nvml_fields.py, and
the fake as a ``pynvml`` module (``build_module``, ``install``) in fake_nvml_module.py.
"""
from __future__ import annotations

import inspect
import operator
import threading
from typing import Any, Callable, Sequence

from ..clock import Clock, SystemClock
from .fake_gpu import SimGpu
from .fake_nvml_fields import field_values, limits_mw
from .fake_nvml_info import InfoCalls, MigHandle
from .fake_nvml_module import PURE_HELPERS, build_module, install, installed, real_pynvml, uninstall
from .scenario import INIT_FAULT_KINDS, FaultSpec, Scenario

# The public API of the simulator's NVML: the fake, its handles, and installing it as pynvml
# (sim/fake_nvml_module.py, re-exported here: docs/fake-nvml.md imports them from this module).
__all__ = ["FakeNVML", "install", "uninstall", "installed", "real_pynvml", "build_module", "FakeHandle",
           "MigHandle"]

nv = real_pynvml()
_INIT_ERRORS = {"init_failure": nv.NVML_ERROR_UNKNOWN, "driver_not_loaded": nv.NVML_ERROR_DRIVER_NOT_LOADED,
                "library_not_found": nv.NVML_ERROR_LIBRARY_NOT_FOUND}


def _err(code: int) -> Exception:
    return nv.NVMLError(code)   # maps to the NVMLError_* subclass, no driver needed


class FakeHandle:
    """Opaque device handle. Compare by identity, as real handles are opaque pointers."""

    __slots__ = ("owner", "gpu")

    def __init__(self, owner: "FakeNVML", gpu: SimGpu) -> None:
        self.owner, self.gpu = owner, gpu

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.gpu.spec.index}>"


class FakeNVML(InfoCalls):
    """Simulated NVML. Thread safe: readings are pure functions of the clock; init state is locked."""

    WATTMETER_FAKE = True

    def __init__(self, scenario: Scenario, clock: Clock | None = None, t0: float | None = None) -> None:
        self.scenario = scenario
        self.clock: Clock = clock or SystemClock()
        self.t0 = self.clock.now() if t0 is None else float(t0)
        self._gpus = [SimGpu(spec, scenario.faults) for spec in scenario.gpus]
        # Handles of each GPU and of its MIG instances, by GPU index (the query functions'
        # answers, here and in fake_nvml_info.py).
        self.handles = [FakeHandle(self, g) for g in self._gpus]
        self.mig_handles = [[MigHandle(self, g, m) for m in g.spec.mig] for g in self._gpus]
        self._init_faults = [f for f in scenario.faults if f.kind in INIT_FAULT_KINDS]
        self._lib_faults = [f for f in scenario.faults if f.function and f.gpu is None]
        self._refs = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.hung_now = 0        # calls blocked in a ``hang`` fault right now
        self.hangs_total = 0     # calls that have hung since construction

    # -- ground truth (not part of pynvml) -----------------------------------------------------
    def scenario_time(self, t: float | None = None) -> float:
        """Scenario seconds at clock time ``t`` (default: now)."""
        return (self.clock.now() if t is None else t) - self.t0

    def true_energy_j(self, index: int, t_start: float, t_end: float) -> float:
        """Exact energy of GPU ``index`` between two clock times, from the trace."""
        return self._gpus[index].trace.integral(t_start - self.t0, t_end - self.t0)

    def true_power_w(self, index: int, t: float) -> float:
        return self._gpus[index].trace.power_w(t - self.t0)

    # -- plumbing: the fake's checks behind its query functions (here and fake_nvml_info.py) ----
    def require_init(self) -> None:
        """Plumbing of the fake's query functions: Uninitialized unless nvmlInit has run."""
        if self._refs <= 0:
            raise _err(nv.NVML_ERROR_UNINITIALIZED)

    def lib_call(self, function: str, require_init: bool = True) -> float:
        """Plumbing of the fake's query functions, for calls without a handle: init state and
        library-wide call faults. Returns scenario t."""
        if require_init:
            self.require_init()
        t = self.scenario_time()
        for f in self._lib_faults:
            if f.function == function and f.active(t):
                if f.kind == "slow_call":
                    self.clock.sleep(f.delay_s)
                    t = self.scenario_time()
                elif f.kind == "hang":
                    self._hang(f)
                    t = self.scenario_time()
                elif f.kind == "not_supported":
                    raise _err(nv.NVML_ERROR_NOT_SUPPORTED)
        return t

    def _hang(self, fault: FaultSpec) -> None:
        """Block the calling thread until scenario time reaches ``fault.release_s`` (never, when it
        is infinite) or ``release_hangs()``. Polls the injected clock in short real-time waits,
        so a VirtualClock advanced by another thread releases it too."""
        with self._lock:
            self.hung_now += 1
            self.hangs_total += 1
        try:
            while not self._released.is_set():
                left = self.t0 + fault.release_s - self.clock.now()
                if left <= 0:
                    return
                self._released.wait(min(left, 0.005))
        finally:
            with self._lock:
                self.hung_now -= 1

    def release_hangs(self) -> None:
        """Let every hung call return now, and stop later calls from hanging (test teardown)."""
        self._released.set()

    def gpu_call(self, function: str, gpu: SimGpu, check_supported: bool = True) -> float:
        """Plumbing of the fake's query functions: delays, then lost / not-supported checks for
        one device call. Returns scenario t."""
        latency = gpu.latency_s(function)
        if gpu.call_faults:
            now = self.scenario_time()
            slow = gpu.call_fault(function, now, "slow_call")
            if slow is not None:
                latency += slow.delay_s
            hang = gpu.call_fault(function, now, "hang")
            if hang is not None:
                self._hang(hang)
        if latency > 0:
            self.clock.sleep(latency)   # outside any lock: other threads keep reading
        t = self.scenario_time()
        if gpu.lost_windows and gpu.is_lost(t):
            raise _err(nv.NVML_ERROR_GPU_IS_LOST)
        if check_supported and gpu.call_faults and gpu.call_fault(function, t, "not_supported"):
            raise _err(nv.NVML_ERROR_NOT_SUPPORTED)
        return t

    def dev(self, function: str, handle: Any, check_supported: bool = True) -> tuple[SimGpu, float]:
        """Plumbing of the fake's query functions: resolve a full-GPU handle for a device call
        (MIG handles: NotSupported), then ``gpu_call``. Returns the GPU and scenario t."""
        if self._refs <= 0:
            raise _err(nv.NVML_ERROR_UNINITIALIZED)
        if type(handle) is FakeHandle and handle.owner is self:
            gpu = handle.gpu
        elif type(handle) is MigHandle and handle.owner is self:
            self.gpu_call(function, handle.gpu, check_supported)
            raise _err(nv.NVML_ERROR_NOT_SUPPORTED)   # no per-instance power, clocks, ...
        else:
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        return gpu, self.gpu_call(function, gpu, check_supported)

    def wall_us(self, scenario_t: float) -> int:
        """Plumbing of the fake's query functions: scenario time as a wall-clock timestamp in µs."""
        return int(round(self.clock.wall(self.t0 + scenario_t) * 1e6))

    def not_simulated(self, name: str, code: int | None = None) -> Callable[..., Any]:
        """The stand-in for pynvml's function ``name``, which the fake does not simulate: it
        checks init as a driver call does, then raises ``NVMLError(code)`` (default:
        NoPermission for setters, NotSupported for the rest)."""
        if code is None:
            setter = name.startswith(("nvmlDeviceSet", "nvmlDeviceReset", "nvmlDeviceClear"))
            code = nv.NVML_ERROR_NO_PERMISSION if setter else nv.NVML_ERROR_NOT_SUPPORTED

        def not_simulated(*args: Any, **kwargs: Any) -> Any:
            self.require_init()
            raise _err(code)

        not_simulated.__name__ = not_simulated.__qualname__ = name
        not_simulated.__doc__ = f"{name} is not simulated by the fake NVML: raises NVMLError({code})."
        return not_simulated

    def __getattr__(self, name: str) -> Any:
        # Constants, error classes and structs come from the real module; other driver calls
        # become stubs so nothing ever reaches a real GPU through the fake.
        if name.startswith("__"):
            raise AttributeError(name)   # copy/pickle probes must not see the module's dunders
        value = getattr(real_pynvml(), name)
        if name.startswith("nvml") and inspect.isfunction(value) and name not in PURE_HELPERS:
            value = self.not_simulated(name)
            self.__dict__[name] = value
        return value

    # -- lifecycle -----------------------------------------------------------------------------
    def nvmlInitWithFlags(self, flags: int) -> None:
        # slow_call / hang faults on nvmlInit model a driver that is still loading or stuck.
        t = self.lib_call("nvmlInit", require_init=False)
        for f in self._init_faults:
            if f.active(t):
                raise _err(_INIT_ERRORS[f.kind])
        with self._lock:
            self._refs += 1
        return None

    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)
        return None

    def nvmlShutdown(self) -> None:
        with self._lock:
            if self._refs <= 0:
                raise _err(nv.NVML_ERROR_UNINITIALIZED)
            self._refs -= 1
        return None

    def nvmlErrorString(self, result: int) -> str:
        return nv.NVMLError._errcode_to_string.get(result, "Unknown Error")

    # -- discovery -----------------------------------------------------------------------------
    def nvmlDeviceGetCount(self) -> int:
        self.lib_call("nvmlDeviceGetCount")
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self.require_init()
        try:
            index = operator.index(index)   # ints, numpy ints; not floats or strings
        except TypeError:
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT) from None
        if not 0 <= index < len(self._gpus):
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        self.gpu_call("nvmlDeviceGetHandleByIndex", self._gpus[index])
        return self.handles[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle | MigHandle:
        self.require_init()   # call faults apply through the GPU found (gpu_call)
        text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        for h, migs in zip(self.handles, self.mig_handles):
            if h.gpu.spec.uuid.lower() == text.lower():
                self.gpu_call("nvmlDeviceGetHandleByUUID", h.gpu)
                return h
            for m in migs:
                if m.uuid.lower() == text.lower():
                    self.gpu_call("nvmlDeviceGetHandleByUUID", h.gpu)
                    return m
        raise _err(nv.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByPciBusId(self, pciBusId: str | bytes) -> FakeHandle:
        self.require_init()
        want = _bus_key(pciBusId.decode() if isinstance(pciBusId, bytes) else str(pciBusId))
        if want is None:
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        for h in self.handles:
            if _bus_key(h.gpu.spec.pci_bus_id) == want:
                self.gpu_call("nvmlDeviceGetHandleByPciBusId", h.gpu)
                return h
        raise _err(nv.NVML_ERROR_NOT_FOUND)

    # -- energy and power ----------------------------------------------------------------------
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        gpu, t = self.dev("nvmlDeviceGetTotalEnergyConsumption", handle)
        if not gpu.spec.sensor.energy_counter:
            raise _err(nv.NVML_ERROR_NOT_SUPPORTED)   # pre-Volta: integrate power instead
        return gpu.energy_mj(t)

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        gpu, t = self.dev("nvmlDeviceGetPowerUsage", handle)
        return int(round(gpu.power_usage(t)[0] * 1000))

    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Sequence[Any]) -> Any:
        if type(handle) is FakeHandle and handle.owner is self:   # as dev, inlined: the sampler's hot call
            if self._refs <= 0:
                raise _err(nv.NVML_ERROR_UNINITIALIZED)
            gpu, mig = handle.gpu, False
            t = self.gpu_call("nvmlDeviceGetFieldValues", gpu, False)
        elif type(handle) is MigHandle and handle.owner is self:
            self.require_init()
            gpu, t, mig = handle.gpu, self.gpu_call("nvmlDeviceGetFieldValues", handle.gpu, False), True
        else:
            (gpu, t), mig = self.dev("nvmlDeviceGetFieldValues", handle, check_supported=False), False
        off = mig or (gpu.call_faults and gpu.call_fault("nvmlDeviceGetFieldValues", t, "not_supported") is not None)
        return field_values(gpu, t, fieldIds, off, self.clock, self.t0)

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        return limits_mw(self.dev("nvmlDeviceGetPowerManagementLimit", handle)[0])[1]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return limits_mw(self.dev("nvmlDeviceGetEnforcedPowerLimit", handle)[0])[1]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        return limits_mw(self.dev("nvmlDeviceGetPowerManagementDefaultLimit", handle)[0])[1]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> list[int]:
        return list(limits_mw(self.dev("nvmlDeviceGetPowerManagementLimitConstraints", handle)[0]))


def _bus_key(text: str) -> tuple[int, int, int, int] | None:
    """Normalise '00000000:18:00.0', '0000:18:00.0' or '18:00.0' for comparison."""
    try:
        head, func = text.strip().rsplit(".", 1)
        parts = head.split(":")
        domain = int(parts[-3], 16) if len(parts) >= 3 else 0
        return domain, int(parts[-2], 16), int(parts[-1], 16), int(func, 16)
    except (ValueError, IndexError):
        return None
