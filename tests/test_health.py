"""Per-device health (issues 8 and 9): one lost GPU turns its own wattmeter_up series to 0 and keeps
it there, without flapping the sensor's series; /healthz fails with the reason once a working
sensor has gone stale; every known error counter is exported at 0 from the first scrape."""
from __future__ import annotations

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wattmeter.clock import VirtualClock
from wattmeter.exporters.prometheus import ExportSources, build_registry
from wattmeter.health import DEVICE_STALE_S, SENSOR_ERROR_KINDS, Freshness
from wattmeter.meter import Meter
from wattmeter.sensors.nvml import GpuSelection, NvmlSensor
from wattmeter.sim.fake_nvml import FakeNVML, build_module
from wattmeter.sim.scenario import Scenario

H100 = "NVIDIA H100 80GB HBM3"


def _meter(faults: list[dict]) -> tuple[VirtualClock, Meter, Freshness]:
    scenario = Scenario.from_dict({"gpu": [
        {"model": H100, "trace": {"kind": "constant", "power_w": 300.0}},
        {"model": H100, "trace": {"kind": "constant", "power_w": 100.0}},
    ], "fault": faults})
    clock = VirtualClock(start=1000.0)
    module = build_module(FakeNVML(scenario, clock))
    meter = Meter([NvmlSensor(module, GpuSelection(None))], clock=clock)
    meter.poll()
    return clock, meter, Freshness(meter, clock.now)


def _up(registry) -> dict[tuple[str, str], float]:
    text = generate_latest(registry).decode()
    return {(s.labels["sensor"], s.labels["device"]): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == "wattmeter_up"}


def _errors(registry) -> dict[tuple[str, str], float]:
    text = generate_latest(registry).decode()
    return {(s.labels["sensor"], s.labels["error"]): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "wattmeter_sensor_errors_total"}


def test_one_lost_gpu_goes_down_alone_and_stays_down_without_flapping() -> None:
    clock, meter, fresh = _meter([{"kind": "gpu_lost", "gpu": 1, "at_s": 2.0}])    # lost for good
    registry, _ = build_registry(ExportSources(meter, "h", freshness=fresh.devices))
    sensor_series, gpu1_series = [], []
    for _ in range(300):              # 30 s in 0.1 s steps, scraped every 0.5 s
        clock.advance(0.1)
        meter.poll()
        if round(clock.now() * 10) % 5 == 0:
            up = _up(registry)
            sensor_series.append(up[("nvml", "")])
            gpu1_series.append(up[("nvml", "gpu1")])
            assert up[("nvml", "gpu0")] == 1.0
    assert set(sensor_series) == {1.0}                 # the sensor never flaps: gpu0 still delivers
    first_down = gpu1_series.index(0.0)
    assert set(gpu1_series[first_down:]) == {0.0}      # down once, and stays down
    # It went down once its newest point was older than the threshold, not at the first failed read.
    assert (first_down + 1) * 0.5 >= 2.0 + DEVICE_STALE_S - 4.5
    assert _errors(registry)[("nvml", "gpu_lost")] > 0


def test_every_known_error_counter_is_exported_at_zero_before_any_error() -> None:
    _, meter, fresh = _meter([])
    registry, _ = build_registry(ExportSources(meter, "h", freshness=fresh.devices))
    errors = _errors(registry)
    for kind in SENSOR_ERROR_KINDS["nvml"]:
        assert errors[("nvml", kind)] == 0.0




class _Running:
    """The meter as the daemon sees it (sampler running), stepped by hand in virtual time."""

    def __init__(self, meter: Meter) -> None:
        self.meter, self.sensors, self.running = meter, meter.sensors, True

    def snapshot(self):
        return self.meter.snapshot()

    @property
    def status(self):
        return self.meter.status


def _step(clock: VirtualClock, meter: Meter, seconds: float) -> None:
    for _ in range(int(round(seconds * 10))):
        clock.advance(0.1)
        meter.poll()


def test_healthz_fails_with_the_reason_once_a_working_sensor_is_stale() -> None:
    clock, meter, _ = _meter([{"kind": "gpu_lost", "gpu": 0, "at_s": 3.0}, {"kind": "gpu_lost", "gpu": 1, "at_s": 3.0}])
    fresh = Freshness(_Running(meter), clock.now)
    _step(clock, meter, 2.0)
    ok, text = fresh.healthz()
    assert ok and text.startswith("ok\nnvml: up (2/2 devices fresh)")
    _step(clock, meter, 8.0)              # lost, but not yet past the threshold: still healthy
    assert fresh.healthz()[0]
    _step(clock, meter, DEVICE_STALE_S)
    ok, text = fresh.healthz()
    assert not ok
    first = text.splitlines()[0]
    assert first.startswith("unhealthy: nvml stale: gpu0 stale for ") and "gpu1 stale for" in first
    assert "last error:" in first


def test_healthz_names_a_single_stale_gpu_but_stays_up_while_the_sensor_delivers() -> None:
    clock, meter, _ = _meter([{"kind": "gpu_lost", "gpu": 1, "at_s": 1.0}])
    fresh = Freshness(_Running(meter), clock.now)
    _step(clock, meter, 2.0 + 2 * DEVICE_STALE_S)
    ok, text = fresh.healthz()
    assert ok and "nvml: up (1/2 devices fresh); gpu1 stale for" in text


def test_healthz_fails_when_the_sampler_stopped() -> None:
    clock, meter, fresh = _meter([])
    ok, text = fresh.healthz()         # meter never started
    assert not ok and text.startswith("unhealthy: the sampler is not running")


def test_serve_exports_device_up_zero_error_counters_and_a_per_sensor_healthz(tmp_path) -> None:
    """Through `wattmeter serve`: the wiring (serve.py's hooks) reaches the scrape and /healthz."""
    import time

    from e2e_servers import WattmeterServe, http_get, wait_until

    serve = WattmeterServe(["--fake-gpus", "2", "--cpu", "model"], tmp_path / "serve")
    try:
        def scraped() -> str | None:
            body = http_get(f"{serve.url}/metrics")[1].decode()
            both = all(f'wattmeter_up{{sensor="nvml",device="gpu{i}"}} 1.0' in body for i in (0, 1))
            return body if both else None      # a device not read yet is 0 until its first reading
        body = wait_until(scraped, 30, "per-device wattmeter_up")
        assert 'wattmeter_up{sensor="nvml",device=""} 1.0' in body
        for sensor, kind in (("nvml", "gpu_lost"), ("nvml", "timeout"), ("http", "read_timeout"),
                             ("http", "connection_limit"), ("http", "body_too_large")):
            assert f'wattmeter_sensor_errors_total{{sensor="{sensor}",error="{kind}"}} 0.0' in body
        status, text = http_get(f"{serve.url}/healthz")
        assert status == 200 and text.decode().startswith("ok\n") and "nvml: up (2/2 devices fresh)" in text.decode()
        time.sleep(0.1)
    finally:
        serve.stop()


def test_serve_refuses_an_unknown_flag_with_one_line_and_exit_2(tmp_path) -> None:
    """What a chart's extraArgs typo does when the schema is bypassed: no crash-loop traceback."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "wattmeter", "serve", "--log-level", "debug"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--log-level" in lines[0] and "Traceback" not in out.stderr


def test_every_error_kind_the_fake_faults_produce_is_declared() -> None:
    """The declared kinds (exported at 0 from the start) cover what the NVML sensor counts under
    every fault the bundled faults scenario injects (slow calls, unsupported calls and fields, a
    counter reset, a lost GPU); a kind counted but not declared would again appear only at its
    first error and be invisible to increase()."""
    from wattmeter.sim.scenario import load_scenario

    clock = VirtualClock(start=1000.0)
    module = build_module(FakeNVML(load_scenario("faults"), clock))
    meter = Meter([NvmlSensor(module, GpuSelection(None))], clock=clock)
    for _ in range(400):        # the scenario's 40 s
        clock.advance(0.1)
        meter.poll()
    counted = set(meter.status["nvml"].errors)
    assert counted, "the faults scenario should make the sensor count errors"
    assert counted <= set(SENSOR_ERROR_KINDS["nvml"]), counted - set(SENSOR_ERROR_KINDS["nvml"])
