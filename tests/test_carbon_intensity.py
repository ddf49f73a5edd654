"""Live intensity providers against a local fake server: success, cache, and every failure falls back."""
from __future__ import annotations

import logging
import time

import pytest

from wattmeter.carbon.accounting import CarbonAccountant
from wattmeter.carbon.config import CarbonConfig
from wattmeter.carbon.intensity import (ElectricityMapsSource, FallbackSource, ProviderError, TableSource,
                                        UKCarbonIntensitySource)
from wattmeter.carbon.zones import resolve_zone

try:
    from fake_carbon_server import FakeCarbonServer
except ImportError:  # tests/ imported as a package
    from tests.fake_carbon_server import FakeCarbonServer

TOKEN = "em-token-do-not-leak-1234"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    with FakeCarbonServer() as srv:
        yield srv


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def em(server, timeout_s=1.0, clock=None, zone="FR"):
    return ElectricityMapsSource(zone, TOKEN, base_url=server.url, ttl_s=600, timeout_s=timeout_s,
                                 **({"clock": clock} if clock else {}))


def with_fallback(primary, zone="FR", timeout_s=1.0, retry_s=60.0, clock=None):
    return FallbackSource(primary, TableSource(resolve_zone(zone)), timeout_s, retry_s=retry_s,
                          **({"clock": clock} if clock else {}))


def test_electricitymaps_reading_sends_token_header_and_zone(server):
    server.intensity = 87.5
    reading = em(server).read(0.0)
    assert (reading.g_per_kwh, reading.source, reading.zone) == (87.5, "electricitymaps", "FR")
    sent = server.requests[0]
    assert sent["path"] == "/v3/carbon-intensity/latest?zone=FR"
    assert {k.lower(): v for k, v in sent["headers"].items()}.get("auth-token") == TOKEN


def test_ukgrid_uses_forecast_until_actual_is_known(server):
    server.intensity = 190.0
    source = UKCarbonIntensitySource(base_url=server.url, ttl_s=0, timeout_s=1.0)
    assert source.read(0.0).g_per_kwh == 190.0
    server.uk_actual = 175.0
    assert source.read(0.0).g_per_kwh == 175.0
    assert server.requests[0]["path"] == "/intensity"


def test_cache_ttl_limits_requests(server):
    clock = FakeClock()
    source = em(server, clock=clock)
    source.read(0.0)
    source.read(0.0)
    assert len(server.requests) == 1
    clock.t += 601
    source.read(0.0)
    assert len(server.requests) == 2


@pytest.mark.parametrize("mode,kind", [("500", "http_500"), ("garbage", "bad_json"), ("bad_shape", "bad_json")])
def test_failures_fall_back_to_the_table_and_say_so(server, mode, kind):
    server.mode = mode
    with pytest.raises(ProviderError) as exc:
        em(server).read(0.0)
    assert exc.value.kind == kind
    source = with_fallback(em(server))
    reading = source.read(0.0)
    assert reading.g_per_kwh == pytest.approx(56.039)           # FR table value
    assert reading.source == f"table (electricitymaps failed: {kind})"
    assert source.errors == {kind: 1}


def test_slow_server_never_blocks_past_the_timeout(server):
    server.mode, server.delay_s = "slow", 3.0
    source = with_fallback(em(server, timeout_s=0.25), timeout_s=0.25)
    began = time.monotonic()
    reading = source.read(0.0)
    assert time.monotonic() - began < 1.0
    assert reading.source == "table (electricitymaps failed: timeout)"


def test_unreachable_provider_is_a_network_error():
    source = ElectricityMapsSource("FR", TOKEN, base_url="http://127.0.0.1:9", timeout_s=0.5)
    with pytest.raises(ProviderError) as exc:
        source.read(0.0)
    assert exc.value.kind in ("network", "timeout")


def test_failed_provider_is_not_hammered_until_retry(server):
    server.mode = "500"
    clock = FakeClock()
    source = with_fallback(em(server, clock=clock), retry_s=60.0, clock=clock)
    for _ in range(5):
        source.read(0.0)
    assert len(server.requests) == 1
    clock.t += 61
    server.mode = "ok"
    assert source.read(0.0).source == "electricitymaps"


def test_token_is_never_logged_or_repred(server, caplog):
    caplog.set_level(logging.DEBUG)
    server.mode = "500"
    source = with_fallback(em(server))
    source.read(0.0)
    config = CarbonConfig(zone="FR", provider="electricitymaps", provider_token=TOKEN)
    text = " ".join([repr(source.primary), repr(config), str(config.public_dict()), caplog.text])
    assert TOKEN not in text
    assert "electricitymaps failed" in caplog.text or "http_500" in caplog.text


def test_job_result_falls_back_and_says_so(server):
    server.mode = "500"
    config = CarbonConfig(zone="FR", pue=1.1, provider="electricitymaps", provider_token=TOKEN,
                          provider_url=server.url, timeout_s=0.5).validate()
    accountant = CarbonAccountant(config, config.build_source())
    accountant.add_energy(3.6e6, 0.0, 60.0)
    result = accountant.snapshot()
    assert result.intensity_source == "table (electricitymaps failed: http_500)"
    assert result.emissions_g["location"] == pytest.approx(1.1 * 56.039)
    assert "electricitymaps failed" in result.summary()
    assert result.to_record()["intensity_source"].startswith("table (electricitymaps failed")


def test_job_uses_live_intensity_when_the_provider_answers(server):
    server.intensity = 100.0
    config = CarbonConfig(zone="GB", provider="ukgrid", provider_url=server.url, timeout_s=1.0).validate()
    accountant = CarbonAccountant(config, config.build_source())
    accountant.add_energy(7.2e6, 0.0, 60.0)
    result = accountant.snapshot()
    assert (result.intensity_source, result.emissions_g["location"]) == ("ukgrid", pytest.approx(200.0))


def test_subzone_queries_provider_and_falls_back_to_country(server):
    server.mode = "garbage"
    config = CarbonConfig(zone="US-CAL-CISO", provider="electricitymaps", provider_token=TOKEN,
                          provider_url=server.url).validate()
    reading = config.build_source().read(0.0)
    assert "zone=US-CAL-CISO" in server.requests[0]["path"]
    assert reading.g_per_kwh == pytest.approx(369.473)   # the US table row
