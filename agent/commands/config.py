"""``wattmeter config``: the effective settings and where each came from (flag, environment,
config file or default), after the same checks ``run``, ``serve`` and ``doctor`` make."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import flags_of
from .common import SensorSettings, add_sensor_arguments, settings_from_cwd


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the effective settings and where each came from",
                       description="Print every setting wattmeter reads, its effective value and its source: "
                                   "a flag given here, a WATTMETER_* variable, [tool.wattmeter] in ./pyproject.toml "
                                   "or ./wattmeter.toml, or the default. Bad settings fail here as in 'run'.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_sensor_arguments(p)
    try:
        from ..carbon.config import add_carbon_arguments
    except ImportError:  # a build without the carbon package
        pass
    else:
        add_carbon_arguments(p)
    p.set_defaults(handler=show_config)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def show_config(args: argparse.Namespace) -> int:
    settings = settings_from_cwd()
    sensors = SensorSettings.resolve(settings, flags_of(args))   # the cross-key rules (--no-gpu vs fake GPUs)
    rows = settings.effective(args)
    try:
        from ..carbon.config import CarbonConfig
    except ImportError:
        pass
    else:
        CarbonConfig.from_args(args, settings.env, settings.file)   # zone, PUE, provider checks
    resolved = {"no_gpu": sensors.no_gpu, "fake_nvml": sensors.fake_nvml, "fake_gpus": sensors.fake_gpus}
    out = []
    for group, name, value, origin in rows:
        if name in resolved and resolved[name] != value:
            value, origin = resolved[name], f"{origin} (overridden: --no-gpu and fake GPUs exclude each other)"
        out.append({"group": group, "key": name, "value": value, "source": origin})
    if args.json:
        sys.stdout.write(json.dumps({"file": settings.file_name if settings.file else None, "settings": out},
                                    indent=2) + "\n")
        return 0
    where = settings.file_name if settings.file else "(none: ./wattmeter.toml or [tool.wattmeter] in ./pyproject.toml)"
    sys.stdout.write(f"config file: {where}\n")
    width = max(len(r["key"]) for r in out)
    group = None
    for r in out:
        if r["group"] != group:
            group = r["group"]
            sys.stdout.write(f"[{group}]\n")
        sys.stdout.write(f"  {r['key']:<{width}}  {_show(r['value']):<24}  {r['source']}\n")
    return 0

