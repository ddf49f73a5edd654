"""Flags and set-up shared by `run`, `serve` and `doctor`: sensor choice, fake GPUs, intervals."""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..config import Settings, load_file_config, positive_float, positive_int
from ..discovery import Discovered, SensorPlan, discover
from ..errors import UsageError


def add_sensor_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sensors")
    g.add_argument("--interval", type=str, default=None, metavar="S",
                   help="GPU sampling period in seconds (default 0.1; env WATTMETER_INTERVAL)")
    g.add_argument("--fake-nvml", default=None, metavar="SCENARIO",
                   help="simulate GPUs from a scenario file (env WATTMETER_FAKE_NVML); output is labelled simulated")
    g.add_argument("--fake-gpus", default=None, metavar="N", help="simulate N H100 GPUs (shortcut for --fake-nvml)")
    g.add_argument("--no-gpu", action="store_true", default=None, help="do not meter GPUs")
    g.add_argument("--gpus", default=None, metavar="LIST",
                   help="GPUs to meter: indices, UUIDs or MIG ids, comma-separated (default: CUDA_VISIBLE_DEVICES)")
    g.add_argument("--cpu", choices=["auto", "rapl", "model", "none"], default=None,
                   help="CPU power source (default auto: RAPL, else a utilisation model)")
    g.add_argument("--cpu-tdp", default=None, metavar="W", help="CPU TDP in watts for the CPU model")
    g.add_argument("--powercap-root", default=None, help=argparse.SUPPRESS)


def settings_from_cwd() -> Settings:
    cfg, name = load_file_config()
    return Settings(file_config=cfg, file_name=name)


def sensor_plan(args: argparse.Namespace, settings: Settings, *, pid: int | None,
                local_rank_gpu: bool = False) -> SensorPlan:
    interval = settings.get("interval", args.interval, 0.1, positive_float)
    fake = settings.get("fake_nvml", args.fake_nvml, None, str)
    fake_gpus = settings.get("fake_gpus", args.fake_gpus, None, positive_int)
    if fake and fake_gpus:
        raise UsageError("--fake-nvml and --fake-gpus both given; choose one")
    no_gpu = settings.get("no_gpu", args.no_gpu, False, _bool)
    gpus = settings.get("gpus", args.gpus, None, str)
    if gpus is None and local_rank_gpu:
        gpus = _local_rank_gpu(os.environ)
    return SensorPlan(
        gpu="none" if no_gpu else "auto",
        fake_scenario=fake, fake_gpus=fake_gpus, gpu_period_s=interval,
        cpu=settings.get("cpu", args.cpu, "auto", _choice("cpu", ("auto", "rapl", "model", "none"))),
        pid=pid,
        cpu_tdp_w=settings.get("cpu_tdp", args.cpu_tdp, None, positive_float),
        powercap_root=args.powercap_root or os.environ.get("WATTMETER_POWERCAP_ROOT", "/sys/class/powercap"),
        visible_devices=gpus,
    )


def discover_or_fail(plan: SensorPlan) -> Discovered:
    found = discover(plan)
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


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _choice(name: str, options: tuple[str, ...]) -> Any:
    def parse(v: Any) -> str:
        if str(v) not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return str(v)
    return parse
