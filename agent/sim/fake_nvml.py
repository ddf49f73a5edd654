"""A drop-in for the ``pynvml`` module (nvidia-ml-py) driven by a scenario and an injectable clock.

``FakeNVML(scenario, clock)`` has pynvml's function names, signatures, units, return types and
error classes (the real ``pynvml.NVMLError_*``), so the NVML sensor code under test is the code
that runs on real GPUs. ``install(fake)`` puts a module built from it in ``sys.modules["pynvml"]``
so that other meters (CodeCarbon, Zeus) imported afterwards read the same simulated GPUs.

Functions of pynvml that the fake does not simulate raise ``NVMLError_NotSupported`` (or
``NVMLError_NoPermission`` for setters), never reaching a real driver. Scenario t=0 is ``t0``
(default: the clock's time at construction); see docs/fake-nvml.md for the timing model.
"""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import operator
import sys
import threading
import types
from typing import Any, Callable, Iterator, Sequence

import pynvml as _pynvml_at_import

from ..clock import Clock, SystemClock
from .fake_gpu import SimGpu
from .fake_nvml_info import InfoCalls, MigHandle
from .scenario import INIT_FAULT_KINDS, FaultSpec, Scenario

__all__ = ["FakeNVML", "install", "uninstall", "installed", "real_pynvml", "FakeHandle", "MigHandle"]


def real_pynvml() -> types.ModuleType:
    """The genuine nvidia-ml-py module, even while a fake is installed."""
    mod = sys.modules.get("pynvml")
    if mod is not None and getattr(mod, "WATTMETER_FAKE", False):
        return mod._WATTMETER_REAL
    return mod if mod is not None else _pynvml_at_import


nv = real_pynvml()
_INIT_ERRORS = {"init_failure": nv.NVML_ERROR_UNKNOWN, "driver_not_loaded": nv.NVML_ERROR_DRIVER_NOT_LOADED,
                "library_not_found": nv.NVML_ERROR_LIBRARY_NOT_FOUND}
_PURE_HELPERS = {"nvmlExceptionClass", "nvmlStructToFriendlyObject", "nvmlFriendlyObjectToStruct"}
_FIELD_POWER = (nv.NVML_FI_DEV_POWER_AVERAGE, nv.NVML_FI_DEV_POWER_INSTANT)
_set_field = ctypes.Structure.__setattr__   # skips pynvml's per-attribute str/bytes wrapper
_get_field = ctypes.Structure.__getattribute__
_INSTANT, _AVERAGE = nv.NVML_FI_DEV_POWER_INSTANT, nv.NVML_FI_DEV_POWER_AVERAGE
_UINT = nv.NVML_VALUE_TYPE_UNSIGNED_INT
_FIELD_ARRAYS: dict[int, Any] = {}   # array types by length (pynvml builds one per call)


def _field_array(n: int) -> Any:
    t = _FIELD_ARRAYS[n] = nv.c_nvmlFieldValue_t * n
    return t


_FIELD_LIMITS = (nv.NVML_FI_DEV_POWER_MIN_LIMIT, nv.NVML_FI_DEV_POWER_MAX_LIMIT,
                 nv.NVML_FI_DEV_POWER_DEFAULT_LIMIT, nv.NVML_FI_DEV_POWER_CURRENT_LIMIT)


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
        self._handles = [FakeHandle(self, g) for g in self._gpus]
        self._migs = [[MigHandle(self, g, m) for m in g.spec.mig] for g in self._gpus]
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

    # -- plumbing ------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.clock.now() - self.t0

    def _require_init(self) -> None:
        if self._refs <= 0:
            raise _err(nv.NVML_ERROR_UNINITIALIZED)

    def _lib_call(self, function: str, require_init: bool = True) -> float:
        """Checks for calls without a handle: init state and library-wide call faults."""
        if require_init:
            self._require_init()
        t = self._now()
        for f in self._lib_faults:
            if f.function == function and f.active(t):
                if f.kind == "slow_call":
                    self.clock.sleep(f.delay_s)
                    t = self._now()
                elif f.kind == "hang":
                    self._hang(f)
                    t = self._now()
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

    def _gpu_call(self, function: str, gpu: SimGpu, check_supported: bool = True) -> float:
        """Delays, then lost / not-supported checks for one device call. Returns scenario t."""
        latency = gpu.latency_s(function)
        if gpu.call_faults:
            now = self._now()
            slow = gpu.call_fault(function, now, "slow_call")
            if slow is not None:
                latency += slow.delay_s
            hang = gpu.call_fault(function, now, "hang")
            if hang is not None:
                self._hang(hang)
        if latency > 0:
            self.clock.sleep(latency)   # outside any lock: other threads keep reading
        t = self._now()
        if gpu.lost_windows and gpu.is_lost(t):
            raise _err(nv.NVML_ERROR_GPU_IS_LOST)
        if check_supported and gpu.call_faults and gpu.call_fault(function, t, "not_supported"):
            raise _err(nv.NVML_ERROR_NOT_SUPPORTED)
        return t

    def _dev(self, function: str, handle: Any, check_supported: bool = True) -> tuple[SimGpu, float]:
        """Resolve a full-GPU handle for a device call (MIG handles: NotSupported)."""
        if self._refs <= 0:
            raise _err(nv.NVML_ERROR_UNINITIALIZED)
        if type(handle) is FakeHandle and handle.owner is self:
            gpu = handle.gpu
        elif type(handle) is MigHandle and handle.owner is self:
            self._gpu_call(function, handle.gpu, check_supported)
            raise _err(nv.NVML_ERROR_NOT_SUPPORTED)   # no per-instance power, clocks, ...
        else:
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        return gpu, self._gpu_call(function, gpu, check_supported)

    def _wall_us(self, scenario_t: float) -> int:
        return int(round(self.clock.wall(self.t0 + scenario_t) * 1e6))

    def _stub(self, name: str) -> Callable[..., Any]:
        setter = name.startswith(("nvmlDeviceSet", "nvmlDeviceReset", "nvmlDeviceClear"))
        code = nv.NVML_ERROR_NO_PERMISSION if setter else nv.NVML_ERROR_NOT_SUPPORTED

        def not_simulated(*args: Any, **kwargs: Any) -> Any:
            self._require_init()
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
        if name.startswith("nvml") and inspect.isfunction(value) and name not in _PURE_HELPERS:
            value = self._stub(name)
            self.__dict__[name] = value
        return value

    # -- lifecycle -----------------------------------------------------------------------------
    def nvmlInitWithFlags(self, flags: int) -> None:
        # slow_call / hang faults on nvmlInit model a driver that is still loading or stuck.
        t = self._lib_call("nvmlInit", require_init=False)
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
        self._lib_call("nvmlDeviceGetCount")
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._require_init()
        try:
            index = operator.index(index)   # ints, numpy ints; not floats or strings
        except TypeError:
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT) from None
        if not 0 <= index < len(self._gpus):
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        self._gpu_call("nvmlDeviceGetHandleByIndex", self._gpus[index])
        return self._handles[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle | MigHandle:
        self._require_init()   # call faults apply through the GPU found (_gpu_call)
        text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        for h, migs in zip(self._handles, self._migs):
            if h.gpu.spec.uuid.lower() == text.lower():
                self._gpu_call("nvmlDeviceGetHandleByUUID", h.gpu)
                return h
            for m in migs:
                if m.uuid.lower() == text.lower():
                    self._gpu_call("nvmlDeviceGetHandleByUUID", h.gpu)
                    return m
        raise _err(nv.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByPciBusId(self, pciBusId: str | bytes) -> FakeHandle:
        self._require_init()
        want = _bus_key(pciBusId.decode() if isinstance(pciBusId, bytes) else str(pciBusId))
        if want is None:
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        for h in self._handles:
            if _bus_key(h.gpu.spec.pci_bus_id) == want:
                self._gpu_call("nvmlDeviceGetHandleByPciBusId", h.gpu)
                return h
        raise _err(nv.NVML_ERROR_NOT_FOUND)

    # -- energy and power ----------------------------------------------------------------------
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        gpu, t = self._dev("nvmlDeviceGetTotalEnergyConsumption", handle)
        if not gpu.spec.sensor.energy_counter:
            raise _err(nv.NVML_ERROR_NOT_SUPPORTED)   # pre-Volta: integrate power instead
        return gpu.energy_mj(t)

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        gpu, t = self._dev("nvmlDeviceGetPowerUsage", handle)
        return int(round(gpu.power_usage(t)[0] * 1000))

    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Sequence[Any]) -> Any:
        if type(handle) is FakeHandle and handle.owner is self:   # as _dev, inlined: the sampler's hot call
            if self._refs <= 0:
                raise _err(nv.NVML_ERROR_UNINITIALIZED)
            gpu, mig = handle.gpu, False
            t = self._gpu_call("nvmlDeviceGetFieldValues", gpu, False)
        elif type(handle) is MigHandle and handle.owner is self:
            self._require_init()
            gpu, t, mig = handle.gpu, self._gpu_call("nvmlDeviceGetFieldValues", handle.gpu, False), True
        else:
            (gpu, t), mig = self._dev("nvmlDeviceGetFieldValues", handle, check_supported=False), False
        off = mig or (gpu.call_faults and gpu.call_fault("nvmlDeviceGetFieldValues", t, "not_supported") is not None)
        n = len(fieldIds)
        values = (_FIELD_ARRAYS.get(n) or _field_array(n))()
        s = gpu.spec.sensor
        power = s.instant_field and not off
        for i, fid in enumerate(fieldIds):
            if power and fid.__class__ is int and (fid == _INSTANT or fid == _AVERAGE):
                # The sampler's read: fields 186/185 of a GPU that has them, filled in one step.
                w, r = gpu.power_instant(t) if fid == _INSTANT else gpu.power_average_1s(t)
                v = values[i]
                put = _set_field
                put(v, "fieldId", fid)
                _get_field(v, "value").uiVal = int(round(w * 1000))
                put(v, "valueType", _UINT)
                put(v, "timestamp", int(round(self.clock.wall(self.t0 + (t if s.field_timestamp == "read" else r)) * 1e6)))
                put(v, "latencyUsec", int(gpu.latency_s("nvmlDeviceGetFieldValues") * 1e6))
                continue
            fid, scope = fid if isinstance(fid, tuple) else (fid, 0)
            self._fill_field(values[i], int(fid), int(scope), gpu, t, off)
        return values

    def _fill_field(self, v: Any, fid: int, scope: int, gpu: SimGpu, t: float, off: bool) -> None:
        # Plain ctypes stores: pynvml's struct wrapper costs more per attribute than a real
        # driver call takes (field 186: ~10 us on an H100), and the bench meters the readers.
        put = _set_field
        put(v, "fieldId", fid)
        put(v, "scopeId", scope)
        put(v, "nvmlReturn", nv.NVML_ERROR_NOT_SUPPORTED)
        if off or scope != nv.NVML_POWER_SCOPE_GPU:
            return   # no Grace-Hopper module or memory scope in the fake
        s = gpu.spec.sensor
        if fid in _FIELD_POWER and s.instant_field:
            w, r = gpu.power_instant(t) if fid == nv.NVML_FI_DEV_POWER_INSTANT else gpu.power_average_1s(t)
            v.value.uiVal = int(round(w * 1000))
            put(v, "valueType", nv.NVML_VALUE_TYPE_UNSIGNED_INT)
        elif fid == nv.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION and s.energy_counter and \
                gpu.call_fault("nvmlDeviceGetTotalEnergyConsumption", t, "not_supported") is None:
            r = gpu.counter_grid.at(gpu.counter_grid.tick(gpu.stalled_at(t)))
            v.value.ullVal = gpu.energy_mj(t)
            put(v, "valueType", nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)
        elif fid in _FIELD_LIMITS:
            lo, hi = self._limits_mw(gpu)
            r = t
            v.value.uiVal = {nv.NVML_FI_DEV_POWER_MIN_LIMIT: lo}.get(fid, hi)
            put(v, "valueType", nv.NVML_VALUE_TYPE_UNSIGNED_INT)
        else:
            return
        # Some drivers stamp a field with the time of the read, not of the value's refresh.
        put(v, "timestamp", self._wall_us(t if s.field_timestamp == "read" else r))
        put(v, "latencyUsec", int(gpu.latency_s("nvmlDeviceGetFieldValues") * 1e6))
        put(v, "nvmlReturn", nv.NVML_SUCCESS)

    @staticmethod
    def _limits_mw(gpu: SimGpu) -> tuple[int, int]:
        limit_w = gpu.spec.power_limit_w
        return int(round(limit_w * 2 / 7)) * 1000, int(round(limit_w * 1000))   # H100: 200-700 W

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        return self._limits_mw(self._dev("nvmlDeviceGetPowerManagementLimit", handle)[0])[1]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._limits_mw(self._dev("nvmlDeviceGetEnforcedPowerLimit", handle)[0])[1]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        return self._limits_mw(self._dev("nvmlDeviceGetPowerManagementDefaultLimit", handle)[0])[1]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> list[int]:
        return list(self._limits_mw(self._dev("nvmlDeviceGetPowerManagementLimitConstraints", handle)[0]))


def _bus_key(text: str) -> tuple[int, int, int, int] | None:
    """Normalise '00000000:18:00.0', '0000:18:00.0' or '18:00.0' for comparison."""
    try:
        head, func = text.strip().rsplit(".", 1)
        parts = head.split(":")
        domain = int(parts[-3], 16) if len(parts) >= 3 else 0
        return domain, int(parts[-2], 16), int(parts[-1], 16), int(func, 16)
    except (ValueError, IndexError):
        return None


# -- installing as the pynvml module ------------------------------------------------------------

_installed: list[types.ModuleType | None] = []   # what sys.modules["pynvml"] held before each install


def build_module(fake: FakeNVML) -> types.ModuleType:
    """A ``pynvml`` module: every attribute of the real one, driver calls replaced by the fake's."""
    real = real_pynvml()
    mod = types.ModuleType("pynvml", real.__doc__)
    skip = {"__name__", "__spec__", "__loader__", "__package__", "__builtins__", "__cached__", "__doc__"}
    simulated = [name for name in dir(FakeNVML) if name.startswith("nvml")]
    no_stub = _PURE_HELPERS.union(simulated)   # the simulated ones are set below
    ns = mod.__dict__   # filled directly: ~2500 names, set on every simulated Meter's construction
    for name, value in vars(real).items():
        if name in skip:
            continue
        if name.startswith("nvml") and name not in no_stub and inspect.isfunction(value):
            value = fake._stub(name)
        ns[name] = value
    for name in simulated:
        ns[name] = getattr(fake, name)

    def _nvmlGetFunctionPointer(name: str) -> Any:   # no shared library behind the fake
        fake._require_init()
        raise _err(nv.NVML_ERROR_FUNCTION_NOT_FOUND)

    mod._nvmlGetFunctionPointer = _nvmlGetFunctionPointer
    mod._LoadNvmlLibrary = lambda: None
    mod.WATTMETER_FAKE = True
    mod.WATTMETER_FAKE_NVML = fake
    mod._WATTMETER_REAL = real
    return mod


def install(fake: FakeNVML) -> types.ModuleType:
    """Put the fake in ``sys.modules["pynvml"]``. Code that imports pynvml afterwards gets it;
    modules that imported pynvml before keep the real one (install first)."""
    mod = build_module(fake)
    _installed.append(sys.modules.get("pynvml"))
    sys.modules["pynvml"] = mod
    return mod


def uninstall() -> None:
    """Undo the latest ``install`` (a no-op when nothing is installed)."""
    if not _installed:
        return
    previous = _installed.pop()
    if previous is None:
        sys.modules.pop("pynvml", None)
    else:
        sys.modules["pynvml"] = previous


@contextlib.contextmanager
def installed(fake: FakeNVML) -> Iterator[types.ModuleType]:
    """``with installed(FakeNVML(scenario, clock)) as pynvml: ...``"""
    mod = install(fake)
    try:
        yield mod
    finally:
        uninstall()
