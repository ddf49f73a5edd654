"""Fuzz the inputs a user hands wattmeter (issue 8): config tables, fake-NVML scenario files,
web-configs, JSONL records for ``report`` and inference-server /metrics text.

Each property: the input parses, or the project's one-line error comes back (a WattmeterError;
for the CLI, exit 2 and one stderr line starting ``wattmeter: error:``). Never another
exception, never a hang: every example runs under a wall-clock alarm.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from wattmeter import cli
from wattmeter.config import KEYS, Settings, check_table, load_file_config
from wattmeter.errors import ConfigError, ScenarioError, UsageError, WattmeterError
from wattmeter.exporters.webconfig import load_web_config
from wattmeter.sim.scenario import FAULT_KINDS
from wattmeter.sim.scenario_loader import read_scenario_file
from wattmeter.tokens.parse import SERVER_KINDS, TokenScrapeError, parse_tokens

from reliability_cases import case

EXAMPLE_LIMIT_S = 5.0      # one parse of a few hundred bytes taking longer than this is a hang
# A bounded, reproducible run in the suite; WATTMETER_FUZZ_EXAMPLES=5000 explores (random seeds).
DEEP = int(os.environ.get("WATTMETER_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=DEEP or 150, deadline=None, derandomize=not DEEP,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_bound(seconds: float = EXAMPLE_LIMIT_S) -> Iterator[None]:
    """Raise Hang in the test's (main) thread if the body runs past ``seconds``."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg.strip(), f"error is not one line: {msg!r}"
    assert "Traceback" not in msg


# -- value strategies ----------------------------------------------------------------------
# Text without lone surrogates (not encodable as UTF-8, so no file could hold them).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e-9, 1e300, -1.0, 0.5])
INTS = st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 2**63, 2**64])
SCALARS = st.booleans() | INTS | FLOATS | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)


def toml_value(v: Any) -> str:
    """A TOML inline rendering of a Python value (the files a user could write)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


# -- (a) [tool.wattmeter] tables and wattmeter.toml ----------------------------------------
CONFIG_KEYS = sorted({n for k in KEYS.values() for n in (k.name, k.name.replace("_", "-"))} | {"carbon"})
CONFIG_TABLES = st.dictionaries(st.sampled_from(CONFIG_KEYS) | TEXT, VALUES, max_size=4)


@case("Fuzzed `[tool.wattmeter]` tables and `wattmeter.toml` files (hypothesis)",
      records="-", exit_code="2 with one `wattmeter: error:` line", energy="-",
      metrics="ConfigError naming the key, or a clean parse; never a traceback or hang")
@FUZZ
@given(table=CONFIG_TABLES, as_pyproject=st.booleans(), garbage=st.none() | st.binary(max_size=40))
@example(table={"carbon": {"pue": 2**70}}, as_pyproject=False, garbage=None)
@example(table={"labels": {"a": [1]}}, as_pyproject=True, garbage=None)
@example(table={}, as_pyproject=False, garbage=b"\xff\xfe")
def test_fuzz_config_file(table, as_pyproject, garbage):
    with tempfile.TemporaryDirectory() as d, time_bound():
        body = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items())
        text = ("[tool.wattmeter]\n" + body) if as_pyproject else body
        raw = garbage if garbage is not None else text.encode("utf-8")
        Path(d, "pyproject.toml" if as_pyproject else "wattmeter.toml").write_bytes(raw)
        try:
            data, where = load_file_config(d)
        except ConfigError as exc:
            one_line(exc)
            return
        # A checked table: the settings engine resolves every key from it without surprises.
        s = Settings(env={}, file_config=data, file_name=where)
        for key in KEYS.values():
            try:
                s.get(key.name, None, key.default, key.parse)
            except ConfigError as exc:
                one_line(exc)


@FUZZ
@given(table=CONFIG_TABLES)
def test_fuzz_config_table_and_env(table):
    """check_table straight on Python values, and the same values as WATTMETER_* variables."""
    with time_bound():
        try:
            check_table(table, "pyproject.toml")
        except ConfigError as exc:
            one_line(exc)
        env = {"WATTMETER_" + str(k).upper().replace("-", "_"): str(v) for k, v in table.items()}
        s = Settings(env=env, file_config={})
        for key in KEYS.values():
            try:
                s.get(key.name, None, key.default, key.parse)
            except ConfigError as exc:
                one_line(exc)


# -- (b) fake-NVML scenario files ----------------------------------------------------------
TRACE_KINDS = ["constant", "square", "ramp", "steps", "smi_csv", "file", "nope"]
TRACE_KEYS = ["kind", "power_w", "high_w", "low_w", "high_s", "low_s", "phase_s", "from_w", "to_w", "over_s",
              "points", "file", "index", "loop"]
GPU_KEYS = ["model", "architecture", "power_limit_w", "idle_power_w", "memory_total_mib", "uuid", "pci_bus_id",
            "energy_offset_j", "trace", "sensor", "mig", "process"]
SENSOR_KEYS = ["counter_refresh_s", "counter_phase_s", "counter_jitter_s", "energy_counter", "power_usage",
               "power_refresh_s", "instant_refresh_s", "instant_field", "util_refresh_s", "call_latency_s",
               "instant_kind", "field_timestamp", "average_window_s", "function_latency_s"]
PROC_KEYS = ["pid", "name", "used_memory_mib", "sm_util", "sm_util_trace", "start_s", "end_s", "gi_id"]
FAULT_KEYS = ["kind", "at_s", "for_s", "gpu", "function", "delay_s", "release_s"]


def table_of(keys: list[str], special: dict[str, st.SearchStrategy] | None = None) -> st.SearchStrategy:
    special = special or {}
    return st.lists(st.sampled_from(keys), max_size=6, unique=True).flatmap(
        lambda ks: st.fixed_dictionaries({k: special.get(k, VALUES) for k in ks}))


NUMS = INTS | FLOATS
TRACE = table_of(TRACE_KEYS, {"kind": st.sampled_from(TRACE_KINDS), "points": st.lists(st.lists(NUMS, max_size=3),
                                                                                        max_size=4)})
PROCESS = table_of(PROC_KEYS, {"pid": NUMS, "start_s": NUMS, "end_s": NUMS})
GPU = table_of(GPU_KEYS, {"trace": TRACE | VALUES, "sensor": table_of(SENSOR_KEYS, {k: NUMS for k in SENSOR_KEYS}),
                          "process": st.lists(PROCESS, max_size=2), "mig": st.lists(VALUES, max_size=2),
                          "model": st.sampled_from(["NVIDIA H100 80GB HBM3", "A100", "Tesla X"]) | TEXT})
FAULT = table_of(FAULT_KEYS, {"kind": st.sampled_from(list(FAULT_KINDS) + ["meteor"]), "at_s": NUMS,
                              "for_s": NUMS, "gpu": NUMS})
SCENARIO = table_of(["seed", "duration_s", "driver_version", "description", "gpu", "fault", "extra"],
                    {"gpu": st.lists(GPU, max_size=2) | VALUES, "fault": st.lists(FAULT, max_size=2) | VALUES,
                     "seed": NUMS, "duration_s": NUMS})


@case("Fuzzed fake-NVML scenario files, TOML and JSON (hypothesis)",
      records="-", exit_code="2 with one `wattmeter: error:` line", energy="-",
      metrics="ScenarioError naming the field path, or a clean parse; never a traceback or hang")
@FUZZ
@given(data=SCENARIO, as_json=st.booleans())
@example(data={"gpu": [{"process": [{"pid": 1, "start_s": math.nan}]}]}, as_json=True)
@example(data={"seed": 2**70}, as_json=False)
@example(data={"gpu": [{"trace": {"kind": "steps", "points": [[0, 1e400]]}}]}, as_json=True)
def test_fuzz_scenario_file(data, as_json):
    with tempfile.TemporaryDirectory() as d, time_bound():
        if as_json:
            path = Path(d, "s.json")
            path.write_text(json.dumps(data))
        else:
            path = Path(d, "s.toml")
            path.write_text(toml_document(data))
        try:
            scenario = read_scenario_file(path)
        except ScenarioError as exc:
            one_line(exc)
            return
        assert all(g.power_limit_w > 0 for g in scenario.gpus)


@FUZZ
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".toml", ".json"]))
def test_fuzz_scenario_bytes(raw, suffix):
    with tempfile.TemporaryDirectory() as d, time_bound():
        path = Path(d, "s" + suffix)
        path.write_bytes(raw)
        try:
            read_scenario_file(path)
        except ScenarioError as exc:
            one_line(exc)


def toml_document(data: dict) -> str:
    """Top-level keys as ``k = v`` lines; a non-dict document cannot be TOML, so wrap it."""
    return "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in data.items())


# -- (c) exporter-toolkit web-config files -------------------------------------------------
YAML_WORDS = st.sampled_from(["tls_server_config:", "http_server_config:", "basic_auth_users:", "headers:",
                              "cert_file: x.pem", "key_file: k.pem", "min_version: TLS13", "max_version: TLS12",
                              "client_auth_type: RequireAndVerifyClientCert", "http2: true",
                              "alice: $2y$10$" + "a" * 53, "X-Frame-Options: deny", "- item", "{}", "[]",
                              "'quoted: value'", "\"dq\"", "key: [1, 2]", "# comment", ":", "- - x", "a: b: c"])
YAML_LINES = st.lists(st.tuples(st.integers(0, 6), YAML_WORDS | TEXT), max_size=10).map(
    lambda ls: "\n".join(" " * n + s for n, s in ls) + "\n")


@case("Fuzzed web-config files (hypothesis)", records="-", exit_code="2 with one `wattmeter: error:` line",
      energy="-", metrics="UsageError naming the field, or a clean parse; never a traceback or hang")
@FUZZ
@given(text=YAML_LINES | TEXT)
@example(text="tls_server_config:\n  min_version: TLS13\n  max_version: TLS12\n")
@example(text="http_server_config:\n  headers:\n    X-A: \"a\\r\\nSet-Cookie: x\"\n")
@example(text="basic_auth_users:\n  - alice\n")
@example(text="- a\n  - b\n")
def test_fuzz_web_config(text):
    with tempfile.TemporaryDirectory() as d, time_bound():
        path = Path(d, "web.yml")
        path.write_text(text, encoding="utf-8")
        try:
            load_web_config(str(path))
        except UsageError as exc:
            one_line(exc)


# -- (d) JSONL records fed to `wattmeter report` -------------------------------------------
RECORD_KEYS = ["schema", "run_id", "job", "hostname", "labels", "status", "exit_code", "start", "end",
               "start_unix", "end_unix", "duration_s", "energy_j", "host_energy_j", "energy_kwh", "devices",
               "tokens", "value", "carbon", "approximate", "simulated", "checkpoint", "zone", "co2e_g"]
ENERGY = st.dictionaries(st.sampled_from(["gpu", "cpu", "ram", "total"]) | TEXT, NUMS | VALUES, max_size=4)
RECORD = table_of(RECORD_KEYS, {"energy_j": ENERGY | VALUES, "host_energy_j": ENERGY, "duration_s": NUMS,
                                "start_unix": NUMS, "end_unix": NUMS, "schema": st.just("wattmeter.run/1") | TEXT,
                                "devices": st.lists(table_of(["key", "component", "energy_j", "avg_power_w",
                                                              "peak_power_w", "labels"]), max_size=2)})
BASE_RECORD = {"schema": "wattmeter.run/1", "run_id": "r1", "job": "j", "hostname": "h", "labels": {},
               "status": "ok", "exit_code": 0, "start": "2024-05-01T08:00:00Z", "end": "2024-05-01T08:20:00Z",
               "start_unix": 1714550400, "end_unix": 1714551600.0, "duration_s": 1200.0,
               "energy_j": {"gpu": 1000.0, "cpu": 10.0, "ram": 1.0, "total": 1011.0}}


GOOD_RECORD = {**BASE_RECORD, "run_id": "zz-good-run", "job": "goodjob7", "labels": {"team": "goodjob7"}}


def json_line(rec: Any) -> str:
    return json.dumps(rec, allow_nan=True)


@case("Fuzzed JSONL records fed to `wattmeter report` (hypothesis)", records="bad lines skipped and named",
      exit_code="0", energy="a good run among them still reported",
      metrics="never a traceback or hang")
@FUZZ
@given(recs=st.lists(RECORD.map(lambda r: {**BASE_RECORD, **r}) | RECORD | VALUES | TEXT, max_size=4),
       fmt=st.sampled_from(["table", "csv", "json", "markdown", "codecarbon"]),
       group=st.sampled_from(["job", "host", "day", "team"]))
@example(recs=[{**BASE_RECORD, "energy_j": {"gpu": math.nan, "total": 1e300}}], fmt="table", group="job")
@example(recs=[{**BASE_RECORD, "start_unix": 1e300, "end_unix": -1e300}], fmt="csv", group="day")
@example(recs=[{**BASE_RECORD, "labels": []}], fmt="json", group="team")
def test_fuzz_report_records(recs, fmt, group):
    with tempfile.TemporaryDirectory() as d, time_bound(15.0):
        path = Path(d, "r.jsonl")
        lines = [(r if isinstance(r, str) else json_line(r)).replace("\n", " ") for r in recs]
        path.write_text("\n".join(lines + [json_line(GOOD_RECORD)]) + "\n")   # one good run among them
        code, out, err = run_cli(["report", str(path), "--format", fmt, "--group-by", group])
        assert "Traceback" not in err
        assert code == 0, (code, err)          # bad lines are skipped, never fatal
        assert GOOD_RECORD["job"] in out, out  # ...and the good run is still reported


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:           # argparse: exit 2 with its usage line
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


# -- (e) inference-server /metrics text ----------------------------------------------------
COUNTER_NAMES = sorted({c.sample for k in SERVER_KINDS.values() for c in k.counters})
LABEL = st.tuples(st.sampled_from(["model_name", "model", "engine", "le", "x"]) | TEXT, TEXT)
SAMPLE = st.builds(
    lambda name, labels, value, raw: name + ("{" + ",".join(f"{k}={json.dumps(v)}" if not raw else f"{k}={v}"
                                                            for k, v in labels) + "}" if labels else "")
    + " " + value,
    st.sampled_from(COUNTER_NAMES) | st.from_regex(r"[a-z_:][a-z0-9_:]{0,10}", fullmatch=True),
    st.lists(LABEL, max_size=3), st.sampled_from(["1", "0", "-1", "NaN", "+Inf", "1e400", "12.5", "x", ""]) | TEXT,
    st.booleans())
METRICS = st.lists(SAMPLE | st.sampled_from(["# TYPE x counter", "# HELP x y", "# EOF", ""]) | TEXT, max_size=8).map(
    "\n".join)


@case("Fuzzed inference-server `/metrics` text, every server family (hypothesis)", records="-", exit_code="-",
      energy="-", metrics="TokenScrapeError(parse) counted, or the token counters; never a traceback or hang")
@FUZZ
@given(text=METRICS, kind=st.sampled_from(sorted(SERVER_KINDS)))
@example(text='vllm:prompt_tokens_total{model_name="m"} 1e400', kind="vllm")
@example(text='vllm:prompt_tokens_total{model_name="m} 1', kind="vllm")
def test_fuzz_token_metrics(text, kind):
    with time_bound():
        try:
            out = parse_tokens(kind, text)
        except TokenScrapeError as exc:
            one_line(exc)
            return
        assert all(math.isfinite(v) and v >= 0 for v in out.values())
