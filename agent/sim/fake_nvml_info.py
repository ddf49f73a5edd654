"""Identity, memory, utilisation, thermal, process, version and MIG calls of the fake NVML (a
mixin of ``FakeNVML``; lifecycle, discovery, energy, power and field calls live in fake_nvml.py)."""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import pynvml as nv

from .fake_gpu import SimGpu
from .scenario import MIG_ARCHITECTURES, MigSpec, Scenario

if TYPE_CHECKING:  # pragma: no cover
    from .fake_nvml import FakeHandle

_ARCH_CODES = {"pascal": nv.NVML_DEVICE_ARCH_PASCAL, "volta": nv.NVML_DEVICE_ARCH_VOLTA,
               "turing": nv.NVML_DEVICE_ARCH_TURING, "ampere": nv.NVML_DEVICE_ARCH_AMPERE,
               "ga100": nv.NVML_DEVICE_ARCH_AMPERE, "ada": nv.NVML_DEVICE_ARCH_ADA,
               "hopper": nv.NVML_DEVICE_ARCH_HOPPER, "blackwell": nv.NVML_DEVICE_ARCH_BLACKWELL}
_COMPUTE_CAP = {"pascal": (6, 0), "volta": (7, 0), "turing": (7, 5), "ampere": (8, 6), "ga100": (8, 0),
                "ada": (8, 9), "hopper": (9, 0), "blackwell": (10, 0)}
_MIB = 2**20


def _err(code: int) -> Exception:
    return nv.NVMLError(code)


class MigHandle:
    """Opaque handle of one MIG instance of a simulated GPU."""

    __slots__ = ("owner", "gpu", "spec", "uuid", "name")

    def __init__(self, owner: Any, gpu: SimGpu, spec: MigSpec) -> None:
        import uuid as uuidlib  # lazy: only MIG scenarios need it, and it imports platform (~2 ms)

        self.owner, self.gpu, self.spec = owner, gpu, spec
        self.uuid = "MIG-" + str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, f"{gpu.spec.uuid}/{spec.gi_id}"))
        slices = max(1, round(spec.sm_share * 7))
        gb = max(1, round(gpu.spec.memory_total_mib * spec.sm_share / 1024))
        self.name = f"{gpu.spec.model} MIG {slices}g.{gb}gb"

    def __repr__(self) -> str:
        return f"<fake MIG device {self.gpu.spec.index}/gi{self.spec.gi_id}>"


class InfoCalls:
    """Identity, memory, process and MIG queries of ``FakeNVML`` (a mixin), answered through its
    public plumbing (``dev``, ``gpu_call``, ``lib_call``, ``require_init``, ``wall_us``)."""

    scenario: Scenario
    handles: list["FakeHandle"]
    mig_handles: list[list[MigHandle]]

    if TYPE_CHECKING:  # provided by FakeNVML
        def dev(self, function: str, handle: Any, check_supported: bool = True) -> tuple[SimGpu, float]: ...
        def lib_call(self, function: str) -> float: ...
        def require_init(self) -> None: ...
        def gpu_call(self, function: str, gpu: SimGpu, check_supported: bool = True) -> float: ...
        def scenario_time(self, t: float | None = None) -> float: ...
        def wall_us(self, scenario_t: float) -> int: ...

    def _any(self, function: str, handle: Any) -> tuple[SimGpu, MigHandle | None]:
        """Resolve a handle for calls that also answer for MIG instances."""
        if type(handle) is MigHandle and handle.owner is self:
            self.require_init()
            self.gpu_call(function, handle.gpu)
            return handle.gpu, handle
        return self.dev(function, handle)[0], None

    # -- system --------------------------------------------------------------------------------
    def nvmlSystemGetDriverVersion(self) -> str:
        self.lib_call("nvmlSystemGetDriverVersion")
        return self.scenario.driver_version

    def nvmlSystemGetNVMLVersion(self) -> str:
        self.lib_call("nvmlSystemGetNVMLVersion")
        return self.scenario.nvml_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self.lib_call("nvmlSystemGetCudaDriverVersion")
        return self.scenario.cuda_driver_version

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self.lib_call("nvmlSystemGetCudaDriverVersion_v2")
        return self.scenario.cuda_driver_version

    # -- identity ------------------------------------------------------------------------------
    def nvmlDeviceGetName(self, handle: Any) -> str:
        gpu, mig = self._any("nvmlDeviceGetName", handle)
        return mig.name if mig else gpu.spec.model

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        gpu, mig = self._any("nvmlDeviceGetUUID", handle)
        return mig.uuid if mig else gpu.spec.uuid

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self.dev("nvmlDeviceGetIndex", handle)[0].spec.index

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        return self.dev("nvmlDeviceGetMinorNumber", handle)[0].spec.index

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        gpu = self.dev("nvmlDeviceGetSerial", handle)[0]
        return str(int(gpu.spec.uuid.replace("-", "")[4:16], 16) % 10**13).zfill(13)

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        gpu = self.dev("nvmlDeviceGetPciInfo", handle)[0]
        head, func = gpu.spec.pci_bus_id.rsplit(".", 1)
        parts = head.split(":")
        domain = int(parts[0], 16) if len(parts) == 3 else 0
        bus, dev = int(parts[-2], 16), int(parts[-1], 16)
        long_id = f"{domain:08X}:{bus:02X}:{dev:02X}.{int(func, 16)}".encode()
        info = nv.nvmlPciInfo_t()
        info.busIdLegacy = f"{domain:04X}:{bus:02X}:{dev:02X}.{int(func, 16)}".encode()
        info.busId = long_id
        info.domain, info.bus, info.device = domain, bus, dev
        info.pciDeviceId = gpu.spec.pci_device_id
        info.pciSubSystemId = 0x16C110DE
        return info

    nvmlDeviceGetPciInfo_v3 = nvmlDeviceGetPciInfo

    def nvmlDeviceGetBrand(self, handle: Any) -> int:
        model = self.dev("nvmlDeviceGetBrand", handle)[0].spec.model.upper()
        if "GEFORCE" in model:
            return nv.NVML_BRAND_GEFORCE
        if "TESLA" in model or "V100" in model or "P100" in model or "T4" in model:
            return nv.NVML_BRAND_TESLA
        return nv.NVML_BRAND_NVIDIA

    def nvmlDeviceGetArchitecture(self, device: Any) -> int:
        return _ARCH_CODES[self.dev("nvmlDeviceGetArchitecture", device)[0].spec.architecture]

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        return _COMPUTE_CAP[self.dev("nvmlDeviceGetCudaComputeCapability", handle)[0].spec.architecture]

    # -- memory, utilisation, thermal, clocks --------------------------------------------------------
    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        gpu, mig = self._any("nvmlDeviceGetMemoryInfo", handle)
        t = self.scenario_time()
        share = mig.spec.sm_share if mig else 1.0
        total = int(gpu.spec.memory_total_mib * share) * _MIB
        reserved = min(total // 2, int(total * 0.006)) // _MIB * _MIB   # driver/firmware reservation
        procs = gpu.processes(t, mig.spec.gi_id if mig else None)
        used = min(total - reserved, int(sum(p.used_memory_mib for p in procs) * _MIB))
        if not version:
            return nv.c_nvmlMemory_t(total=total, free=total - reserved - used, used=used + reserved)
        mem = nv.c_nvmlMemory_v2_t()
        mem.version, mem.total, mem.reserved = version, total, reserved
        mem.used, mem.free = used, total - reserved - used
        return mem

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        gpu, t = self.dev("nvmlDeviceGetUtilizationRates", handle)
        g, m = gpu.utilization(t)
        return nv.c_nvmlUtilization_t(gpu=g, memory=m)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu, t = self.dev("nvmlDeviceGetTemperature", handle)
        if sensor != nv.NVML_TEMPERATURE_GPU:
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c(t)

    def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int, version: int = nv.nvmlTemperature_v1) -> int:
        if version != nv.nvmlTemperature_v1:
            raise _err(nv.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        gpu, t = self.dev("nvmlDeviceGetTemperatureV", handle)
        if sensor != nv.NVML_TEMPERATURE_GPU:
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c(t)

    def nvmlDeviceGetClockInfo(self, handle: Any, type: int) -> int:
        gpu, t = self.dev("nvmlDeviceGetClockInfo", handle)
        if type not in (nv.NVML_CLOCK_GRAPHICS, nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM, nv.NVML_CLOCK_VIDEO):
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.clock_mhz(type, t)

    def nvmlDeviceGetMaxClockInfo(self, handle: Any, type: int) -> int:
        gpu, _ = self.dev("nvmlDeviceGetMaxClockInfo", handle)
        if type not in (nv.NVML_CLOCK_GRAPHICS, nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM, nv.NVML_CLOCK_VIDEO):
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.max_clock_mhz(type)

    def nvmlDeviceGetComputeMode(self, handle: Any) -> int:
        self.dev("nvmlDeviceGetComputeMode", handle)
        return nv.NVML_COMPUTEMODE_DEFAULT

    def nvmlDeviceGetPersistenceMode(self, handle: Any) -> int:
        self.dev("nvmlDeviceGetPersistenceMode", handle)
        return nv.NVML_FEATURE_ENABLED

    def nvmlDeviceGetPowerManagementMode(self, handle: Any) -> int:
        self.dev("nvmlDeviceGetPowerManagementMode", handle)
        return nv.NVML_FEATURE_ENABLED

    def nvmlDeviceGetPerformanceState(self, handle: Any) -> int:
        gpu, t = self.dev("nvmlDeviceGetPerformanceState", handle)
        return nv.NVML_PSTATE_0 if gpu.load_fraction(t) > 0.02 else nv.NVML_PSTATE_8

    # -- processes -----------------------------------------------------------------------------
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        if type(handle) is MigHandle and handle.owner is self:
            self.require_init()
            t = self.gpu_call("nvmlDeviceGetComputeRunningProcesses", handle.gpu)
            procs = handle.gpu.processes(t, handle.spec.gi_id)
        else:
            gpu, t = self.dev("nvmlDeviceGetComputeRunningProcesses", handle)
            procs = gpu.processes(t)
        out = []
        for p in procs:
            info = nv.c_nvmlProcessInfo_v3_t(
                pid=p.pid, usedGpuMemory=int(p.used_memory_mib * 2**20),
                gpuInstanceId=0xFFFFFFFF if p.gi_id is None else p.gi_id,
                computeInstanceId=0xFFFFFFFF if p.gi_id is None else 0)
            out.append(nv.nvmlStructToFriendlyObject(info))   # what real pynvml returns
        return out

    nvmlDeviceGetComputeRunningProcesses_v2 = nvmlDeviceGetComputeRunningProcesses
    nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        if type(handle) is MigHandle and handle.owner is self:
            self.require_init()
            self.gpu_call("nvmlDeviceGetGraphicsRunningProcesses", handle.gpu)
        else:
            self.dev("nvmlDeviceGetGraphicsRunningProcesses", handle)
        return []   # headless compute GPUs: no graphics contexts

    nvmlDeviceGetGraphicsRunningProcesses_v2 = nvmlDeviceGetGraphicsRunningProcesses
    nvmlDeviceGetGraphicsRunningProcesses_v3 = nvmlDeviceGetGraphicsRunningProcesses

    def nvmlDeviceGetProcessUtilization(self, handle: Any, timeStamp: int) -> list[Any]:
        """Latest sample per running process newer than ``timeStamp`` (µs); NotFound if none."""
        gpu, t = self.dev("nvmlDeviceGetProcessUtilization", handle)
        r, samples = gpu.process_samples(t)
        ts = self.wall_us(r)
        if ts <= int(timeStamp) or not samples:
            raise _err(nv.NVML_ERROR_NOT_FOUND)
        return [nv.c_nvmlProcessUtilizationSample_t(pid, ts, sm, mem, 0, 0) for pid, sm, mem in samples]

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        self.lib_call("nvmlSystemGetProcessName")
        for g in self.scenario.gpus:
            for p in g.processes:
                if p.pid == pid:
                    return p.name
        raise _err(nv.NVML_ERROR_NOT_FOUND)


    # -- MIG -----------------------------------------------------------------------------------------
    def _mig_capable(self, gpu: SimGpu) -> None:
        if gpu.spec.architecture not in MIG_ARCHITECTURES:
            raise _err(nv.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetMigMode(self, device: Any) -> list[int]:
        gpu = self.dev("nvmlDeviceGetMigMode", device)[0]
        self._mig_capable(gpu)
        mode = nv.NVML_DEVICE_MIG_ENABLE if gpu.spec.mig else nv.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: Any) -> int:
        gpu = self.dev("nvmlDeviceGetMaxMigDeviceCount", device)[0]
        self._mig_capable(gpu)
        return 4 if "A30" in gpu.spec.model.upper() else 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: Any, index: int) -> MigHandle:
        gpu = self.dev("nvmlDeviceGetMigDeviceHandleByIndex", device)[0]
        self._mig_capable(gpu)
        migs = self.mig_handles[gpu.spec.index]
        if not isinstance(index, int) or not 0 <= index < len(migs):
            raise _err(nv.NVML_ERROR_NOT_FOUND)
        return migs[index]

    def nvmlDeviceIsMigDeviceHandle(self, device: Any) -> Any:
        _, mig = self._any("nvmlDeviceIsMigDeviceHandle", device)
        return ctypes.c_uint(1 if mig else 0)   # pynvml returns the c_uint itself

    def nvmlDeviceGetGpuInstanceId(self, device: Any) -> int:
        _, mig = self._any("nvmlDeviceGetGpuInstanceId", device)
        if mig is None:
            raise _err(nv.NVML_ERROR_NOT_SUPPORTED)
        return mig.spec.gi_id

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: Any) -> "FakeHandle":
        gpu, mig = self._any("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", migDevice)
        if mig is None:
            raise _err(nv.NVML_ERROR_INVALID_ARGUMENT)
        return self.handles[gpu.spec.index]

