"""Typed settings of the command groups `run`, `serve` and the Python API read, each built once
from the one engine (:class:`wattmeter.config.Settings`: flags or keyword arguments >
``WATTMETER_*`` > config file > defaults) and validated once, before anything starts. A bad value
is a one-line error naming it and the fix: a ``ConfigError``/``UsageError`` (exit 2) from the CLI,
a :class:`~wattmeter.config.SettingValueError` (a ``ValueError``) from Python.

``SensorSettings`` (``commands.common``) and ``CarbonConfig`` (``carbon.config``) are the other
two groups; :mod:`wattmeter.compose` builds the meter, sinks and carbon feed from all of them.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from .config import KEYS, SettingValueError, Settings
from .errors import ConfigError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .attribution import AttributionConfig
    from .carbon.config import CarbonConfig
    from .commands.serve_tokens import TokenOptions
    from .exporters.http import ListenAddress
    from .exporters.webconfig import WebConfig

DEFAULT_RECORDS = KEYS["records"].default      # `run`'s records file ("wattmeter-records.jsonl")


def check_writable_or_fail(settings: Settings, name: str, path: str | None) -> None:
    """An output path is writable, else a one-line error naming its own flag or argument."""
    if not path:
        return
    from .exporters.records import check_writable

    try:
        check_writable(path)
    except OSError as exc:
        raise settings.error(f"{settings.given(name, path)}: cannot write ({exc.strerror or exc}); "
                             f"pass {settings.option(name)} with a writable file") from None


@dataclass(frozen=True)
class RecordSettings:
    """Where a run's (or a Python window's) records go, and what they carry: the ``run`` group."""

    records: str | None = DEFAULT_RECORDS      # JSONL path; None: no JSONL (the Python API without records=)
    csv: str | None = None
    job: str | None = None                     # None: the command's (or the window's) name
    labels: Mapping[str, str] = field(default_factory=dict)
    checkpoint_interval_s: float = 30.0
    kill_grace_s: float = 10.0

    @classmethod
    def resolve(cls, settings: Settings, flags: Mapping[str, Any], *, default_job: str | None = None,
                default_records: str | None = DEFAULT_RECORDS) -> "RecordSettings":
        """Every output path is checked writable here, naming its own flag (--csv, not --records)."""
        job = settings.get("job", flags.get("job"), default_job, KEYS["job"].parse)
        out = cls(job=job, labels=settings.key("labels", flags),
                  records=settings.get("records", flags.get("records"), default_records, KEYS["records"].parse),
                  csv=settings.key("csv", flags),
                  checkpoint_interval_s=settings.key("checkpoint_interval", flags),
                  kill_grace_s=settings.key("kill_grace", flags))
        for name in ("records", "csv"):
            check_writable_or_fail(settings, name, getattr(out, name))
        return out


@dataclass(frozen=True)
class ExportSettings:
    """A run's metrics export (``export`` group): a scrape port and/or Pushgateway pushes,
    parsed and checked (URL, address, web-config) before anything binds or pushes."""

    address: "ListenAddress | None" = None     # --metrics-port on --metrics-listen
    web: "WebConfig | None" = None             # --web-config (TLS / basic auth) for that port
    pushgateway: str | None = None
    push_interval_s: float = 15.0

    @property
    def wanted(self) -> bool:
        return self.address is not None or self.pushgateway is not None

    @classmethod
    def resolve(cls, settings: Settings, flags: Mapping[str, Any]) -> "ExportSettings":
        port = settings.key("metrics_port", flags)
        gateway = settings.key("pushgateway", flags)
        if port is None and gateway is None:
            return cls()
        from .exporters.http import parse_listen
        from .exporters.pushgateway import validate_gateway_url
        from .exporters.webconfig import load_web_config

        interval = settings.key("push_interval", flags)
        host = settings.key("metrics_listen", flags)
        web_path = settings.key("web_config", flags)
        if gateway is not None:
            validate_gateway_url(gateway)
        address = parse_listen(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "--metrics-listen") \
            if port is not None else None
        return cls(address=address, web=load_web_config(web_path) if web_path else None, pushgateway=gateway,
                   push_interval_s=interval)


@dataclass(frozen=True)
class ServeSettings:
    """Every setting of `serve` (``serve`` group, tokens included), parsed and checked before
    any thread or socket starts."""

    address: "ListenAddress"
    web: "WebConfig | None"
    attribution: "AttributionConfig"
    process_interval_s: float
    hostname: str
    proc_root: str = "/proc"
    pods_root: str = "/var/log/pods"
    sidecar: bool = False
    tokens: "TokenOptions | None" = None

    @classmethod
    def resolve(cls, settings: Settings, flags: Mapping[str, Any], *, proc_root: str | None = None,
                pods_root: str | None = None) -> "ServeSettings":
        from .attribution import AttributionConfig
        from .commands.serve_tokens import token_options
        from .exporters.http import parse_listen
        from .exporters.webconfig import load_web_config

        web_path = settings.key("web_config", flags)
        return cls(
            address=parse_listen(settings.key("listen", flags)),
            web=load_web_config(web_path) if web_path else None,
            attribution=AttributionConfig(pid_labels=settings.key("pid_labels", flags),
                                          max_series=settings.key("max_series", flags)),
            process_interval_s=settings.key("process_interval", flags),
            hostname=settings.get("hostname", flags.get("hostname"),
                                  os.environ.get("NODE_NAME") or socket.gethostname(), KEYS["hostname"].parse),
            proc_root=proc_root or "/proc", pods_root=pods_root or "/var/log/pods",
            sidecar=settings.key("sidecar", flags),
            tokens=token_options(settings, flags))


def carbon_settings(settings: Settings, args: Any = None) -> "CarbonConfig | None":
    """The ``carbon`` group (zone, PUE, provider...), validated; None in a build without it."""
    try:
        from .carbon.config import CarbonConfig
    except ImportError:
        return None
    return CarbonConfig.from_args(args, env=settings.env, file_config=settings.file)


# -- the Python API ---------------------------------------------------------------------------
CARBON_KWARGS = ("zone", "cloud", "pue")


@dataclass(frozen=True)
class ApiSettings:
    """The settings ``run`` has, as ``Meter(...)`` / ``measure(...)`` keyword arguments.

    ``records`` and ``csv`` come from the keyword arguments only: a library call never starts
    writing files because a variable meant for ``run`` (``WATTMETER_RECORDS``) is set. The carbon
    keys go through the whole engine (``zone=`` > ``WATTMETER_ZONE`` > config file > default),
    as in ``run``.
    """

    records: RecordSettings | None = None      # None: no records
    carbon: "CarbonConfig | None" = None

    @classmethod
    def resolve(cls, *, records: str | os.PathLike[str] | None = None, csv: str | os.PathLike[str] | None = None,
                zone: str | None = None, cloud: str | None = None, pue: float | None = None,
                env: Mapping[str, str] | None = None, cwd: str | None = None) -> "ApiSettings":
        from .config import load_file_config

        given = {"records": None if records is None else os.fspath(records),
                 "csv": None if csv is None else os.fspath(csv)}
        kwargs = Settings(env={}, file_config={}, api=True)     # records/csv: keyword arguments only
        rec = None
        if given["records"] is not None or given["csv"] is not None:
            rec = RecordSettings.resolve(kwargs, given, default_records=None)
        try:
            cfg, name = load_file_config(cwd)
        except ConfigError as exc:     # a broken ./pyproject.toml: a ValueError here too
            raise SettingValueError(str(exc)) from None
        engine = Settings(env=env, file_config=cfg, file_name=name, api=True)
        return cls(records=rec, carbon=api_carbon(engine, zone=zone, cloud=cloud, pue=pue))


def api_carbon(settings: Settings, **given: Any) -> "CarbonConfig | None":
    """``CarbonConfig`` from keyword arguments over env/file, with the CLI's checks and messages
    naming the argument (``pue=0.5 is below 1; ...``)."""
    from dataclasses import replace

    values: dict[str, Any] = {}
    for name, value in given.items():
        if value is not None:
            values[name] = settings.get(name, value, None, KEYS[name].parse)
    # env and file, less what the keyword arguments override (a WATTMETER_PUE that pue= replaces
    # is never checked), validated like `run`'s
    env = {k: v for k, v in settings.env.items() if k not in {KEYS[n].env for n in values}}
    file = {k: v for k, v in settings.file.items() if k not in values}
    if isinstance(file.get("carbon"), Mapping):
        file["carbon"] = {k: v for k, v in file["carbon"].items() if k not in values}
    try:
        base = carbon_settings(Settings(env=env, file_config=file, file_name=settings.file_name))
        if base is None or not values:
            return base
        origins = {**base.origins, **{name: f"{name}={value!r}" for name, value in values.items()}}
        return replace(base, **values, origins=origins).validate()
    except UsageError as exc:
        raise settings.error(str(exc)) from None
