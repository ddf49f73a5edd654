"""Accounting: golden numbers worked by hand, linearity, time-varying intensity, thread safety."""
from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattmeter.carbon.accounting import (CarbonAccountant, embodied_g, emissions_g, market_g, what_if)
from wattmeter.carbon.config import CarbonConfig
from wattmeter.carbon.intensity import IntensityReading, ProviderError, TableSource

energies = st.floats(min_value=0, max_value=1e12, allow_nan=False)
intensities = st.floats(min_value=0, max_value=2000, allow_nan=False)
pues = st.floats(min_value=1.0, max_value=3.0)


class StepSource:
    """Intensity that changes in time: 100 g/kWh before t=50, 300 after."""

    name = "step"

    def __init__(self) -> None:
        self.calls = 0

    def read(self, t_wall: float) -> IntensityReading:
        self.calls += 1
        return IntensityReading(100.0 if t_wall < 50 else 300.0, "step", "FR")


class BrokenSource:
    name = "broken"

    def read(self, t_wall: float) -> IntensityReading:
        raise ProviderError("timeout")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# -- golden numbers, worked by hand --------------------------------------------------------------

def test_golden_3_6_mj_at_56_g_per_kwh_pue_1_1_is_61_6_g():
    assert emissions_g(3.6e6, 56, 1.1) == pytest.approx(61.6)


def test_golden_one_kwh_world_average():
    assert emissions_g(3.6e6, 481, 1.0) == pytest.approx(481.0)


def test_golden_market_embodied_water():
    assert market_g(61.6, 0.25) == pytest.approx(46.2)
    # 150 kg over 4 years of 8766 h: 1,200,000 g / 35,064 h per 8 device-hours -> 34.2231 g
    assert embodied_g(8, 150, 4) == pytest.approx(150_000 * 8 / 35_064)
    assert embodied_g(8, 150, 4) == pytest.approx(34.2231, abs=1e-4)


def test_accountant_result_has_every_configured_scope_and_record_shape():
    config = CarbonConfig(zone="FR", pue=1.1, renewable_share=0.25, embodied_kg_per_gpu=150,
                          wue_l_per_kwh=1.8).validate()
    acc = CarbonAccountant(config, config.build_source())
    acc.add_energy(3.6e6, 0, 3600)
    acc.add_device_hours(8, 1.0)
    r = acc.snapshot()
    assert r.emissions_g["location"] == pytest.approx(1.1 * 56.039)
    assert r.emissions_g["market"] == pytest.approx(0.75 * 1.1 * 56.039)
    assert r.emissions_g["embodied"] == pytest.approx(34.2231, abs=1e-4)
    assert r.water_l == pytest.approx(1.8)
    rec = r.to_record()
    assert {"zone", "intensity_g_per_kwh", "intensity_source", "pue", "emissions_g", "water_l"} <= set(rec)
    assert set(rec["emissions_g"]) == {"location", "market", "embodied"}
    names = {(n, tuple(sorted(labels.items()))) for n, labels, _ in r.prometheus_samples()}
    assert ("wattmeter_emissions_grams_total", (("scope", "market"),)) in names
    assert ("wattmeter_grid_intensity_grams_per_kwh", (("source", "table:ember-owid-2023"), ("zone", "FR"))) in names


def test_optional_scopes_are_absent_unless_configured():
    config = CarbonConfig(zone="DE").validate()
    acc = CarbonAccountant(config, config.build_source())
    acc.add_energy(3.6e6, 0, 1)
    r = acc.snapshot()
    assert set(r.emissions_g) == {"location"} and r.water_l is None
    assert "water_l" not in r.to_record()


def test_no_zone_uses_world_default_and_says_so():
    config = CarbonConfig().validate()
    acc = CarbonAccountant(config, config.build_source())
    acc.add_energy(3.6e6, 0, 1)
    r = acc.snapshot()
    assert (r.zone, r.intensity_source, r.emissions_g["location"]) == ("WORLD", "table:world-default", 481.0)
    assert "no zone set" in r.summary()


def test_cloud_zone_uses_provider_pue():
    config = CarbonConfig(cloud="gcp:europe-west1").validate()
    acc = CarbonAccountant(config, config.build_source())
    acc.add_energy(3.6e6, 0, 1)
    r = acc.snapshot()
    assert (r.pue, r.emissions_g["location"]) == (1.1, pytest.approx(1.1 * 122))


# -- time-varying intensity ---------------------------------------------------------------------

def test_time_varying_intensity_is_integrated_per_interval():
    config = CarbonConfig(zone="FR", ttl_s=0).validate()
    acc = CarbonAccountant(config, StepSource())
    acc.add_energy(3.6e6, 0, 40)      # 1 kWh at 100 g/kWh
    acc.add_energy(7.2e6, 60, 100)    # 2 kWh at 300 g/kWh
    r = acc.snapshot()
    assert r.emissions_g["location"] == pytest.approx(100 + 600)      # not 3 kWh x 300 at the end
    assert r.intensity_avg_g_per_kwh == pytest.approx(700 / 3)
    assert r.intensity_g_per_kwh == 300


def test_source_is_queried_at_most_once_per_ttl():
    clock, source = Clock(), StepSource()
    acc = CarbonAccountant(CarbonConfig(zone="FR", ttl_s=300).validate(), source, clock_wall=clock)
    for i in range(10):
        clock.t = i * 10.0
        acc.add_energy(1000.0, i * 10.0, i * 10.0 + 10)
    assert source.calls == 1
    clock.t = 400.0
    acc.add_energy(1000.0, 400, 410)
    assert source.calls == 2


def test_failing_source_never_raises_into_the_job():
    acc = CarbonAccountant(CarbonConfig(zone="FR").validate(), BrokenSource())
    acc.add_energy(3.6e6, 0, 1)
    acc.add_energy(float("nan"), 1, 2)
    acc.add_energy(-5.0, 2, 3)
    r = acc.snapshot()
    assert r.emissions_g["location"] == pytest.approx(56.039)
    assert r.intensity_source == "table (broken failed: timeout)"


def test_snapshot_before_any_energy_does_not_call_the_source():
    acc = CarbonAccountant(CarbonConfig(zone="FR").validate(), BrokenSource())
    r = acc.snapshot()
    assert (r.energy_kwh, r.emissions_g["location"], r.intensity_source) == (0.0, 0.0, "table:ember-owid-2023")


def test_concurrent_adds_lose_nothing():
    config = CarbonConfig(zone="SE").validate()
    acc = CarbonAccountant(config, TableSource(config.zone_info()))

    def work() -> None:
        for _ in range(500):
            acc.add_energy(3600.0, 0, 1)
            acc.add_device_hours(1, 0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = acc.snapshot()
    assert r.energy_kwh == pytest.approx(8 * 500 * 0.001)
    assert r.device_hours == pytest.approx(8 * 500 * 0.001)


# -- linearity properties -----------------------------------------------------------------------

@given(energies, energies, intensities, pues)
def test_emissions_are_additive_in_energy(a, b, intensity, pue):
    assert emissions_g(a + b, intensity, pue) == pytest.approx(
        emissions_g(a, intensity, pue) + emissions_g(b, intensity, pue), rel=1e-9, abs=1e-9)


@given(energies, intensities, pues, st.floats(min_value=0, max_value=1e3))
def test_emissions_scale_linearly(energy, intensity, pue, k):
    assert emissions_g(k * energy, intensity, pue) == pytest.approx(k * emissions_g(energy, intensity, pue),
                                                                    rel=1e-9, abs=1e-9)
    assert emissions_g(energy, k * intensity, pue) == pytest.approx(k * emissions_g(energy, intensity, pue),
                                                                    rel=1e-9, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.001, max_value=1e7), min_size=1, max_size=30))
def test_splitting_a_job_into_intervals_changes_nothing(parts):
    config = CarbonConfig(zone="PL", pue=1.3).validate()
    acc = CarbonAccountant(config, config.build_source())
    for i, e in enumerate(parts):
        acc.add_energy(e, float(i), float(i + 1))
    assert acc.snapshot().emissions_g["location"] == pytest.approx(emissions_g(math.fsum(parts), 661.926, 1.3))


@given(st.floats(min_value=0, max_value=1e6), st.floats(min_value=0.5, max_value=10), st.floats(0, 1000))
def test_embodied_is_linear_in_device_hours(hours, life, kg):
    assert embodied_g(2 * hours, kg, life) == pytest.approx(2 * embodied_g(hours, kg, life), abs=1e-9)


# -- what-if ------------------------------------------------------------------------------------

def test_what_if_recomputes_for_another_zone():
    record = {"run_id": "x", "energy_j": {"total": 3.6e6},
              "carbon": {"zone": "PL", "pue": 1.1, "renewable_share": 0.5,
                         "emissions_g": {"location": 728.1, "embodied": 2.0}}}
    fr = what_if(record, "FR")
    assert fr["emissions_g"]["location"] == pytest.approx(1.1 * 56.039)     # the record's PUE
    assert fr["emissions_g"]["market"] == pytest.approx(0.5 * 1.1 * 56.039)
    assert fr["emissions_g"]["embodied"] == 2.0                               # zone-independent
    aws = what_if(record, "aws:eu-west-3")
    assert (aws["pue"], aws["emissions_g"]["location"]) == (1.135, pytest.approx(1.135 * 52))
