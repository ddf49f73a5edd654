"""Flags and set-up shared by `run`, `serve` and `doctor`: sensor choice, fake GPUs, intervals."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import (DEFAULT, FLAG, KEYS, MAX_FAKE_GPUS, MIN_INTERVAL_S, Settings, flags_of, load_file_config,
                      source_rank)
from ..discovery import Discovered, SensorPlan, discover
from ..errors import UsageError


def add_sensor_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sensors")
    g.add_argument("--interval", type=str, default=None, metavar="S",
                   help=f"sampling period in seconds of every sensor, at least {MIN_INTERVAL_S:g} (default: 0.1 for GPUs, "
                        "where GPUs without an energy counter read each power value, ~50 Hz; 1 for the CPU/RAM "
                        "models). A longer period reads every GPU at that period, edges still read fast: less CPU "
                        "(0.5: ~0.4 %% of a core for 8 GPUs), but live figures (/metrics, callbacks) and short windows on "
                        "GPUs without a counter lose accuracy. A GPU whose power has held still for 5 s is read "
                        "no more often than every ~0.3 s (~0.1 s without a counter) until it moves "
                        "(env WATTMETER_INTERVAL)")
    g.add_argument("--fake-nvml", default=None, metavar="SCENARIO",
                   help="simulate GPUs from a scenario file (env WATTMETER_FAKE_NVML); output is labelled simulated")
    g.add_argument("--fake-gpus", default=None, metavar="N", help=f"simulate N H100 GPUs, 1..{MAX_FAKE_GPUS} (shortcut for --fake-nvml)")
    g.add_argument("--no-gpu", action="store_true", default=None,
                   help="do not meter GPUs (beats a fake-GPU request from the environment)")
    g.add_argument("--gpus", default=None, metavar="LIST",
                   help="GPUs to meter: indices, UUIDs or MIG ids, comma-separated (default: CUDA_VISIBLE_DEVICES)")
    g.add_argument("--cpu", choices=["auto", "rapl", "model", "none"], default=None,
                   help="CPU power source (default auto: RAPL, else a utilisation model)")
    g.add_argument("--cpu-tdp", default=None, metavar="W", help="CPU TDP in watts for the CPU model")
    g.add_argument("--powercap-root", default=None, help=argparse.SUPPRESS)


def settings_from_cwd() -> Settings:
    cfg, name = load_file_config()
    return Settings(file_config=cfg, file_name=name)


@dataclass(frozen=True)
class SensorSettings:
    """The ``sensors`` group, resolved by precedence and validated once."""

    interval_s: float = 0.1
    fake_nvml: str | None = None
    fake_gpus: int | None = None
    no_gpu: bool = False
    gpus: str | None = None           # --gpus / WATTMETER_GPUS (None: CUDA_VISIBLE_DEVICES)
    cpu: str = "auto"
    cpu_tdp_w: float | None = None
    powercap_root: str = "/sys/class/powercap"

    @classmethod
    def resolve(cls, settings: Settings, flags: Mapping[str, Any]) -> "SensorSettings":
        """``flags``: the flag values by settings key (``config.flags_of``), None when not given."""
        g = lambda name: settings.key(name, flags)  # noqa: E731
        src = lambda name: settings.source(name, flags.get(name))  # noqa: E731
        fake = g("fake_nvml")
        n_fake = g("fake_gpus")
        if fake and n_fake:
            if src("fake_nvml") == src("fake_gpus"):
                raise UsageError(f"--fake-nvml {fake} and --fake-gpus {n_fake} both given; choose one")
            # the stronger source wins (a --fake-gpus flag beats WATTMETER_FAKE_NVML)
            if source_rank(src("fake_nvml")) > source_rank(src("fake_gpus")):
                n_fake = None
            else:
                fake = None
        no_gpu = g("no_gpu")
        if no_gpu and (fake or n_fake):
            fake_name = "fake_nvml" if fake else "fake_gpus"
            no_src, fake_src = src("no_gpu"), src(fake_name)
            if no_src == fake_src == FLAG:
                raise UsageError(f"--no-gpu and {KEYS[fake_name].option} both given; choose one")
            if source_rank(no_src) >= source_rank(fake_src):
                fake, n_fake = None, None      # --no-gpu beats a fake-GPU request from the environment
            else:
                no_gpu = False
        return cls(interval_s=g("interval"), fake_nvml=fake, fake_gpus=n_fake, no_gpu=no_gpu, gpus=g("gpus"),
                   cpu=g("cpu"), cpu_tdp_w=g("cpu_tdp"), powercap_root=g("powercap_root"))


@dataclass
class CliSensorPlan(SensorPlan):
    explicit_gpus: str | None = None     # --gpus / WATTMETER_GPUS as given, checked after discovery
    interval_s: float | None = None      # --interval as given (flag, env or file): every sensor's cadence


def sensor_plan(args: argparse.Namespace, settings: Settings, *, pid: int | None,
                local_rank_gpu: bool = False) -> CliSensorPlan:
    flags = flags_of(args)
    s = SensorSettings.resolve(settings, flags)
    gpus = s.gpus
    if gpus is None and local_rank_gpu:
        gpus = _local_rank_gpu(os.environ)
    return CliSensorPlan(
        explicit_gpus=s.gpus, interval_s=s.interval_s if settings.source("interval", flags.get("interval")) != DEFAULT else None,
        gpu="none" if s.no_gpu else "auto",
        fake_scenario=s.fake_nvml, fake_gpus=s.fake_gpus, gpu_period_s=s.interval_s,
        cpu=s.cpu, pid=pid, cpu_tdp_w=s.cpu_tdp_w, powercap_root=s.powercap_root,
        visible_devices=gpus,
    )


def check_gpu_selection(plan: CliSensorPlan, found: Discovered) -> None:
    """An explicit --gpus that matches fewer GPUs than it names is a usage error, not CPU-only."""
    gpus_flag = plan.explicit_gpus
    if gpus_flag is None or plan.gpu == "none":
        return
    wanted = [e.strip() for e in gpus_flag.split(",") if e.strip()]
    got = sum(1 for s in found.sensors if s.name == "nvml" for _ in s.devices())
    if got >= len(wanted):
        return
    # count what exists (only on this error path, so the normal start pays nothing)
    probe = discover(SensorPlan(gpu=plan.gpu, fake_scenario=plan.fake_scenario, fake_gpus=plan.fake_gpus,
                                cpu="none", ram="none", clock=plan.clock))
    have = sum(1 for s in probe.sensors if s.name == "nvml" for _ in s.devices())
    for s in probe.sensors:
        s.close()
    if have == 0:
        raise UsageError(f"--gpus {gpus_flag}: this machine has no GPU NVML can see; drop --gpus "
                         "(or see 'wattmeter doctor')")
    raise UsageError(f"--gpus {gpus_flag}: this machine has {have} GPU(s), indices 0..{have - 1}; "
                     f"e.g. --gpus {','.join(str(i) for i in range(min(have, len(wanted))))}")


def discover_or_fail(plan: CliSensorPlan) -> Discovered:
    found = discover(plan)
    try:
        check_gpu_selection(plan, found)
    except UsageError:
        for sensor in found.sensors:
            sensor.close()
        raise
    if not found.sensors:
        raise UsageError("no sensor works on this machine (see 'wattmeter doctor'); nothing to meter")
    return found


def _local_rank_gpu(env: Any) -> str | None:
    """One rank per GPU: a rank that sees several GPUs meters only cuda:LOCAL_RANK (no double count)."""
    rank = env.get("LOCAL_RANK")
    world = env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE")
    if rank is None or not rank.isdigit() or not world or world in ("1", "0"):
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if len(entries) <= 1:
            return None
        return entries[int(rank)] if int(rank) < len(entries) else None
    return rank

