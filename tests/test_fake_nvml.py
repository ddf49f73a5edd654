"""The fake NVML backend: pynvml's API, the driver's timing, faults, and installation."""
from __future__ import annotations

import inspect
import sys
import threading
import time

import pynvml
import pytest

from wattmeter.clock import VirtualClock
from wattmeter.sim.fake_nvml import FakeNVML, install, installed, real_pynvml, uninstall
from wattmeter.sim.scenario import Scenario

REAL = real_pynvml()


def make(gpus, faults=(), clock=None, **top):
    """A FakeNVML over an inline scenario, initialised, on a virtual clock at scenario t=0."""
    scenario = Scenario.from_dict({"gpu": list(gpus), "fault": list(faults), **top})
    clock = clock or VirtualClock(start=1000.0)
    fake = FakeNVML(scenario, clock)
    return fake, clock


def at(clock: VirtualClock, fake: FakeNVML, scenario_t: float) -> None:
    clock.advance(fake.t0 + scenario_t - clock.now())


def gpu(trace=None, **extra):
    g = {"model": "NVIDIA H100 80GB HBM3", **extra}
    if trace:
        g["trace"] = trace
    return g


CONST_300 = {"kind": "constant", "power_w": 300.0}
RAMP = {"kind": "ramp", "from_w": 100.0, "to_w": 1100.0, "over_s": 10.0}   # +100 W per second


# -- counter timing -----------------------------------------------------------------------------

def test_energy_counter_moves_only_at_its_refresh_grid():
    fake, clock = make([gpu(CONST_300, energy_offset_j=1000.0,
                            sensor={"counter_refresh_s": 0.1, "counter_phase_s": 0.03})])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 0.03)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) == 1_000_000 + 9_000   # 300 W x 30 ms, in mJ
    for k in range(1, 6):
        edge = 0.03 + k * 0.1
        at(clock, fake, edge - 1e-4)
        before = fake.nvmlDeviceGetTotalEnergyConsumption(h)
        at(clock, fake, edge + 1e-4)
        after = fake.nvmlDeviceGetTotalEnergyConsumption(h)
        assert after - before == 30_000                      # a 100 ms step of 300 W
    at(clock, fake, 0.58)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) == 1_000_000 + 159_000   # still the 0.53 value


class WobblyWallClock(VirtualClock):
    """A system clock's monotonic-to-wall offset, read at each conversion, moves by a few us."""

    def __init__(self, start: float) -> None:
        super().__init__(start=start)
        self.calls = 0

    def wall(self, t: float) -> float:
        self.calls += 1
        return super().wall(t) + 3e-6 * (self.calls % 3)


def test_a_field_refresh_is_stamped_once_whatever_the_wall_clock_does_between_reads():
    # A driver stamps a value when it refreshes; re-converting the refresh instant at each read
    # on a wobbling wall clock gave one refresh several stamps.
    fake, clock = make([gpu(CONST_300)], clock=WobblyWallClock(start=1000.0))
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 5.001)
    stamps = set()
    for _ in range(4):
        clock.advance(0.002)                      # inside one 20 ms refresh of field 186
        for fid in (186, 185):
            stamps.add((fid, fake.nvmlDeviceGetFieldValues(h, [fid])[0].timestamp))
    assert len(stamps) == 2


def test_counter_deltas_equal_ground_truth_between_refresh_instants():
    fake, clock = make([gpu({"kind": "square", "high_w": 650, "low_w": 90, "high_s": 0.15, "low_s": 0.25},
                            sensor={"counter_phase_s": 0.0})])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 1.05)
    e0 = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    at(clock, fake, 61.07)
    e1 = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    truth_j = fake.true_energy_j(0, fake.t0 + 1.0, fake.t0 + 61.0)   # refresh instants 1.0 and 61.0
    assert truth_j == pytest.approx(60 * 300.0)
    assert abs((e1 - e0) / 1000 - truth_j) <= 0.002


def test_a_jittered_counter_refreshes_off_the_grid_but_in_order_and_the_truth_still_holds():
    jitter = 0.0025
    fake, clock = make([gpu(CONST_300, energy_offset_j=0.0,
                            sensor={"counter_refresh_s": 0.09997, "counter_phase_s": 0.03, "counter_jitter_s": jitter})])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    grid = fake._gpus[0].counter_grid
    offsets = [grid.at(k) - (0.03 + k * 0.09997) for k in range(400)]
    assert max(map(abs, offsets)) <= jitter and max(offsets) > 0.8 * jitter and min(offsets) < -0.8 * jitter
    for k in (5, 77, 391):                       # the counter moves exactly at each jittered refresh
        r = grid.at(k)
        at(clock, fake, r - 1e-5)
        before = fake.nvmlDeviceGetTotalEnergyConsumption(h)
        at(clock, fake, r + 1e-5)
        after = fake.nvmlDeviceGetTotalEnergyConsumption(h)
        assert grid.tick(r + 1e-5) == k and grid.tick(r - 1e-5) == k - 1
        assert after - before == pytest.approx((r - grid.at(k - 1)) * 300.0 * 1000, abs=1)
        assert after / 1000 == pytest.approx(fake.true_energy_j(0, fake.t0, fake.t0 + r), abs=0.002)


def test_counter_jitter_above_half_a_period_is_a_scenario_error():
    from wattmeter.sim.scenario_loader import ScenarioError
    with pytest.raises(ScenarioError, match="counter_jitter_s"):
        make([gpu(CONST_300, sensor={"counter_refresh_s": 0.1, "counter_jitter_s": 0.08})])


# -- power semantics ----------------------------------------------------------------------------

def power_reader(mode: str):
    fake, clock = make([gpu(RAMP, sensor={"power_usage": mode, "counter_phase_s": 0.0})])
    fake.nvmlInit()
    return fake, clock, fake.nvmlDeviceGetHandleByIndex(0)


def test_average_mode_reports_mean_of_the_second_before_the_last_refresh():
    fake, clock, h = power_reader("average_1s")
    at(clock, fake, 5.05)
    assert fake.nvmlDeviceGetPowerUsage(h) == 550_000      # mean of 4 s..5 s, not the 605 W now
    at(clock, fake, 5.099)
    assert fake.nvmlDeviceGetPowerUsage(h) == 550_000      # unchanged until the next refresh
    at(clock, fake, 5.1)
    assert fake.nvmlDeviceGetPowerUsage(h) == 560_000


def test_instant_mode_reports_power_at_the_last_refresh():
    fake, clock, h = power_reader("instant")
    at(clock, fake, 5.05)
    assert fake.nvmlDeviceGetPowerUsage(h) == 600_000


def test_average_power_hides_bursts_that_the_instant_field_shows():
    fake, clock = make([gpu({"kind": "square", "high_w": 650, "low_w": 90, "high_s": 0.15, "low_s": 0.25})])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    averaged, instant = [], []
    for i in range(400):
        at(clock, fake, 2.0 + i * 0.013)
        averaged.append(fake.nvmlDeviceGetPowerUsage(h) / 1000)
        instant.append(fake.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT])[0].value.uiVal / 1000)
    assert 257 < min(averaged) and max(averaged) < 343        # 1 s window over a 0.4 s period
    assert max(instant) == pytest.approx(650) and min(instant) == pytest.approx(90)


def test_field_values_have_per_entry_returns_timestamps_and_units():
    fake, clock, h = power_reader("average_1s")
    at(clock, fake, 5.013)
    values = fake.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT,
                                               (pynvml.NVML_FI_DEV_POWER_AVERAGE, pynvml.NVML_POWER_SCOPE_GPU),
                                               (pynvml.NVML_FI_DEV_POWER_INSTANT, pynvml.NVML_POWER_SCOPE_MODULE),
                                               pynvml.NVML_FI_DEV_ECC_CURRENT])
    assert isinstance(values[0], pynvml.c_nvmlFieldValue_t)
    assert [v.nvmlReturn for v in values] == [pynvml.NVML_SUCCESS, pynvml.NVML_SUCCESS,
                                              pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NOT_SUPPORTED]
    inst, avg = values[0], values[1]
    assert inst.value.uiVal == 599_000                     # box mean over 4.98..5.00 s
    assert avg.value.uiVal == 550_000                      # field 185 = the 1 s average
    assert inst.valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    assert inst.timestamp == round(clock.wall(fake.t0 + 5.0) * 1e6)   # us, at the refresh instant
    assert avg.scopeId == pynvml.NVML_POWER_SCOPE_GPU


def test_gpu_without_power_fields_still_answers_the_call():
    fake, clock = make([gpu(CONST_300, sensor={"instant_field": False})])
    fake.nvmlInit()
    values = fake.nvmlDeviceGetFieldValues(fake.nvmlDeviceGetHandleByIndex(0), [186, 185])
    assert [v.nvmlReturn for v in values] == [pynvml.NVML_ERROR_NOT_SUPPORTED] * 2


def test_gpu_without_energy_counter_raises_not_supported():
    fake, _ = make([gpu(CONST_300, sensor={"energy_counter": False})])
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetTotalEnergyConsumption(fake.nvmlDeviceGetHandleByIndex(0))


# -- lifecycle and faults -------------------------------------------------------------------------

def test_calls_before_init_and_after_shutdown_raise_uninitialized():
    fake, _ = make([gpu()])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetPowerUsage(h)


@pytest.mark.parametrize("kind, error", [("init_failure", pynvml.NVMLError_Unknown),
                                         ("driver_not_loaded", pynvml.NVMLError_DriverNotLoaded),
                                         ("library_not_found", pynvml.NVMLError_LibraryNotFound)])
def test_init_faults_raise_the_real_error_class(kind, error):
    fake, clock = make([gpu()], [{"kind": kind, "for_s": 2.0}])
    with pytest.raises(error):
        fake.nvmlInit()
    at(clock, fake, 2.0)
    fake.nvmlInit()                                        # the window has passed
    assert fake.nvmlDeviceGetCount() == 1


def test_lost_gpu_fails_every_call_then_returns_with_a_restarted_counter():
    fake, clock = make([gpu(CONST_300, energy_offset_j=5e6), gpu(CONST_300)],
                       [{"kind": "gpu_lost", "gpu": 0, "at_s": 10.0, "for_s": 5.0}])
    fake.nvmlInit()
    h, other = fake.nvmlDeviceGetHandleByIndex(0), fake.nvmlDeviceGetHandleByIndex(1)
    at(clock, fake, 9.0)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) > 5e9
    at(clock, fake, 12.0)
    for call in (lambda: fake.nvmlDeviceGetTotalEnergyConsumption(h), lambda: fake.nvmlDeviceGetPowerUsage(h),
                 lambda: fake.nvmlDeviceGetName(h), lambda: fake.nvmlDeviceGetFieldValues(h, [186]),
                 lambda: fake.nvmlDeviceGetHandleByIndex(0)):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            call()
    assert fake.nvmlDeviceGetPowerUsage(other) == 300_000   # the other GPU is unaffected
    at(clock, fake, 16.0)
    back = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    assert 0 < back <= 300_000                             # <= 1 s x 300 W since the reload


def test_counter_reset_restarts_from_zero_and_keeps_counting():
    fake, clock = make([gpu(CONST_300, sensor={"counter_phase_s": 0.0})],
                       [{"kind": "counter_reset", "gpu": 0, "at_s": 3.05}])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 3.0)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) > 900_000
    at(clock, fake, 3.06)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) == 0
    at(clock, fake, 4.05)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) == 285_000   # 3.05 -> 4.0 at 300 W


def test_not_supported_fault_applies_only_inside_its_window():
    fake, clock = make([gpu(CONST_300)],
                       [{"kind": "not_supported", "function": "nvmlDeviceGetPowerUsage", "at_s": 1, "for_s": 2},
                        {"kind": "not_supported", "function": "nvmlDeviceGetFieldValues", "at_s": 1, "for_s": 2}])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 1.5)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetPowerUsage(h)
    assert fake.nvmlDeviceGetFieldValues(h, [186])[0].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) > 0
    at(clock, fake, 3.0)
    assert fake.nvmlDeviceGetPowerUsage(h) == 300_000
    assert fake.nvmlDeviceGetFieldValues(h, [186])[0].nvmlReturn == pynvml.NVML_SUCCESS


def test_slow_call_sleeps_on_the_injected_clock():
    fake, clock = make([gpu(CONST_300)], [{"kind": "slow_call", "function": "nvmlDeviceGetTotalEnergyConsumption",
                                           "gpu": 0, "delay_s": 0.25, "at_s": 1.0, "for_s": 1.0}])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 1.5)
    before = clock.now()
    fake.nvmlDeviceGetTotalEnergyConsumption(h)
    assert clock.now() - before == pytest.approx(0.25)
    fake.nvmlDeviceGetPowerUsage(h)                        # other calls are not slowed
    assert clock.now() - before == pytest.approx(0.25)


def test_bundled_fault_scenario_runs_end_to_end():
    clock = VirtualClock()
    fake = FakeNVML(Scenario.load("faults"), clock)
    fake.nvmlInit()
    handles = [fake.nvmlDeviceGetHandleByIndex(i) for i in range(2)]
    errors: dict[str, int] = {}
    for _ in range(400):                                   # 40 s at 10 Hz
        clock.advance(0.1)
        for h in handles:
            try:
                fake.nvmlDeviceGetTotalEnergyConsumption(h)
                fake.nvmlDeviceGetPowerUsage(h)
            except pynvml.NVMLError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    assert errors.get("NVMLError_GpuIsLost", 0) >= 40 and errors.get("NVMLError_NotSupported", 0) >= 25


# -- processes, memory, identity, MIG ---------------------------------------------------------------

def test_processes_and_their_sm_samples():
    procs = [{"pid": 11, "name": "a", "used_memory_mib": 1000, "sm_util": 50},
             {"pid": 12, "name": "b", "used_memory_mib": 2000, "sm_util_trace": [[0, 10], [5, 30]]},
             {"pid": 13, "name": "c", "used_memory_mib": 500, "sm_util": 15, "start_s": 2, "end_s": 4}]
    fake, clock = make([gpu(CONST_300, process=procs)])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    at(clock, fake, 3.0)
    running = fake.nvmlDeviceGetComputeRunningProcesses(h)
    assert {(p.pid, p.usedGpuMemory) for p in running} == {(11, 1000 * 2**20), (12, 2000 * 2**20), (13, 500 * 2**20)}
    samples = fake.nvmlDeviceGetProcessUtilization(h, 0)
    assert {(s.pid, s.smUtil) for s in samples} == {(11, 50), (12, 10), (13, 15)}
    last_seen = max(s.timeStamp for s in samples)
    with pytest.raises(pynvml.NVMLError_NotFound):        # nothing newer than last_seen yet
        fake.nvmlDeviceGetProcessUtilization(h, last_seen)
    at(clock, fake, 6.0)
    later = fake.nvmlDeviceGetProcessUtilization(h, last_seen)
    assert {(s.pid, s.smUtil) for s in later} == {(11, 50), (12, 30)}
    assert fake.nvmlSystemGetProcessName(12) == "b"
    mem = fake.nvmlDeviceGetMemoryInfo(h)
    assert mem.total == 81559 * 2**20 and mem.used >= 3000 * 2**20 and mem.used + mem.free == mem.total


def test_handles_by_index_uuid_and_pci_bus_id():
    fake, _ = make([gpu(), gpu(pci_bus_id="00000000:2A:00.0")])
    fake.nvmlInit()
    h1 = fake.nvmlDeviceGetHandleByIndex(1)
    uuid = fake.nvmlDeviceGetUUID(h1)
    assert fake.nvmlDeviceGetHandleByUUID(uuid) is h1
    assert fake.nvmlDeviceGetHandleByUUID(uuid.encode()) is h1
    assert fake.nvmlDeviceGetHandleByPciBusId("0000:2a:00.0") is h1
    assert fake.nvmlDeviceGetPciInfo(h1).busId == "00000000:2A:00.0"   # pynvml structs decode to str
    assert fake.nvmlDeviceGetIndex(h1) == 1 and fake.nvmlDeviceGetName(h1) == "NVIDIA H100 80GB HBM3"
    assert fake.nvmlDeviceGetArchitecture(h1) == pynvml.NVML_DEVICE_ARCH_HOPPER
    assert fake.nvmlDeviceGetCudaComputeCapability(h1) == (9, 0)
    assert fake.nvmlDeviceGetPowerManagementLimitConstraints(h1) == [200_000, 700_000]
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetPowerUsage(object())


def test_mig_instances_have_no_power_and_map_to_their_parent():
    fake, _ = make([{"model": "NVIDIA A100-SXM4-80GB", "trace": CONST_300,
                     "mig": [{"gi_id": 1, "sm_share": 0.43}, {"gi_id": 5, "sm_share": 0.28}],
                     "process": [{"pid": 7, "sm_util": 40, "gi_id": 5}]}])
    fake.nvmlInit()
    parent = fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlDeviceGetMigMode(parent) == [pynvml.NVML_DEVICE_MIG_ENABLE] * 2
    mig = fake.nvmlDeviceGetMigDeviceHandleByIndex(parent, 1)
    assert fake.nvmlDeviceIsMigDeviceHandle(mig) and not fake.nvmlDeviceIsMigDeviceHandle(parent)
    assert fake.nvmlDeviceGetGpuInstanceId(mig) == 5
    assert fake.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig) is parent
    assert fake.nvmlDeviceGetUUID(mig).startswith("MIG-")
    assert fake.nvmlDeviceGetHandleByUUID(fake.nvmlDeviceGetUUID(mig)) is mig
    assert [p.pid for p in fake.nvmlDeviceGetComputeRunningProcesses(mig)] == [7]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetPowerUsage(mig)
    assert fake.nvmlDeviceGetFieldValues(mig, [186])[0].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert fake.nvmlDeviceGetPowerUsage(parent) == 300_000
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.nvmlDeviceGetMigDeviceHandleByIndex(parent, 2)


# -- API parity and installation --------------------------------------------------------------------

def test_every_fake_function_has_pynvml_signature():
    names = [n for n in dir(FakeNVML) if n.startswith("nvml")]
    assert len(names) > 50
    for name in names:
        ours = list(inspect.signature(getattr(FakeNVML, name)).parameters)[1:]
        assert ours == list(inspect.signature(getattr(REAL, name)).parameters), name


# The pynvml calls CodeCarbon (codecarbon/core/gpu_nvidia.py, gpu.py) and Zeus
# (zeus/device/gpu/nvidia.py) make; docs/fake-nvml.md lists which answer and which raise.
CODECARBON_CALLS = ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
                    "nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetTemperature",
                    "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetUtilizationRates",
                    "nvmlDeviceGetComputeMode", "nvmlDeviceGetComputeRunningProcesses",
                    "nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetTotalEnergyConsumption"]
ZEUS_CALLS = ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
              "nvmlDeviceGetPowerManagementLimitConstraints", "nvmlDeviceGetPowerManagementDefaultLimit",
              "nvmlDeviceGetFieldValues", "nvmlDeviceGetArchitecture", "nvmlDeviceGetTotalEnergyConsumption",
              "nvmlDeviceGetTemperatureV", "nvmlDeviceGetPowerUsage", "nvmlShutdown"]


def test_codecarbon_and_zeus_call_paths_work_on_the_installed_module():
    fake, _ = make([gpu(CONST_300)])
    with installed(fake) as nv:
        assert all(callable(getattr(nv, n)) for n in CODECARBON_CALLS + ZEUS_CALLS)
        assert hasattr(nv, "_nvmlGetFunctionPointer")      # Zeus's "official bindings" check
        nv.nvmlInit()
        h = nv.nvmlDeviceGetHandleByIndex(0)
        assert nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000 == 700
        assert nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU) > 20
        assert nv.nvmlDeviceGetComputeMode(h) == nv.NVML_COMPUTEMODE_DEFAULT
        assert nv.nvmlDeviceGetArchitecture(h) >= nv.NVML_DEVICE_ARCH_VOLTA
        field = nv.nvmlDeviceGetFieldValues(h, [(nv.NVML_FI_DEV_POWER_AVERAGE, nv.NVML_POWER_SCOPE_GPU)])[0]
        assert field.nvmlReturn == nv.NVML_SUCCESS and field.value.uiVal == 300_000
        with pytest.raises(nv.NVMLError_NotSupported):     # Zeus's Grace-Hopper probe: "not GH"
            nv.nvmlDeviceGetC2cModeInfoV(h)
        with pytest.raises(nv.NVMLError_NoPermission):     # setters need root on real GPUs too
            nv.nvmlDeviceSetPowerManagementLimit(h, 300_000)


def test_install_replaces_and_uninstall_restores_sys_modules():
    before = sys.modules.get("pynvml")
    fake, _ = make([gpu(), gpu()])
    mod = install(fake)
    try:
        import pynvml as imported
        assert imported is mod and imported.WATTMETER_FAKE is True
        assert imported.NVMLError is REAL.NVMLError                     # the real error classes
        assert imported.NVMLError_GpuIsLost is REAL.NVMLError_GpuIsLost
        assert imported.c_nvmlMemory_t is REAL.c_nvmlMemory_t
        assert imported.NVML_FI_DEV_POWER_INSTANT == 186
        imported.nvmlInit()
        assert imported.nvmlDeviceGetCount() == 2
        assert real_pynvml() is REAL
    finally:
        uninstall()
    assert sys.modules.get("pynvml") is before
    assert not getattr(sys.modules.get("pynvml"), "WATTMETER_FAKE", False)


def test_installs_nest_and_unwind_in_order():
    outer, _ = make([gpu()])
    inner, _ = make([gpu(), gpu(), gpu()])
    with installed(outer) as a:
        with installed(inner) as b:
            assert sys.modules["pynvml"] is b
        assert sys.modules["pynvml"] is a
    assert not getattr(sys.modules["pynvml"], "WATTMETER_FAKE", False)


def test_fake_object_itself_serves_constants_and_stubs():
    fake, _ = make([gpu()])
    assert fake.NVML_ERROR_GPU_IS_LOST == REAL.NVML_ERROR_GPU_IS_LOST and fake.WATTMETER_FAKE
    fake.nvmlInit()
    with pytest.raises(fake.NVMLError_NotSupported):
        fake.nvmlDeviceGetBAR1MemoryInfo(fake.nvmlDeviceGetHandleByIndex(0))


# -- concurrency and cost ---------------------------------------------------------------------------

def test_concurrent_readers_see_monotonic_counters():
    clock = VirtualClock()
    fake = FakeNVML(Scenario.default(4), clock)
    fake.nvmlInit()
    handles = [fake.nvmlDeviceGetHandleByIndex(i) for i in range(4)]
    failures: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        last = [0] * 4
        try:
            while not stop.is_set():
                for i, h in enumerate(handles):
                    e = fake.nvmlDeviceGetTotalEnergyConsumption(h)
                    assert e >= last[i]
                    last[i] = e
                    fake.nvmlDeviceGetFieldValues(h, [186, 185])
                    fake.nvmlDeviceGetPowerUsage(h)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            failures.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(3000):
        clock.advance(0.003)
    stop.set()
    for t in threads:
        t.join()
    assert not failures


def test_reads_are_cheap_enough_for_8_gpus_at_10_hz():
    clock = VirtualClock()
    fake = FakeNVML(Scenario.default(8), clock)
    fake.nvmlInit()
    handles = [fake.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        clock.advance(0.0125)
        h = handles[i % 8]
        fake.nvmlDeviceGetTotalEnergyConsumption(h)
        fake.nvmlDeviceGetPowerUsage(h)
    per_read_us = (time.perf_counter() - start) / (2 * n) * 1e6
    # 8 GPUs x 10 Hz x 2 reads at this cost is far below 0.5% of a core (loose bound for slow CI)
    assert per_read_us < 50
