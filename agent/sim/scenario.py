"""Scenarios for the fake NVML backend: GPUs, power traces, processes, MIG instances and faults.

A scenario is plain data (frozen dataclasses). Times are scenario seconds: t=0 is when the
``FakeNVML`` is built (or its explicit ``t0``). ``load_scenario`` reads TOML or JSON files in the
format documented in docs/fake-nvml.md; ``Scenario.default(n)`` builds n busy H100s.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .traces import (ConstantTrace, PiecewiseLinearTrace, RampTrace, SquareTrace, StepsTrace,
                     Trace, TraceError, parse_smi_csv)

__all__ = [
    "Scenario", "GpuSpec", "SensorSpec", "ProcessSpec", "MigSpec", "FaultSpec", "Trace", "TraceError",
    "ConstantTrace", "SquareTrace", "RampTrace", "StepsTrace", "PiecewiseLinearTrace", "parse_smi_csv",
    "load_scenario", "bundled_scenarios", "model_defaults", "ARCHITECTURES", "FAULT_KINDS", "BUNDLED_DIR",
]

BUNDLED_DIR = Path(__file__).resolve().parent / "scenarios"

# Oldest first: defaults below compare positions in this tuple.
ARCHITECTURES = ("pascal", "volta", "turing", "ampere", "ga100", "ada", "hopper", "blackwell")
MIG_ARCHITECTURES = ("ga100", "hopper", "blackwell")
FAULT_KINDS = ("init_failure", "driver_not_loaded", "library_not_found", "gpu_lost", "counter_reset",
               "counter_stall", "not_supported", "slow_call", "hang")
CALL_FAULT_KINDS = ("not_supported", "slow_call", "hang")   # faults that name a pynvml function
INSTANT_KINDS = ("box", "sample")
FIELD_TIMESTAMPS = ("refresh", "read")
INIT_FAULT_KINDS = ("init_failure", "driver_not_loaded", "library_not_found")


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    power_limit_w: float
    idle_power_w: float
    memory_total_mib: int
    pci_device_id: int


# Matched in order by substring of the model name, so longer names come first ("A100" before "A10").
_MODELS: tuple[tuple[str, ModelInfo], ...] = (
    ("H200", ModelInfo("hopper", 700, 75, 143771, 0x233510DE)),
    ("H100 PCIE", ModelInfo("hopper", 350, 50, 81559, 0x233110DE)),
    ("H100 NVL", ModelInfo("hopper", 400, 60, 95830, 0x232110DE)),
    ("H100", ModelInfo("hopper", 700, 70, 81559, 0x233010DE)),
    ("B200", ModelInfo("blackwell", 1000, 140, 183359, 0x290110DE)),
    ("A100-PCIE", ModelInfo("ga100", 250, 35, 40960, 0x20F110DE)),
    ("A100", ModelInfo("ga100", 400, 55, 40960, 0x20B010DE)),
    ("A30", ModelInfo("ga100", 165, 30, 24576, 0x20B710DE)),
    ("A40", ModelInfo("ampere", 300, 30, 46068, 0x223510DE)),
    ("A10", ModelInfo("ampere", 150, 20, 23028, 0x223610DE)),
    ("L40S", ModelInfo("ada", 350, 35, 46068, 0x26B910DE)),
    ("L4", ModelInfo("ada", 72, 16, 23034, 0x27B810DE)),
    ("T4", ModelInfo("turing", 70, 10, 15360, 0x1EB810DE)),
    ("V100", ModelInfo("volta", 300, 40, 32768, 0x1DB110DE)),
    ("P100", ModelInfo("pascal", 250, 30, 16384, 0x15F810DE)),
)


def model_defaults(model: str) -> ModelInfo | None:
    """Defaults for a known model name; the GB figure in the name overrides the table's memory."""
    upper = model.upper()
    for key, info in _MODELS:
        if key in upper:
            gb = re.search(r"(\d+)\s*GB", upper)
            if gb and abs(int(gb.group(1)) * 1024 - info.memory_total_mib) > 4096:
                return ModelInfo(info.architecture, info.power_limit_w, info.idle_power_w,
                                 int(gb.group(1)) * 1024, info.pci_device_id)
            return info
    return None


def arch_at_least(arch: str, oldest: str) -> bool:
    return ARCHITECTURES.index(arch) >= ARCHITECTURES.index(oldest)


@dataclass(frozen=True)
class SensorSpec:
    """How the simulated driver exposes the trace (refresh grids, averaging, support)."""

    counter_refresh_s: float = 0.1
    counter_phase_s: float = 0.0          # refresh instants are phase + k * refresh (all grids)
    counter_jitter_s: float = 0.0         # each counter refresh lands up to this early or late
    energy_counter: bool = True
    power_usage: str = "average_1s"       # "average_1s" or "instant": what GetPowerUsage returns
    power_refresh_s: float = 0.1
    instant_refresh_s: float = 0.02
    instant_field: bool = True            # fields 185/186 answer
    util_refresh_s: float = 1 / 6         # utilisation sample period
    call_latency_s: float = 0.0           # clock.sleep before every device call
    # Field 186: "box" = mean over the last instant_refresh_s (20 ms boxes, seen on H100s);
    # "sample" = the power at the refresh instant (100 ms instant samples elsewhere).
    instant_kind: str = "box"
    # Field timestamps: "refresh" = when the value was taken; "read" = when it was read (some
    # drivers stamp the read, so a timestamp says nothing about the value's age).
    field_timestamp: str = "refresh"
    average_window_s: float = 1.0         # GetPowerUsage (average_1s mode) and field 185: trailing mean
    # Extra clock.sleep per pynvml function, on top of call_latency_s: ((name, seconds), ...),
    # e.g. a 50 ms nvmlDeviceGetTotalEnergyConsumption. A tuple keeps the spec frozen and hashable.
    function_latency_s: tuple[tuple[str, float], ...] = ()

    def latency_s(self, function: str) -> float:
        """Delay of one call to ``function``: the global latency plus its own."""
        extra = sum(d for name, d in self.function_latency_s if name == function)
        return self.call_latency_s + extra

    @staticmethod
    def defaults_for(arch: str, rng: random.Random) -> dict[str, Any]:
        newer = arch_at_least(arch, "ampere") and arch != "ga100"
        return {
            "counter_phase_s": rng.uniform(0.0, 0.1),
            "energy_counter": arch_at_least(arch, "volta"),
            "power_usage": "average_1s" if newer else "instant",
            "instant_field": arch_at_least(arch, "ampere"),
        }


@dataclass(frozen=True)
class ProcessSpec:
    pid: int
    name: str = "python"
    used_memory_mib: float = 1024.0
    sm_util: Trace = field(default_factory=lambda: ConstantTrace(0.0))   # percent over time
    start_s: float = 0.0
    end_s: float = math.inf
    gi_id: int | None = None              # the MIG GPU instance it runs in

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.end_s


@dataclass(frozen=True)
class MigSpec:
    gi_id: int
    sm_share: float


@dataclass(frozen=True)
class GpuSpec:
    index: int
    model: str
    uuid: str
    architecture: str
    power_limit_w: float
    idle_power_w: float
    memory_total_mib: int
    energy_offset_j: float
    pci_bus_id: str
    pci_device_id: int
    trace: Trace
    sensor: SensorSpec = field(default_factory=SensorSpec)
    processes: tuple[ProcessSpec, ...] = ()
    mig: tuple[MigSpec, ...] = ()


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    at_s: float = 0.0
    for_s: float = math.inf
    gpu: int | None = None                # None: every GPU (or the library, for init kinds)
    function: str | None = None           # pynvml function name for not_supported / slow_call / hang
    delay_s: float = 0.0
    release_s: float = math.inf           # hang: scenario time when hung calls return (inf: never)

    @property
    def end_s(self) -> float:
        return self.at_s + self.for_s

    def active(self, t: float) -> bool:
        return self.at_s <= t < self.end_s


# Plausible bus ids of an 8-GPU HGX board, reused modulo 8 with a bumped domain.
_BUS_IDS = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


def gpu_rng(seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512, so this is stable across runs and PYTHONHASHSEED.
    return random.Random(f"wattmeter-fake:{seed}:{index}")


def _uuid4_text(bits: int) -> str:
    """``str(uuid.UUID(int=bits, version=4))`` without importing uuid (~2 ms: it imports platform)."""
    bits = bits & ~(0xC000 << 48) | (0x8000 << 48)   # RFC 4122 variant
    bits = bits & ~(0xF000 << 64) | (4 << 76)        # version 4
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def default_identity(seed: int, index: int) -> dict[str, Any]:
    rng = gpu_rng(seed, index)
    return {
        "uuid": f"GPU-{_uuid4_text(rng.getrandbits(128))}",
        "pci_bus_id": f"{index // 8:08X}:{_BUS_IDS[index % 8]:02X}:00.0",
        # Counters count since driver load, so a fresh meter never sees 0 (random days of use).
        "energy_offset_j": round(rng.uniform(1e5, 5e7), 3),
        "rng": rng,
    }


def training_trace(seed: int, index: int, idle_w: float = 70.0, period_s: float = 120.0) -> Trace:
    """A looping data-parallel training pattern: compute bursts, all-reduce dips, eval pauses."""
    rng = random.Random(f"wattmeter-train:{seed}:{index}")
    ts: list[float] = []
    ps: list[float] = []

    def plateau(t: float, length: float, p: float) -> float:
        ts.extend((t, t + length - 0.01))     # 10 ms edges: the board's power slews, not jumps
        ps.extend((p, p))
        return t + length

    t = plateau(0.0, 3.0, idle_w + 40)        # warm up / data load
    next_eval = 30.0
    while t < period_s - 6.0:
        if t >= next_eval:
            t = plateau(t, rng.uniform(1.5, 3.0), rng.uniform(180, 240))
            next_eval += 30.0
            continue
        t = plateau(t, rng.uniform(0.28, 0.36), rng.uniform(630, 690))     # forward/backward
        t = plateau(t, rng.uniform(0.05, 0.08), rng.uniform(380, 450))     # all-reduce
    plateau(t, period_s - t, idle_w + 30)
    trace = PiecewiseLinearTrace(ts, ps, loop=True)
    trace.kind = "training"
    return trace


@dataclass(frozen=True)
class Scenario:
    gpus: tuple[GpuSpec, ...]
    faults: tuple[FaultSpec, ...] = ()
    seed: int = 0
    duration_s: float | None = None       # informational: how long the scenario is meant to run
    driver_version: str = "550.54.15"
    description: str = ""
    source: str = "<scenario>"

    @property
    def cuda_driver_version(self) -> int:
        """What nvmlSystemGetCudaDriverVersion reports (e.g. 12040 for CUDA 12.4)."""
        major = int(self.driver_version.split(".")[0])
        table = ((580, 13000), (575, 12090), (570, 12080), (565, 12070), (560, 12060), (555, 12050),
                 (550, 12040), (545, 12030), (535, 12020), (530, 12010), (525, 12000), (520, 11080),
                 (515, 11070), (510, 11060), (470, 11040), (460, 11020), (450, 11000))
        return next((cuda for drv, cuda in table if major >= drv), 10020)

    @property
    def nvml_version(self) -> str:
        return f"{self.cuda_driver_version // 1000}.{self.driver_version}"

    @classmethod
    def default(cls, n_gpus: int = 1, seed: int = 0) -> "Scenario":
        """n H100 SXM GPUs running a varying data-parallel training load, one process each."""
        if n_gpus < 0:
            raise ValueError("n_gpus must be >= 0")
        info = model_defaults("NVIDIA H100 80GB HBM3")
        assert info is not None
        gpus = []
        for i in range(n_gpus):
            ident = default_identity(seed, i)
            sensor = SensorSpec(**SensorSpec.defaults_for(info.architecture, ident.pop("rng")))
            proc = ProcessSpec(pid=4100 + i, name="python", used_memory_mib=71_000,
                               sm_util=ConstantTrace(86.0))
            gpus.append(GpuSpec(index=i, model="NVIDIA H100 80GB HBM3", architecture=info.architecture,
                                power_limit_w=info.power_limit_w, idle_power_w=info.idle_power_w,
                                memory_total_mib=info.memory_total_mib, pci_device_id=info.pci_device_id,
                                trace=training_trace(seed, i, info.idle_power_w), sensor=sensor,
                                processes=(proc,), **ident))
        return cls(gpus=tuple(gpus), seed=seed, description=f"{n_gpus}x H100 training (built in)",
                   source=f"default({n_gpus})")

    @classmethod
    def load(cls, path: str | Path) -> "Scenario":
        return load_scenario(path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>",
                  base_dir: str | Path | None = None) -> "Scenario":
        from .scenario_loader import build_scenario
        return build_scenario(data, source, Path(base_dir) if base_dir else Path.cwd())


def bundled_scenarios() -> list[str]:
    """Names of the scenarios shipped in wattmeter/sim/scenarios (usable as ``load_scenario(name)``)."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.toml")) + sorted(
        p.stem for p in BUNDLED_DIR.glob("*.json"))


def load_scenario(path_or_name: str | Path) -> Scenario:
    """Load a TOML/JSON scenario file, or a bundled scenario by name (``"bursty"``)."""
    from .scenario_loader import read_scenario_file
    return read_scenario_file(Path(path_or_name))
