"""The one settings engine. Precedence: flags > ``WATTMETER_*`` environment > ``[tool.wattmeter]``
in pyproject.toml or wattmeter.toml > defaults.

Every key a config file may hold is declared once in :data:`KEYS` (its group, parser and
default). A config file is checked as a whole when it is loaded: an unknown key, a value of the
wrong type or a file that is not UTF-8 TOML is a one-line :class:`ConfigError` (exit 2) naming
the value and the closest good one. Typed, validated settings per command group are built from
:class:`Settings` once (``wattmeter.settings``: records, export, serve; ``SensorSettings`` in
``commands.common``; ``CarbonConfig`` in ``carbon.config``) and wired by ``wattmeter.compose``;
``wattmeter config`` prints every key with where its value came from.

The Python API uses the same engine with its keyword arguments in the place of flags
(``Settings(api=True)``): messages then name ``records=`` rather than ``--records``, and the error
is a :class:`SettingValueError` (a ``ValueError`` as well as a ``ConfigError``).
"""
from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")

# The fastest cadence a sensor honours: NVML's fastest power field refreshes every ~10-20 ms and
# a read costs ~0.1-3.5 ms of CPU, so below 5 ms the sampler only burns a core (issue 8).
MIN_INTERVAL_S = 0.01   # == sampler.MIN_INTERVAL_S (tests/test_settings.py checks); importing the sampler here would load the ledger
MAX_FAKE_GPUS = 64          # the fake NVML's documented maximum (docs/fake-nvml.md)


class SettingValueError(ConfigError, ValueError):
    """A bad keyword argument of the Python API (``Meter(pue=0.5)``): the CLI's one-line message,
    naming the argument (``pue=0.5``) instead of the flag. A ``ValueError`` for Python callers,
    a ``ConfigError`` like every other bad setting."""


# Where a value came from, strongest first.
FLAG, ENV, FILE, DEFAULT = "flag", "env", "file", "default"
_RANK = {FLAG: 3, ENV: 2, FILE: 1, DEFAULT: 0}


# -- parsers (each raises ValueError with the fix; the caller adds where the value came from) --
def positive_float(value: Any) -> float:
    x = _number(value, "a number > 0, e.g. 0.1")
    if not x > 0:
        raise ValueError("must be > 0 (e.g. 0.1)")
    return x


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError("expected a whole number > 0")
    try:
        x = int(value)
    except (TypeError, ValueError):
        raise ValueError("expected a whole number > 0") from None
    if x <= 0:
        raise ValueError("must be a whole number > 0")
    return x


def interval_s(value: Any) -> float:
    x = _number(value, f"seconds, e.g. 0.1 (at least {MIN_INTERVAL_S:g})")
    if x < MIN_INTERVAL_S:
        raise ValueError(f"is below {MIN_INTERVAL_S:g} s, the fastest cadence a sensor supports; "
                         f"give at least {MIN_INTERVAL_S:g} (default 0.1)")
    return x


def fake_gpus(value: Any) -> int:
    n = positive_int(value)
    if n > MAX_FAKE_GPUS:
        raise ValueError(f"is above the fake NVML's maximum of {MAX_FAKE_GPUS} GPUs; give 1..{MAX_FAKE_GPUS}")
    return n


def port(value: Any) -> int:
    digits = str(value).strip()
    if isinstance(value, bool) or not (digits.isascii() and digits.isdigit()) or not 0 <= int(digits) <= 65535:
        raise ValueError("expected a port number 0-65535 (0 picks a free port)")
    return int(digits)


def checked_argument(name: str, value: Any, parse: Callable[[Any], T]) -> T:
    """A Python API keyword argument parsed like its flag: ``interval_s=0`` fails as
    ``--interval 0`` does, with the same message naming ``interval_s=0``."""
    try:
        return parse(value)
    except (ValueError, TypeError) as exc:
        raise SettingValueError(f"{name}={value!r}: {exc}") from None


def checked_fake_request(n: int | None, scenario: str | None) -> tuple[int | None, str | None]:
    """The Python API's ``Meter(fake_gpus=..., scenario=...)``, checked like the flags."""
    if n is not None and scenario is not None:
        raise SettingValueError(f"fake_gpus={n!r} and scenario={scenario!r} both given; choose one")
    if n is not None:
        try:
            n = fake_gpus(n)
        except ValueError as exc:
            raise SettingValueError(f"fake_gpus={n!r}: {exc}") from None
    return n, scenario


def text(value: Any) -> str:
    """A string; a TOML number or table here is a mistake, not something to str()."""
    if not isinstance(value, str):
        raise ValueError(f"expected text in quotes, not {type(value).__name__}")
    return value


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if str(value) not in options:
            close = difflib.get_close_matches(str(value), options, 1, 0.0)
            raise ValueError(f"expected one of {', '.join(options)} (closest: {close[0]})")
        return str(value)
    return parse


def finite_float(value: Any) -> float:
    return _number(value, "a number such as 1.2")


def labels(value: Any) -> dict[str, str]:
    """KEY=VALUE pairs from a list of flags, a comma-separated string, or a TOML table."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float)):
        raise ValueError("expected KEY=VALUE pairs or a table, e.g. labels = { team = \"nlp\" }")
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


def _number(value: Any, want: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected {want}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected {want}") from None
    if not math.isfinite(x):
        raise ValueError(f"is not finite; expected {want}")
    return x


# -- the key registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    name: str                               # snake_case; env WATTMETER_<NAME>; file key name or kebab
    group: str                              # sensors | run | export | serve | carbon
    parse: Callable[[Any], Any]
    default: Any = None
    flag: str | None = None                 # default: --kebab-case
    file_aliases: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return "WATTMETER_" + self.name.upper()

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """The argparse attribute that holds the flag (``--label`` -> ``label``)."""
        return self.option.lstrip("-").replace("-", "_")


_CPU = choice("auto", "rapl", "model", "none")
KEYS: dict[str, Key] = {k.name: k for k in (
    Key("interval", "sensors", interval_s, 0.1),
    Key("fake_nvml", "sensors", text),
    Key("fake_gpus", "sensors", fake_gpus),
    Key("no_gpu", "sensors", boolean, False),
    Key("gpus", "sensors", text),
    Key("cpu", "sensors", _CPU, "auto"),
    Key("cpu_tdp", "sensors", positive_float),
    Key("powercap_root", "sensors", text, "/sys/class/powercap"),
    Key("job", "run", text),
    Key("labels", "run", labels, {}, flag="--label"),
    Key("records", "run", text, "wattmeter-records.jsonl"),
    Key("csv", "run", text),
    Key("checkpoint_interval", "run", positive_float, 30.0),
    Key("kill_grace", "run", positive_float, 10.0),
    Key("metrics_port", "export", port),
    Key("metrics_listen", "export", text, "127.0.0.1"),
    Key("pushgateway", "export", text),
    Key("push_interval", "export", positive_float, 15.0),
    Key("web_config", "export", text),
    Key("listen", "serve", text, "127.0.0.1:9445"),
    Key("pid_labels", "serve", boolean, False),
    Key("max_series", "serve", positive_int, 2000),
    Key("process_interval", "serve", positive_float, 1.0),
    Key("hostname", "serve", text),
    Key("sidecar", "serve", boolean, False),
    Key("server", "serve", text),
    Key("server_url", "serve", text),
    # serve's token options: declared here, parsed (with their own messages) in serve_tokens.py
    Key("model", "serve", text),
    Key("jpt_window", "serve", text),
    Key("idle_power", "serve", text),
    Key("gpu_model_map", "serve", lambda v: v),   # text or a TOML table
    Key("drop_model_after", "serve", text),
    Key("proxy_to", "serve", text),
    Key("proxy_listen", "serve", text),
    Key("requests_log", "serve", text),
    Key("zone", "carbon", text),
    Key("cloud", "carbon", text),
    Key("pue", "carbon", finite_float),
    Key("renewable_share", "carbon", finite_float),
    Key("embodied_kg_per_gpu", "carbon", finite_float),
    Key("service_life_years", "carbon", finite_float, 4.0),
    Key("wue", "carbon", finite_float, file_aliases=("wue_l_per_kwh",)),
    Key("carbon_provider", "carbon", text, "table", file_aliases=("provider",)),
    Key("carbon_provider_url", "carbon", text, file_aliases=("provider_url",)),
    Key("carbon_ttl", "carbon", finite_float, 600.0, file_aliases=("ttl_s",)),
    Key("carbon_timeout", "carbon", finite_float, 2.0, file_aliases=("timeout_s",)),
    Key("carbon_token_file", "carbon", text),
)}
SUBTABLES = ("carbon",)     # [tool.wattmeter.carbon]: carbon keys only


def register(key: Key) -> None:
    """For a command that adds its own config key (declare it once, here or at import)."""
    KEYS.setdefault(key.name, key)


def _file_names(key: Key) -> tuple[str, ...]:
    return (key.name, key.name.replace("_", "-"), *key.file_aliases)


def _known(group: str | None = None) -> dict[str, Key]:
    return {n: k for k in KEYS.values() if group is None or k.group == group for n in _file_names(k)}


def check_table(table: Mapping[str, Any], where: str) -> None:
    """Unknown keys and values of the wrong type, with the closest good key (one line each)."""
    for scope, part in [(None, table)] + [(s, table[s]) for s in SUBTABLES if s in table]:
        if scope is not None and not isinstance(part, Mapping):
            raise ConfigError(f"{where}: '{scope}' must be a table ([tool.wattmeter.{scope}]), "
                              f"not {type(part).__name__}")
        known = _known(scope)
        for name, value in part.items():
            if scope is None and name in SUBTABLES:
                continue
            key = known.get(name)
            label = f"{scope}.{name}" if scope else name
            if key is None:
                close = difflib.get_close_matches(name, list(known) + ([] if scope else list(SUBTABLES)), 1, 0.6)
                hint = f"did you mean '{close[0]}'?" if close else "see 'wattmeter config' for the keys"
                raise ConfigError(f"{where}: unknown key {label!r}; {hint}")   # repr: a key with a newline stays one line
            try:
                key.parse(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}: key {label!r} = {value!r}: {exc}") from None


def load_file_config(cwd: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], str | None]:
    """The ``[tool.wattmeter]`` table of ./wattmeter.toml (whole file) or ./pyproject.toml, checked."""
    here = Path(cwd or os.getcwd())
    for name, table in (("wattmeter.toml", None), ("pyproject.toml", ("tool", "wattmeter"))):
        path = here / name
        if not path.is_file():
            continue
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot be read ({exc.strerror or exc})") from None
        try:
            data: Any = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc}); fix or remove it") from None
        if table:
            tool = data.get("tool", {})
            if not isinstance(tool, dict) or "wattmeter" not in tool:
                continue
            data = tool["wattmeter"]
            if not isinstance(data, dict):
                raise ConfigError(f"config file {path}: 'tool.wattmeter' must be a table ([tool.wattmeter]), "
                                  f"not {type(data).__name__}")
        elif "wattmeter" in data and isinstance(data["wattmeter"], dict):
            data = data["wattmeter"]
        check_table(data, str(path))
        return dict(data), str(path)
    return {}, None


# -- the precedence engine --------------------------------------------------------------------
def lookup(flag_value: Any, env_names: tuple[str, ...], file_keys: tuple[str, ...],
           env: Mapping[str, str], file: Mapping[str, Any]) -> tuple[Any, str, str] | None:
    """(raw value, source, env or file key that held it) by precedence, or None when unset.

    Blank environment variables count as unset (``WATTMETER_ZONE=`` in a shell script).
    """
    if flag_value is not None:
        return flag_value, FLAG, ""
    for name in env_names:
        if str(env.get(name, "")).strip():
            return env[name].strip(), ENV, name
    for key in file_keys:
        if file.get(key) is not None:
            return file[key], FILE, key
    return None


class Settings:
    """Looks a setting up by precedence. ``flag`` is the argparse value (None when not given).

    Remembers where each value it resolved came from (``origins``) for messages and for
    ``wattmeter config``.
    """

    def __init__(self, env: Mapping[str, str] | None = None, file_config: Mapping[str, Any] | None = None,
                 file_name: str | None = None, *, api: bool = False) -> None:
        self.env = os.environ if env is None else env
        self.file = dict(file_config or {})
        self.file_name = file_name or "config file"
        self.api = api              # "flags" are the Python API's keyword arguments
        self.origins: dict[str, str] = {}
        # sub-table keys are looked up as "carbon.zone"
        self._flat = dict(self.file)
        for sub in SUBTABLES:
            if isinstance(self.file.get(sub), Mapping):
                self._flat.update({f"{sub}.{k}": v for k, v in self.file[sub].items()})

    def source(self, name: str, flag: Any = None) -> str:
        """FLAG, ENV, FILE or DEFAULT: where ``name`` would come from."""
        found = lookup(flag, ("WATTMETER_" + name.upper(),), self._file_keys(name), self.env, self._flat)
        return found[1] if found else DEFAULT

    def option(self, name: str, flag_name: str | None = None) -> str:
        """How the caller spelt the setting: ``--records`` on the command line, ``records=`` in Python."""
        if self.api:
            return f"{name}="
        return flag_name or (KEYS[name].option if name in KEYS else "--" + name.replace("_", "-"))

    def given(self, name: str, value: Any) -> str:
        """A flag and its value, as messages show it: ``--records x.jsonl`` / ``records='x.jsonl'``."""
        return f"{name}={value!r}" if self.api else f"{self.option(name)} {value}"

    def error(self, message: str) -> ConfigError:
        """The error for a bad value: a SettingValueError (also a ValueError) for the Python API."""
        return SettingValueError(message) if self.api else ConfigError(message)

    def get(self, name: str, flag: Any, default: T, parse: Callable[[Any], T] = lambda v: v,
            flag_name: str | None = None) -> T:
        """name is the snake_case key; env is WATTMETER_<NAME>; file key is name or kebab-case."""
        env_name = "WATTMETER_" + name.upper()
        found = lookup(flag, (env_name,), self._file_keys(name), self.env, self._flat)
        if found is None:
            self.origins[name] = DEFAULT
            return default
        raw, src, held = found
        where = {FLAG: self.option(name, flag_name), ENV: env_name, FILE: f"{self.file_name} key '{held}'"}[src]
        self.origins[name] = f"{src} {where}"
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            shown = f"{name}={raw!r}" if src == FLAG and self.api else f"{where} {raw!r}"
            raise self.error(f"{shown}: {exc}") from None

    def key(self, name: str, flags: Mapping[str, Any], default: Any = None) -> Any:
        """A declared key (:data:`KEYS`) by precedence, parsed with its own parser; ``flags`` holds
        the command's flag values by key name (None: not given). ``default`` overrides the key's."""
        k = KEYS[name]
        return self.get(name, flags.get(name), k.default if default is None else default, k.parse)

    def _file_keys(self, name: str) -> tuple[str, ...]:
        key = KEYS.get(name)
        names = _file_names(key) if key else (name, name.replace("_", "-"))
        if key is not None and key.group in SUBTABLES:
            # [tool.wattmeter.carbon] wins over top-level keys
            return tuple(f"{key.group}.{n}" for n in names) + names
        return names

    def effective(self, args: Any = None) -> list[tuple[str, str, Any, str]]:
        """(group, key, value, origin) for every declared key: what ``wattmeter config`` prints."""
        view = Settings(self.env, self.file, self.file_name)
        flags = flags_of(args) if args is not None else {}
        rows = []
        for key in KEYS.values():
            value = view.get(key.name, flags.get(key.name), key.default, key.parse)
            origin = view.origins[key.name]
            rows.append((key.group, key.name, value, origin))
        return rows


def flags_of(args: Any) -> dict[str, Any]:
    """The flag values an argparse namespace holds, by settings key; a command without a flag
    for a key (``config`` has no --records) leaves it None, i.e. not given."""
    given = vars(args)
    return {k.name: given.get(k.dest) for k in KEYS.values()}


def by_precedence(*sources: str) -> int:
    """Index of the strongest source; for two settings that exclude each other."""
    return max(range(len(sources)), key=lambda i: _RANK[sources[i]])


def source_rank(source: str) -> int:
    return _RANK[source]
