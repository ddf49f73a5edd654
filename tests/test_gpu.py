"""Real-GPU checks (pytest -m gpu). Skipped where NVML has no GPU; CI never needs one."""
from __future__ import annotations

import time

import pytest

pynvml = pytest.importorskip("pynvml")

from wattmeter.sensors.base import SimulatedNvml  # noqa: E402

pytestmark = pytest.mark.gpu


def _real_gpu() -> bool:
    if isinstance(pynvml, SimulatedNvml):
        return False
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except pynvml.NVMLError:
        return False


if not _real_gpu():
    pytest.skip("no NVIDIA GPU with a working driver here", allow_module_level=True)


def test_nvml_sensor_finds_gpus_and_counter_is_monotonic():
    from wattmeter.sensors.nvml import NvmlSensor

    s = NvmlSensor()
    devs = s.devices()
    assert devs and all(d.labels["uuid"].startswith(("GPU-", "MIG-")) for d in devs)
    values = []
    for _ in range(30):
        b = s.read(time.monotonic())
        assert not b.errors, b.errors
        values += [r.energy_j for r in b.readings if r.energy_j is not None]
        time.sleep(0.02)
    if devs[0].source.value == "counter":
        assert values == sorted(values)
    s.close()


def test_meter_window_on_real_gpu_matches_counter_delta():
    from wattmeter.meter import Meter
    from wattmeter.sensors.nvml import NvmlSensor

    sensor = NvmlSensor()
    h = sensor._gpus[0].handle
    meter = Meter([sensor]).start()
    e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    with meter.window("real") as w:
        time.sleep(2.0)
    e1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    r = w.result()
    meter.close()
    gpu0 = [d for d in r.devices if d.key == sensor._gpus[0].device.key][0]
    ref = (e1 - e0) / 1000.0
    assert gpu0.energy_j > 0
    # Counter deltas read at the edges differ by at most ~one refresh of power at each edge.
    assert abs(gpu0.energy_j - ref) <= 0.1 * ref + 2 * 0.1 * 700
