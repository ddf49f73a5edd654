"""When to run: forecasts from the fake carbon server, the best start, waiting, and bad input."""
from __future__ import annotations

import io
import json
import os
import socket
import time

import pytest

from wattmeter.carbon.config import CarbonConfig
from wattmeter.carbon.forecast import (ElectricityMapsForecastSource, ForecastUnreachable, NoForecast,
                                       UKForecastSource, forecast_source_for, parse_duration, plan_start,
                                       wait_for_clean)
from wattmeter.cli import main
from wattmeter.clock import VirtualClock
from wattmeter.errors import UsageError

from fake_carbon_server import FakeCarbonServer

T0 = 1_700_000_000.0 - (1_700_000_000.0 % 1800)      # a half-hour boundary
TOKEN = "em-token-forecast-5678"
# Two hours at 300, three hours at 100, then 400: a clean spell two hours from now.
UK_SLOTS = [300.0] * 4 + [100.0] * 6 + [400.0] * 86


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("WATTMETER_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def server():
    with FakeCarbonServer() as srv:
        srv.forecast_start_unix = T0
        srv.forecasts = [UK_SLOTS]
        yield srv


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_parse_duration() -> None:
    assert parse_duration("24h", "--start-window") == 86400.0
    assert parse_duration("1h30m", "x") == 5400.0
    assert parse_duration("7d", "x") == 604800.0
    assert parse_duration("90", "x") == 90.0
    with pytest.raises(UsageError, match=r"--since 'yesterday' is not a duration; use e.g. 90m, 24h, 7d"):
        parse_duration("yesterday", "--since")
    with pytest.raises(UsageError, match="must be above 0"):
        parse_duration("0h", "--since")


def test_uk_forecast_and_best_start(server) -> None:
    source = UKForecastSource(server.url, ttl_s=600, timeout_s=2.0)
    fc = source.forecast(T0 + 600)
    assert fc.slots[0].start_unix == T0 and fc.slots[-1].end_unix == T0 + 96 * 1800
    assert server.requests[-1]["path"].endswith("/fw48h") and "/intensity/2023-11-14T22:10Z/" in server.requests[-1]["path"]
    # A 1 h job of 0.7 kWh at PUE 1.0 started now: 300 g/kWh -> 210 g; best at T0 + 2 h: 100 g/kWh -> 70 g.
    plan = plan_start(fc, T0 + 600, 24 * 3600, 3600, 0.7, 1.0)
    assert plan.start_unix == T0 + 7200 and plan.delay_s == 6600
    assert plan.now_g == pytest.approx(210.0) and plan.best_g == pytest.approx(70.0)
    assert plan.saving_g == pytest.approx(140.0) and plan.saving_pct == pytest.approx(200.0 / 3)
    # A 2 h job that straddles: starting at T0+1h30 would mix 300 and 100; T0+2h is still best (100).
    assert plan_start(fc, T0, 24 * 3600, 7200, 1.0).best_g_per_kwh == pytest.approx(100.0)
    # The window closes before the clean spell: now is the answer, no saving.
    short = plan_start(fc, T0 + 600, 3600, 3600, 0.7)
    assert short.start_unix == T0 + 600 and short.saving_g == 0.0


def test_mean_over_a_partial_slot_is_time_weighted(server) -> None:
    fc = UKForecastSource(server.url).forecast(T0)
    # [T0+1h30, T0+2h30]: 30 min at 300 + 30 min at 100 = 200 g/kWh.
    assert fc.mean_g_per_kwh(T0 + 5400, T0 + 9000) == pytest.approx(200.0)


def test_forecast_is_cached_then_refreshed(server) -> None:
    clock = VirtualClock()
    server.forecasts = [[200.0] * 96, [50.0] * 96]
    source = UKForecastSource(server.url, ttl_s=600, clock=clock.now)
    assert source.forecast(T0).slots[0].g_per_kwh == 200.0
    assert source.forecast(T0).slots[0].g_per_kwh == 200.0 and source.requests == 1
    clock.advance(601)
    assert source.forecast(T0).slots[0].g_per_kwh == 50.0 and source.requests == 2


def test_electricitymaps_forecast_sends_token_and_reads_hourly_points(server) -> None:
    server.forecasts = [[500.0, 500.0, 80.0, 90.0, 600.0]]
    source = ElectricityMapsForecastSource("DE", TOKEN, server.url)
    fc = source.forecast(T0)
    assert [s.g_per_kwh for s in fc.slots] == [500.0, 500.0, 80.0, 90.0, 600.0]
    assert fc.slots[-1].end_unix - fc.slots[-1].start_unix == 3600.0
    req = server.requests[-1]
    assert req["path"] == "/v3/carbon-intensity/forecast?zone=DE" and {k.lower(): v for k, v in req["headers"].items()}["auth-token"] == TOKEN
    assert TOKEN not in repr(source)
    # 2 h job, 1 kWh: now 500 (500 g); best at T0 + 2 h: mean(80, 90) = 85 (85 g).
    plan = plan_start(fc, T0, 24 * 3600, 7200, 1.0)
    assert plan.start_unix == T0 + 7200 and plan.best_g == pytest.approx(85.0)


@pytest.mark.parametrize("mode, kind", [("500", "http_500"), ("slow", "timeout")])
def test_unreachable_provider(server, mode, kind) -> None:
    server.mode, server.delay_s = mode, 1.0
    with pytest.raises(ForecastUnreachable) as exc:
        UKForecastSource(server.url, timeout_s=0.3).forecast(T0)
    assert exc.value.kind == kind


@pytest.mark.parametrize("mode", ["no_forecast", "garbage", "bad_shape"])
def test_provider_without_forecast_is_a_usage_error(server, mode) -> None:
    server.mode = mode
    with pytest.raises(NoForecast) as exc:
        ElectricityMapsForecastSource("DE", TOKEN, server.url).forecast(T0)
    assert "carbon provider electricitymaps" in str(exc.value) and "zone DE" in str(exc.value)
    assert exc.value.exit_code == 2


def test_table_provider_has_no_forecast() -> None:
    with pytest.raises(UsageError, match="add --carbon-provider ukgrid"):
        forecast_source_for(CarbonConfig(zone="FR").validate())


# -- waiting -----------------------------------------------------------------------------------
def wall_clock() -> VirtualClock:
    return VirtualClock(start=1000.0, wall_start=T0 + 600)       # 10 min into the first slot


def test_wait_for_clean_holds_until_the_best_start(server) -> None:
    clock, err = wall_clock(), io.StringIO()
    source = UKForecastSource(server.url, ttl_s=0, clock=clock.now)
    out = wait_for_clean(source, clock, 6 * 3600, 3600, err=err)
    assert out.waited_s == pytest.approx(6600.0)                  # until T0 + 2 h
    assert clock.wall(clock.now()) == pytest.approx(T0 + 7200)
    assert "saves 140.0 g" not in err.getvalue()                  # grams need power; the line shows %
    assert "66.7 %" in err.getvalue()


def test_wait_never_goes_past_max_delay(server) -> None:
    clock = wall_clock()
    source = UKForecastSource(server.url, ttl_s=0, clock=clock.now)
    out = wait_for_clean(source, clock, 3600, 3600, err=io.StringIO())
    assert out.waited_s == 0.0            # inside 1 h nothing beats now (300 everywhere)
    clock2 = wall_clock()
    server.forecasts = [[300.0] * 2 + [250.0] * 2 + [50.0] * 92]
    out = wait_for_clean(UKForecastSource(server.url, ttl_s=0, clock=clock2.now), clock2, 5400, 1800,
                         err=io.StringIO())
    assert out.waited_s <= 5400.0 and clock2.wall(clock2.now()) == pytest.approx(T0 + 3600)


def test_wait_follows_a_forecast_that_changes_between_calls(server) -> None:
    # First forecast: clean at T0 + 2 h. After 15 min a new forecast moves the clean spell to T0 + 1 h.
    server.forecasts = [UK_SLOTS, [300.0] * 2 + [60.0] * 4 + [400.0] * 90]
    clock = wall_clock()
    source = UKForecastSource(server.url, ttl_s=0, clock=clock.now)
    out = wait_for_clean(source, clock, 6 * 3600, 3600, err=io.StringIO(), recheck_s=900)
    assert out.replans >= 1
    assert clock.wall(clock.now()) == pytest.approx(T0 + 3600)    # started at the new, earlier time
    assert out.plan.best_g_per_kwh == pytest.approx(60.0)


def test_wait_with_no_provider_reachable_starts_now() -> None:
    clock, err = wall_clock(), io.StringIO()
    out = wait_for_clean(UKForecastSource(closed_port_url(), clock=clock.now), clock, 6 * 3600, 3600, err=err)
    assert out.waited_s == 0.0 and out.plan is None
    assert err.getvalue() == "wattmeter: no carbon forecast reachable (ukgrid: network); starting now\n"


def test_countdown_on_a_tty(server) -> None:
    clock, err = wall_clock(), io.StringIO()
    wait_for_clean(UKForecastSource(server.url, ttl_s=0, clock=clock.now), clock, 6 * 3600, 3600, err=err, tty=True)
    text = err.getvalue()
    assert "\rwattmeter: waiting for cleaner power, starting in 1:50:00" in text
    assert "starting in 0:00:01" in text


# -- the CLI -----------------------------------------------------------------------------------
def test_estimate_start_window_cli(server, capsys) -> None:
    now = time.time()
    server.forecast_start_unix = now - (now % 1800)
    code = main(["estimate", "--gpu", "H100", "--hours", "1", "--zone", "GB", "--carbon-provider", "ukgrid",
                 "--carbon-provider-url", server.url, "--start-window", "24h", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    plan = out["start_plan"]
    # 1 x 700 W x 1 h = 0.7 kWh at PUE 1: 300 g/kWh now -> 210 g; 100 g/kWh from slot 4 -> 70 g.
    assert plan["start_unix"] == server.forecast_start_unix + 7200
    assert plan["emissions_g_now"] == pytest.approx(210.0) and plan["emissions_g_best"] == pytest.approx(70.0)
    assert plan["saving_g"] == pytest.approx(140.0)


def test_estimate_start_window_text_and_unreachable(server, capsys) -> None:
    now = time.time()
    server.forecast_start_unix = now - (now % 1800)
    assert main(["estimate", "--gpu", "H100", "--hours", "1", "--zone", "GB", "--carbon-provider", "ukgrid",
                 "--carbon-provider-url", server.url, "--start-window", "24h"]) == 0
    assert "saves 140.0 g (66.7 %), ukgrid forecast" in capsys.readouterr().out
    assert main(["estimate", "--gpu", "H100", "--hours", "1", "--zone", "GB", "--carbon-provider", "ukgrid",
                 "--carbon-provider-url", closed_port_url(), "--start-window", "24h"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "wattmeter: no carbon forecast reachable (ukgrid: network); starting now\n"
    assert "start:    now (no forecast reachable)" in captured.out


def test_estimate_provider_without_forecast_exits_2(server, capsys) -> None:
    server.mode = "no_forecast"
    code = main(["estimate", "--gpu", "H100", "--hours", "1", "--zone", "GB", "--carbon-provider", "ukgrid",
                 "--carbon-provider-url", server.url, "--start-window", "24h"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "carbon provider ukgrid has no forecast for zone GB" in err


def test_estimate_bad_start_window_exits_2(capsys) -> None:
    code = main(["estimate", "--gpu", "H100", "--hours", "1", "--zone", "GB", "--carbon-provider", "ukgrid",
                 "--start-window", "soon"])
    assert code == 2
    assert "--start-window 'soon' is not a duration" in capsys.readouterr().err


def test_run_wait_for_clean_unreachable_starts_now(tmp_path, capsys) -> None:
    code = main(["run", "--fake-gpus", "1", "--cpu", "none", "--records", str(tmp_path / "r.jsonl"), "--quiet",
                 "--zone", "GB", "--carbon-provider", "ukgrid", "--carbon-provider-url", closed_port_url(),
                 "--wait-for-clean", "6h", "--", "true"])
    assert code == 0
    assert "no carbon forecast reachable (ukgrid: network); starting now" in capsys.readouterr().err
    assert (tmp_path / "r.jsonl").exists()


def test_run_wait_for_clean_when_now_is_cleanest_starts_at_once(server, tmp_path, capsys) -> None:
    now = time.time()
    server.forecast_start_unix = now - (now % 1800)
    server.forecasts = [[50.0] * 4 + [400.0] * 92]
    code = main(["run", "--fake-gpus", "1", "--cpu", "none", "--records", str(tmp_path / "r.jsonl"), "--quiet",
                 "--zone", "GB", "--carbon-provider", "ukgrid", "--carbon-provider-url", server.url,
                 "--wait-for-clean", "6h", "--", "true"])
    assert code == 0
    assert "now is the cleanest start in the window" in capsys.readouterr().err
