"""Reads scenario files into ``Scenario`` objects, strictly: every bad or unknown key is a
``ScenarioError`` whose one-line message names the file, the field path and the fix."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping, NoReturn

from ..errors import ScenarioError
from .scenario import (ARCHITECTURES, BUNDLED_DIR, CALL_FAULT_KINDS, FAULT_KINDS, FIELD_TIMESTAMPS,
                       INIT_FAULT_KINDS, INSTANT_KINDS, MIG_ARCHITECTURES,
                       FaultSpec, GpuSpec, MigSpec, ProcessSpec, Scenario, SensorSpec, bundled_scenarios,
                       default_identity, model_defaults)
from .traces import (ConstantTrace, PiecewiseLinearTrace, RampTrace, SquareTrace, StepsTrace, Trace,
                     TraceError, parse_smi_csv)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

_REQUIRED = object()
_TRACE_KEYS = {
    "constant": {"power_w"},
    "square": {"high_w", "low_w", "high_s", "low_s", "phase_s"},
    "ramp": {"from_w", "to_w", "over_s"},
    "steps": {"points"},
    "replay": {"file", "index", "loop"},
}
_FAULT_KEYS = {
    "init_failure": {"at_s", "for_s"},
    "driver_not_loaded": {"at_s", "for_s"},
    "library_not_found": {"at_s", "for_s"},
    "gpu_lost": {"at_s", "gpu", "for_s"},
    "counter_reset": {"at_s", "gpu"},
    "counter_stall": {"at_s", "gpu", "for_s"},
    "not_supported": {"at_s", "gpu", "function", "for_s"},
    "slow_call": {"at_s", "gpu", "function", "delay_s", "for_s"},
    "hang": {"at_s", "gpu", "function", "for_s", "release_s"},
}


class _Ctx:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, path: str, message: str) -> NoReturn:
        raise ScenarioError(f"scenario {self.source}: {path}: {message}")


class _Table:
    """One table of the file. Remembers the keys read so that leftovers (typos) are reported."""

    def __init__(self, ctx: _Ctx, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            ctx.fail(path, f"expected a table, got {_typename(data)}")
        self.ctx, self.data, self.path = ctx, data, path
        self.used: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _REQUIRED, hint: str = "") -> Any:
        self.used.add(key)
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            self.ctx.fail(self.at(key), f"required; {hint or 'add it'}")
        return default

    def num(self, key: str, default: Any = _REQUIRED, lo: float | None = None, lo_open: bool = False,
            hi: float | None = None, integer: bool = False, hint: str = "") -> Any:
        value = self.raw(key, default, hint)
        if value is default and default is not _REQUIRED:
            return value
        return _check_num(self.ctx, self.at(key), value, lo, lo_open, hi, integer)

    def text(self, key: str, default: Any = _REQUIRED, choices: tuple[str, ...] = ()) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, str):
            self.ctx.fail(self.at(key), f"expected a string, got {_typename(value)}")
        if choices and value not in choices:
            self.ctx.fail(self.at(key), f"unknown {value!r}; expected one of {', '.join(choices)}")
        return value

    def flag(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self.ctx.fail(self.at(key), f"expected true or false, got {_typename(value)}")
        return value

    def tables(self, key: str) -> list["_Table"]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            self.ctx.fail(self.at(key), f"expected a list of tables ([[{key}]]), got {_typename(value)}")
        return [_Table(self.ctx, item, f"{self.at(key)}[{i}]") for i, item in enumerate(value)]

    def finish(self, allowed: set[str] | None = None) -> None:
        allowed = self.used if allowed is None else allowed | self.used
        for key in self.data:
            if key not in allowed:
                import difflib  # lazy: only a typo in the file needs it

                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                fix = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(sorted(allowed))}"
                self.ctx.fail(self.at(str(key)), f"unknown key; {fix}")


def _typename(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _check_num(ctx: _Ctx, path: str, value: Any, lo: float | None = None, lo_open: bool = False,
               hi: float | None = None, integer: bool = False) -> Any:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        ctx.fail(path, f"expected {'an integer' if integer else 'a number'}, got {_typename(value)}")
    if not math.isfinite(value):
        ctx.fail(path, "must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        ctx.fail(path, f"{value} is out of range; must be {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and value > hi:
        ctx.fail(path, f"{value} is out of range; must be <= {hi:g}")
    return value if integer else float(value)


def _points(ctx: _Ctx, path: str, value: Any, hi: float | None = None) -> list[tuple[float, float]]:
    if not isinstance(value, list) or not value:
        ctx.fail(path, "expected a non-empty list of [t_s, value] pairs, e.g. [[0, 100], [5, 300]]")
    points = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            ctx.fail(f"{path}[{i}]", f"expected a [t_s, value] pair, got {pair!r}")
        t = _check_num(ctx, f"{path}[{i}][0]", pair[0])
        v = _check_num(ctx, f"{path}[{i}][1]", pair[1], lo=0, hi=hi)
        if points and t <= points[-1][0]:
            ctx.fail(f"{path}[{i}]", f"time {t:g} is not after the previous point; sort by time")
        points.append((t, v))
    return points


def _trace(ctx: _Ctx, tbl: _Table) -> Trace:
    kind = tbl.text("kind", choices=tuple(_TRACE_KEYS))
    try:
        trace = _build_trace(ctx, tbl, kind)
    except TraceError as exc:
        ctx.fail(tbl.path, str(exc))
    tbl.finish(_TRACE_KEYS[kind] | {"kind"})
    return trace


def _build_trace(ctx: _Ctx, tbl: _Table, kind: str) -> Trace:
    if kind == "constant":
        trace: Trace = ConstantTrace(tbl.num("power_w", lo=0))
    elif kind == "square":
        trace = SquareTrace(tbl.num("high_w", lo=0), tbl.num("low_w", lo=0), tbl.num("high_s", lo=0, lo_open=True),
                            tbl.num("low_s", lo=0, lo_open=True), tbl.num("phase_s", 0.0))
    elif kind == "ramp":
        trace = RampTrace(tbl.num("from_w", lo=0), tbl.num("to_w", lo=0), tbl.num("over_s", lo=0, lo_open=True))
    elif kind == "steps":
        trace = StepsTrace(_points(ctx, tbl.at("points"), tbl.raw("points")))
    else:
        name = tbl.text("file")
        index = tbl.num("index", 0, lo=0, integer=True)
        loop = tbl.flag("loop", False)
        path = (ctx.base_dir / name)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            ctx.fail(tbl.at("file"), f"cannot read {name!r} ({exc.strerror or exc}); "
                                     f"paths are relative to the scenario file's folder {ctx.base_dir}")
        try:
            times, powers = parse_smi_csv(text, index, source=name)
            trace = PiecewiseLinearTrace(times, powers, loop)
        except TraceError as exc:
            ctx.fail(tbl.at("file"), str(exc))
    return trace


def _sensor(ctx: _Ctx, tbl: _Table | None, defaults: dict[str, Any]) -> SensorSpec:
    if tbl is None:
        return SensorSpec(**defaults)
    base = SensorSpec(**defaults)
    refresh = tbl.num("counter_refresh_s", base.counter_refresh_s, lo=0, lo_open=True)
    phase = tbl.num("counter_phase_s", defaults["counter_phase_s"] % refresh, lo=0)
    if phase >= refresh:
        ctx.fail(tbl.at("counter_phase_s"), f"{phase:g} must be below counter_refresh_s ({refresh:g})")
    spec = SensorSpec(
        counter_refresh_s=refresh, counter_phase_s=phase,
        counter_jitter_s=tbl.num("counter_jitter_s", base.counter_jitter_s, lo=0, hi=0.45 * refresh),
        energy_counter=tbl.flag("energy_counter", base.energy_counter),
        power_usage=tbl.text("power_usage", base.power_usage, choices=("average_1s", "instant")),
        power_refresh_s=tbl.num("power_refresh_s", base.power_refresh_s, lo=0, lo_open=True),
        instant_refresh_s=tbl.num("instant_refresh_s", base.instant_refresh_s, lo=0, lo_open=True),
        instant_field=tbl.flag("instant_field", base.instant_field),
        util_refresh_s=tbl.num("util_refresh_s", base.util_refresh_s, lo=0, lo_open=True),
        call_latency_s=tbl.num("call_latency_s", base.call_latency_s, lo=0),
        instant_kind=tbl.text("instant_kind", base.instant_kind, choices=INSTANT_KINDS),
        field_timestamp=tbl.text("field_timestamp", base.field_timestamp, choices=FIELD_TIMESTAMPS),
        average_window_s=tbl.num("average_window_s", base.average_window_s, lo=0, lo_open=True),
        function_latency_s=_function_latencies(ctx, tbl),
    )
    tbl.finish()
    return spec


def _function_latencies(ctx: _Ctx, tbl: _Table) -> tuple[tuple[str, float], ...]:
    """``function_latency_s = { nvmlDeviceGetTotalEnergyConsumption = 0.05 }``"""
    if not tbl.has("function_latency_s"):
        return ()
    raw = _Table(ctx, tbl.raw("function_latency_s"), tbl.at("function_latency_s"))
    out = []
    for name, value in raw.data.items():
        _check_function(ctx, raw.at(str(name)), str(name))
        out.append((str(name), _check_num(ctx, raw.at(str(name)), value, lo=0)))
    return tuple(out)


def _check_function(ctx: _Ctx, path: str, function: str) -> None:
    import pynvml

    if not (function.startswith("nvml") and callable(getattr(pynvml, function, None))):
        import difflib  # lazy: error path only

        close = difflib.get_close_matches(function, [n for n in dir(pynvml) if n.startswith("nvml")], n=1)
        ctx.fail(path, f"{function!r} is not a pynvml function" + (f"; did you mean {close[0]!r}?" if close else ""))


def _process(ctx: _Ctx, tbl: _Table, gi_ids: set[int]) -> ProcessSpec:
    if tbl.has("sm_util") and tbl.has("sm_util_trace"):
        ctx.fail(tbl.at("sm_util_trace"), "give sm_util (constant) or sm_util_trace (steps), not both")
    if tbl.has("sm_util_trace"):
        sm: Trace = StepsTrace(_points(ctx, tbl.at("sm_util_trace"), tbl.raw("sm_util_trace"), hi=100))
    else:
        sm = ConstantTrace(tbl.num("sm_util", 0.0, lo=0, hi=100))
    start = tbl.num("start_s", 0.0)
    end = tbl.num("end_s", math.inf)
    if end <= start:
        ctx.fail(tbl.at("end_s"), f"{end:g} must be after start_s ({start:g})")
    gi_id = tbl.num("gi_id", None, lo=0, integer=True)
    if gi_id is not None and gi_id not in gi_ids:
        ctx.fail(tbl.at("gi_id"), f"no [[gpu.mig]] entry has gi_id {gi_id}; add one or drop gi_id")
    proc = ProcessSpec(pid=tbl.num("pid", lo=1, integer=True), name=tbl.text("name", "python"),
                       used_memory_mib=tbl.num("used_memory_mib", 1024.0, lo=0), sm_util=sm,
                       start_s=start, end_s=end, gi_id=gi_id)
    tbl.finish({"sm_util", "sm_util_trace"})
    return proc


def _gpu(ctx: _Ctx, tbl: _Table, index: int, seed: int) -> GpuSpec:
    model = tbl.text("model", "NVIDIA H100 80GB HBM3")
    info = model_defaults(model)
    need = "" if info else f"model {model!r} is not in the defaults table; set it explicitly"
    if info is None and not tbl.has("architecture"):
        ctx.fail(tbl.at("architecture"), f"required; {need}")
    arch = tbl.text("architecture", info.architecture if info else _REQUIRED, choices=ARCHITECTURES)
    limit = tbl.num("power_limit_w", info.power_limit_w if info else _REQUIRED, lo=0, lo_open=True, hint=need)
    idle = tbl.num("idle_power_w", info.idle_power_w if info else _REQUIRED, lo=0, hint=need)
    mem = tbl.num("memory_total_mib", info.memory_total_mib if info else _REQUIRED, lo=1, integer=True, hint=need)
    ident = default_identity(seed, index)
    uuid = tbl.text("uuid", ident["uuid"])
    if not re.fullmatch(r"GPU-[0-9a-fA-F-]{8,}", uuid):
        ctx.fail(tbl.at("uuid"), f"{uuid!r} does not look like 'GPU-xxxxxxxx-xxxx-...'")
    bus = tbl.text("pci_bus_id", ident["pci_bus_id"])
    if not re.fullmatch(r"([0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]", bus):
        ctx.fail(tbl.at("pci_bus_id"), f"{bus!r} is not like '00000000:18:00.0'")
    offset = tbl.num("energy_offset_j", ident["energy_offset_j"], lo=0)
    trace = _trace(ctx, _Table(ctx, tbl.raw("trace"), tbl.at("trace"))) if tbl.has("trace") \
        else ConstantTrace(idle)
    sensor_tbl = _Table(ctx, tbl.raw("sensor"), tbl.at("sensor")) if tbl.has("sensor") else None
    sensor = _sensor(ctx, sensor_tbl, SensorSpec.defaults_for(arch, ident["rng"]))
    migs = []
    for m in tbl.tables("mig"):
        if arch not in MIG_ARCHITECTURES:
            ctx.fail(m.path, f"MIG needs architecture {', '.join(MIG_ARCHITECTURES)} (A100/A30/H100/H200/B200), "
                             f"not {arch}")
        mig = MigSpec(gi_id=m.num("gi_id", lo=0, integer=True), sm_share=m.num("sm_share", lo=0, lo_open=True, hi=1))
        if any(x.gi_id == mig.gi_id for x in migs):
            ctx.fail(m.at("gi_id"), f"duplicate gi_id {mig.gi_id}; each MIG instance needs its own")
        m.finish()
        migs.append(mig)
    if sum(m.sm_share for m in migs) > 1.0 + 1e-9:
        ctx.fail(tbl.at("mig"), "sm_share values add up to more than 1; shrink them")
    procs = []
    for p in tbl.tables("process"):
        proc = _process(ctx, p, {m.gi_id for m in migs})
        if any(x.pid == proc.pid for x in procs):
            ctx.fail(p.at("pid"), f"duplicate pid {proc.pid} on this GPU")
        procs.append(proc)
    tbl.finish()
    return GpuSpec(index=index, model=model, uuid=uuid, architecture=arch, power_limit_w=limit,
                   idle_power_w=idle, memory_total_mib=mem, energy_offset_j=offset, pci_bus_id=bus,
                   pci_device_id=info.pci_device_id if info else 0x000010DE, trace=trace, sensor=sensor,
                   processes=tuple(procs), mig=tuple(migs))


def _fault(ctx: _Ctx, tbl: _Table, n_gpus: int) -> FaultSpec:
    kind = tbl.text("kind", choices=FAULT_KINDS)
    needs_time = kind in ("gpu_lost", "counter_reset", "counter_stall")
    at = tbl.num("at_s", _REQUIRED if needs_time else 0.0, lo=0)
    gpu = None
    if kind not in INIT_FAULT_KINDS:
        gpu = tbl.num("gpu", _REQUIRED if kind == "gpu_lost" else None, lo=0, integer=True,
                      hint="say which GPU index is lost")
        if gpu is not None and gpu >= n_gpus:
            ctx.fail(tbl.at("gpu"), f"no GPU {gpu}; the scenario has {n_gpus} (indices from 0)")
    function = None
    if kind in CALL_FAULT_KINDS:
        function = tbl.text("function")
        _check_function(ctx, tbl.at("function"), function)
    delay = tbl.num("delay_s", lo=0, lo_open=True) if kind == "slow_call" else 0.0
    for_s = tbl.num("for_s", math.inf, lo=0, lo_open=True) if "for_s" in _FAULT_KEYS[kind] else math.inf
    release = math.inf
    if kind == "hang":
        release = tbl.num("release_s", math.inf, lo=at)   # absent: hung calls never return
    other_kinds = set().union(*_FAULT_KEYS.values()) - _FAULT_KEYS[kind]
    for key in tbl.data:
        if key in other_kinds:
            ctx.fail(tbl.at(key), f"not used by kind {kind!r}; remove it")
    tbl.finish(_FAULT_KEYS[kind] | {"kind"})
    return FaultSpec(kind=kind, at_s=at, for_s=for_s, gpu=gpu, function=function, delay_s=delay,
                     release_s=release)


def build_scenario(data: Mapping[str, Any], source: str, base_dir: Path) -> Scenario:
    ctx = _Ctx(source, base_dir)
    top = _Table(ctx, data, "")
    seed = top.num("seed", 0, integer=True)
    duration = top.num("duration_s", None, lo=0, lo_open=True)
    driver = top.text("driver_version", "550.54.15")
    if not re.fullmatch(r"\d{3}\.\d{2,3}(\.\d{2,3})?", driver):
        ctx.fail("driver_version", f"{driver!r} is not like '550.54.15'")
    description = top.text("description", "")
    gpus = tuple(_gpu(ctx, t, i, seed) for i, t in enumerate(top.tables("gpu")))
    if len({g.uuid for g in gpus}) != len(gpus):
        ctx.fail("gpu", "two GPUs share a uuid; give each its own")
    if len({g.pci_bus_id.upper() for g in gpus}) != len(gpus):
        ctx.fail("gpu", "two GPUs share a pci_bus_id; give each its own")
    faults = tuple(_fault(ctx, t, len(gpus)) for t in top.tables("fault"))
    top.finish()
    return Scenario(gpus=gpus, faults=faults, seed=seed, duration_s=duration, driver_version=driver,
                    description=description, source=source)


def read_scenario_file(path: Path) -> Scenario:
    if not path.exists() and path.parent == Path(".") and path.suffix in ("", ".toml", ".json"):
        for candidate in (BUNDLED_DIR / f"{path.stem}.toml", BUNDLED_DIR / f"{path.stem}.json"):
            if candidate.exists():
                path = candidate
                break
    name = path.name
    if not path.is_file():
        raise ScenarioError(f"scenario {path}: file not found; give a path to a .toml/.json file or one of "
                            f"the bundled names: {', '.join(bundled_scenarios())}")
    if path.suffix not in (".toml", ".json"):
        raise ScenarioError(f"scenario {name}: unknown file type {path.suffix!r}; use .toml or .json")
    try:
        raw = path.read_bytes()
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ScenarioError(f"scenario {name}: not valid {kind}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise ScenarioError(f"scenario {name}: cannot read ({exc.strerror or exc})") from None
    return build_scenario(data, name, path.resolve().parent)
