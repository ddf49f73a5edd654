"""Fleet reports from Prometheus: golden numbers on canned API answers, then bad input."""
from __future__ import annotations

import json
import socket

import pytest

from wattmeter.carbon.fleet import build_fleet_report, render_fleet
from wattmeter.carbon.prices import parse_price
from wattmeter.carbon.zones import resolve_zone
from wattmeter.cli import main

DAY = 86400.0


def row(value: float, **labels: str) -> dict:
    return {"metric": labels, "value": [0, str(value)]}


class StubPrometheus:
    """Answers the report's queries with a fleet whose figures are set by hand."""

    url = "stub"

    def __init__(self) -> None:
        self.exprs: list[str] = []

    def query(self, expr: str, at: float) -> list[dict]:
        self.exprs.append(expr)
        a = {"instance": "a:9445", "hostname": "a"}
        b = {"instance": "b:9445", "hostname": "b"}
        if expr.startswith("increase(wattmeter_gpu_energy_joules_total"):
            # a/0: 300 W busy all day; a/1: 90 W idle all day; b/0: 60 W, idle 12 h.
            return [row(300 * DAY, gpu="0", model="H100", **a), row(90 * DAY, gpu="1", model="H100", **a),
                    row(60 * DAY, gpu="0", model="L4", **b)]
        if expr.startswith("increase(wattmeter_cpu_energy_joules_total"):
            return [row(50 * DAY, domain="package-0", **a)]
        if expr.startswith("increase(wattmeter_ram_energy_joules_total"):
            return []
        if "wattmeter_emissions_grams_total" in expr:
            # a: 440 W x 24 h = 10.56 kWh at 56 g/kWh = 591.36 g; b: 1.44 kWh at 200 g/kWh = 288 g.
            return [row(591.36, scope="location", instance="a:9445"), row(288.0, scope="location", instance="b:9445")]
        if "wattmeter_tokens_total" in expr:
            return [row(2_000_000, model="llama", instance="a:9445")]
        if "wattmeter_grid_intensity" in expr:
            return [row(56, zone="FR", instance="a:9445"), row(200, zone="US-CA", instance="b:9445")]
        if expr.startswith("increase(wattmeter_gpu_idle_energy_joules_total"):
            return [row(0.0, gpu="0", **a), row(90 * DAY, gpu="1", **a), row(60 * DAY / 2, gpu="0", **b)]
        if expr.startswith("sum_over_time"):
            # steps of 60 s in which idle energy grew: a/1 all 1440; b/0 720.
            return [row(0, gpu="0", **a), row(1440, gpu="1", **a), row(720, gpu="0", **b)]
        raise AssertionError(f"unexpected query {expr}")


def test_fleet_golden_numbers() -> None:
    stub = StubPrometheus()
    r = build_fleet_report(stub, DAY, "host", at=1.7e9, step_s=60.0, idle_threshold=0.25, cap_w=40.0,
                           what_if=[resolve_zone("SE")])
    assert "increase(wattmeter_gpu_energy_joules_total[86400s])" in stub.exprs
    groups = {g.key: g for g in r.groups}
    assert groups["a"].energy_kwh == pytest.approx(10.56)           # (300 + 90 + 50) W x 24 h
    assert groups["b"].energy_kwh == pytest.approx(1.44)            # 60 W x 24 h
    assert groups["a"].emissions_g["location"] == pytest.approx(591.36)
    # J/token on host a: its GPUs' 390 W x 86,400 s = 33,696,000 J over 2M tokens = 16.848 J/token.
    assert groups["a"].j_per_token == pytest.approx(16.848)
    assert groups["a"].tokens_per_kwh == pytest.approx(2_000_000 / 9.36)
    gpus = {(g.hostname, g.gpu): g for g in r.gpus}
    assert gpus[("a", "1")].idle_hours == pytest.approx(24.0) and gpus[("a", "1")].idle_kwh == pytest.approx(2.16)
    assert gpus[("b", "0")].idle_hours == pytest.approx(12.0) and gpus[("b", "0")].idle_kwh == pytest.approx(0.72)
    assert gpus[("a", "0")].idle_hours == 0.0
    # Waste: a/1 (24 h) then b/0 (12 h); a/0 never idle is not listed.
    assert [(g.hostname, g.gpu) for g in r.waste] == [("a", "1"), ("b", "0")]
    a1, b0 = r.waste
    # Releasing a/1 saves 2.16 kWh x (591.36 g / 10.56 kWh = 56 g/kWh) = 120.96 g.
    assert a1.grams(a1.idle_kwh) == pytest.approx(120.96)
    # b/0 is in US-CA: table price 0.2391 USD/kWh x 0.72 kWh = 0.172152 USD; a/1 in FR has no table price.
    assert b0.cost(b0.idle_kwh) == pytest.approx(0.172152) and a1.cost(a1.idle_kwh) is None
    # Capping b/0 (60 W idle) to 40 W for 12 h saves 20 W x 12 h = 0.24 kWh, at 200 g/kWh = 48 g.
    assert b0.cap_saved_kwh == pytest.approx(0.24) and b0.grams(b0.cap_saved_kwh) == pytest.approx(48.0)
    # What-if: the fleet's 12 kWh at Sweden's table intensity.
    se = resolve_zone("SE")
    assert r.what_if[0][1] == pytest.approx(12.0 * se.g_per_kwh)
    data = json.loads(render_fleet(r, "json"))
    assert data["idle_gpu_hours"] == pytest.approx(36.0) and data["idle_kwh"] == pytest.approx(2.88)
    assert data["waste"][0]["idle_emissions_g"] == pytest.approx(120.96)


def test_flag_price_applies_everywhere_and_formats_render() -> None:
    r = build_fleet_report(StubPrometheus(), DAY, "host", at=1.7e9, price=parse_price("0.2EUR"))
    a1 = next(g for g in r.waste if g.hostname == "a")
    assert a1.cost(a1.idle_kwh) == pytest.approx(0.432) and a1.price.currency == "EUR"   # 2.16 kWh x 0.2
    table = render_fleet(r, "table")
    assert "waste: GPUs idle >= 25% of the period, longest first" in table and "idle cost EUR" in table
    md = render_fleet(r, "markdown")
    assert "## idle by GPU" in md and "| host | gpu |" in md
    csv_text = render_fleet(r, "csv")
    assert csv_text.splitlines()[0].startswith("section,host,kWh")


def test_group_by_model_puts_tokens_with_the_served_model() -> None:
    r = build_fleet_report(StubPrometheus(), DAY, "model", at=1.7e9)
    groups = {g.key: g for g in r.groups}
    assert groups["H100"].energy_kwh == pytest.approx(9.36) and groups["L4"].energy_kwh == pytest.approx(1.44)
    assert groups["tokens:llama"].j_per_token == pytest.approx(16.848)
    assert r.prorated


# -- bad input: one line, exit 2 ----------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("isolated_env")   # conftest.py


def test_prometheus_that_does_not_answer(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["report", "--prometheus", url, "--since", "7d"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--prometheus {url} does not answer" in err


def test_since_it_cannot_parse(capsys) -> None:
    assert main(["report", "--prometheus", "http://127.0.0.1:9", "--since", "last week"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--since 'last week' is not a duration" in err


def test_no_records_and_no_prometheus(capsys) -> None:
    assert main(["report"]) == 2
    assert "no RECORDS given" in capsys.readouterr().err


def test_not_a_prometheus_server(capsys) -> None:
    from fake_carbon_server import FakeCarbonServer

    with FakeCarbonServer() as srv:                       # answers 404 JSON to /api/v1/query
        assert main(["report", "--prometheus", srv.url, "--since", "1h"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "is this a Prometheus server?" in err
