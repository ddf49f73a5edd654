"""Configuration precedence: flags > WATTMETER_* environment > [tool.wattmeter] in pyproject.toml
or wattmeter.toml > defaults. Each value is parsed once, here, with a one-line error on bad input.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def load_file_config(cwd: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], str | None]:
    """The ``[tool.wattmeter]`` table of ./wattmeter.toml (whole file) or ./pyproject.toml."""
    here = Path(cwd or os.getcwd())
    for name, table in (("wattmeter.toml", None), ("pyproject.toml", ("tool", "wattmeter"))):
        path = here / name
        if not path.is_file():
            continue
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: cannot be read as TOML ({exc}); fix or remove it") from None
        if table:
            for part in table:
                data = data.get(part, {}) if isinstance(data, dict) else {}
            if not data:
                continue
        if "wattmeter" in data and name == "wattmeter.toml" and isinstance(data["wattmeter"], dict):
            data = data["wattmeter"]
        return dict(data), str(path)
    return {}, None


class Settings:
    """Looks a setting up by precedence. ``flag`` is the argparse value (None when not given)."""

    def __init__(self, env: Mapping[str, str] | None = None, file_config: Mapping[str, Any] | None = None,
                 file_name: str | None = None) -> None:
        self.env = os.environ if env is None else env
        self.file = dict(file_config or {})
        self.file_name = file_name or "config file"

    def get(self, name: str, flag: Any, default: T, parse: Callable[[Any], T] = lambda v: v,
            flag_name: str | None = None) -> T:
        """name is the snake_case key; env is WATTMETER_<NAME>; file key is name or kebab-case."""
        env_name = "WATTMETER_" + name.upper()
        kebab = name.replace("_", "-")
        if flag is not None:
            where, raw = flag_name or f"--{kebab}", flag
        elif self.env.get(env_name) not in (None, ""):
            where, raw = env_name, self.env[env_name]
        elif name in self.file or kebab in self.file:
            where, raw = f"{self.file_name} key '{name}'", self.file.get(name, self.file.get(kebab))
        else:
            return default
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: invalid value {raw!r}: {exc}") from None


def positive_float(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number of seconds > 0") from None
    if not x > 0 or x != x or x == float("inf"):
        raise ValueError("must be > 0 (e.g. 0.1)")
    return x


def positive_int(value: Any) -> int:
    try:
        x = int(value)
    except (TypeError, ValueError):
        raise ValueError("expected a whole number > 0") from None
    if x <= 0:
        raise ValueError("must be a whole number > 0")
    return x


def labels(value: Any) -> dict[str, str]:
    """KEY=VALUE pairs from a list of flags, a comma-separated string, or a TOML table."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out: dict[str, str] = {}
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"label {item!r} must look like KEY=VALUE (e.g. team=research)")
        out[key] = val.strip()
    return out
