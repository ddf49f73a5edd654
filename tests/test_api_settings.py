"""The Python API's door to simulated GPUs: Meter(fake_gpus=N) / Meter(scenario=...)."""
from __future__ import annotations

import pytest

from wattmeter.errors import ConfigError
from wattmeter.meter import Meter


def test_meter_fake_gpus_meters_simulated_gpus(monkeypatch):
    monkeypatch.delenv("WATTMETER_FAKE_NVML", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = Meter(fake_gpus=3)
    try:
        gpus = [d for s in meter.sensors for d in s.devices() if d.component.value == "gpu"]
        assert len(gpus) == 3 and all(d.simulated for d in gpus)
        assert any("SIMULATED GPUs" in n for n in meter.notes)
    finally:
        meter.close()


def test_meter_scenario_by_bundled_name(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = Meter(scenario="h100x2")
    try:
        assert len([d for s in meter.sensors for d in s.devices() if d.component.value == "gpu"]) == 2
    finally:
        meter.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"fake_gpus": 65}, "fake_gpus=65: is above the fake NVML's maximum of 64 GPUs; give 1..64"),
    ({"fake_gpus": 0}, "fake_gpus=0: must be a whole number > 0"),
    ({"fake_gpus": 2, "scenario": "h100x2"}, "fake_gpus=2 and scenario='h100x2' both given; choose one"),
])
def test_bad_fake_requests_are_refused(kwargs, message):
    with pytest.raises(ConfigError) as err:
        Meter(**kwargs)
    assert str(err.value) == message


def test_window_carbon_takes_runs_zone_and_pue(monkeypatch):
    from wattmeter.carbon.window import window_carbon
    from wattmeter.errors import UsageError

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = Meter(fake_gpus=1)
    try:
        with meter.measure("epoch") as w:
            import time
            time.sleep(0.3)
        result = w.result()
    finally:
        meter.close()
    fr = window_carbon(result, zone="FR", pue=1.2)
    assert fr.zone == "FR" and fr.pue == 1.2
    assert fr.emissions_g["location"] == pytest.approx(result.total_energy_j / 3.6e6 * 1.2 * fr.intensity_g_per_kwh)
    world = window_carbon(result)
    assert world.intensity_source == "table:world-default"
    with pytest.raises(UsageError, match="below 1"):
        window_carbon(result, zone="FR", pue=0.5)
