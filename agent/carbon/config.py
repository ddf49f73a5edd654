"""Carbon settings (the ``carbon`` group of the one settings engine in ``wattmeter.config``):
flags > ``WATTMETER_*`` environment > config file > defaults.

The Electricity Maps token comes only from ``WATTMETER_ELECTRICITYMAPS_TOKEN`` or a token file
(a flag value would show in ``ps``); it is kept out of ``repr``, logs and records.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from ..config import ENV, FLAG, lookup
from ..errors import ConfigError, UsageError
from .intensity import (ElectricityMapsSource, FallbackSource, IntensitySource, TableSource,
                        UKCarbonIntensitySource)
from .tables import ZoneInfo, provider_pue
from .zones import resolve, suggest, world

PROVIDERS = ("table", "electricitymaps", "ukgrid")
TOKEN_ENV = "WATTMETER_ELECTRICITYMAPS_TOKEN"
EMBODIED_KG_PER_A100_CLASS_GPU = 150.0   # BLOOM paper / Boavizta; documented, never a default


@dataclass(frozen=True)
class _Field:
    name: str            # CarbonConfig attribute
    flag: str            # command-line flag
    dest: str            # argparse dest
    env: str             # environment variable
    keys: tuple[str, ...]  # config-file keys ([tool.wattmeter] or wattmeter.toml)
    kind: type           # float or str


_FIELDS = (
    _Field("zone", "--zone", "zone", "WATTMETER_ZONE", ("zone",), str),
    _Field("cloud", "--cloud", "cloud", "WATTMETER_CLOUD", ("cloud",), str),
    _Field("pue", "--pue", "pue", "WATTMETER_PUE", ("pue",), float),
    _Field("renewable_share", "--renewable-share", "renewable_share", "WATTMETER_RENEWABLE_SHARE",
           ("renewable_share",), float),
    _Field("embodied_kg_per_gpu", "--embodied-kg-per-gpu", "embodied_kg_per_gpu",
           "WATTMETER_EMBODIED_KG_PER_GPU", ("embodied_kg_per_gpu",), float),
    _Field("service_life_years", "--service-life-years", "service_life_years",
           "WATTMETER_SERVICE_LIFE_YEARS", ("service_life_years",), float),
    _Field("wue_l_per_kwh", "--wue", "wue", "WATTMETER_WUE", ("wue", "wue_l_per_kwh"), float),
    _Field("provider", "--carbon-provider", "carbon_provider", "WATTMETER_CARBON_PROVIDER",
           ("carbon_provider", "provider"), str),
    _Field("provider_url", "--carbon-provider-url", "carbon_provider_url", "WATTMETER_CARBON_PROVIDER_URL",
           ("carbon_provider_url", "provider_url"), str),
    _Field("ttl_s", "--carbon-ttl", "carbon_ttl", "WATTMETER_CARBON_TTL", ("carbon_ttl", "ttl_s"), float),
    _Field("timeout_s", "--carbon-timeout", "carbon_timeout", "WATTMETER_CARBON_TIMEOUT",
           ("carbon_timeout", "timeout_s"), float),
)
_TOKEN_FILE = _Field("token_file", "--carbon-token-file", "carbon_token_file", "WATTMETER_CARBON_TOKEN_FILE",
                     ("carbon_token_file",), str)


@dataclass(frozen=True)
class CarbonConfig:
    zone: str | None = None
    cloud: str | None = None                  # "aws:us-east-1"; sets the default PUE and zone
    pue: float | None = None                  # None: the cloud provider's default, else 1.0
    renewable_share: float | None = None      # market-based scope when set
    embodied_kg_per_gpu: float | None = None  # embodied scope when set (150 kg: BLOOM/Boavizta)
    service_life_years: float = 4.0
    wue_l_per_kwh: float | None = None        # water scope when set (industry average ~1.8)
    provider: str = "table"                   # table | electricitymaps | ukgrid
    provider_token: str | None = field(default=None, repr=False)
    provider_url: str | None = None
    ttl_s: float = 600.0
    timeout_s: float = 2.0
    origins: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False, hash=False)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None,
                  file_config: Mapping[str, Any] | None = None) -> "CarbonConfig":
        """Merge flags, environment and a config-file table, then :meth:`validate`.

        ``file_config`` is the ``[tool.wattmeter]`` / ``wattmeter.toml`` table; a ``carbon``
        sub-table, when present, is read too and wins over top-level keys.
        """
        env = os.environ if env is None else env
        merged: dict[str, Any] = dict(file_config or {})
        if isinstance(merged.get("carbon"), Mapping):
            merged.update(merged["carbon"])
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for spec in _FIELDS + (_TOKEN_FILE,):
            got = _lookup(spec, args, env, merged)
            if got is not None:
                values[spec.name], origins[spec.name] = got
        token_file = values.pop("token_file", None)
        token = None
        if origins.get("token_file", "").startswith("--") and token_file:
            token = _read_token(token_file, origins["token_file"])
        elif env.get(TOKEN_ENV):
            token = env[TOKEN_ENV].strip()
        elif token_file:
            token = _read_token(token_file, origins["token_file"])
        config = cls(**values, provider_token=token or None, origins=origins)
        return config.validate()

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to print or export: the token is reduced to whether one is set."""
        out = {f.name: getattr(self, f.name) for f in _FIELDS}
        out["provider_token"] = "set" if self.provider_token else None
        return out

    # -- checks ----------------------------------------------------------------------------
    def _origin(self, name: str, flag: str) -> str:
        return self.origins.get(name) or f"{flag} {getattr(self, name)}"

    def validate(self) -> "CarbonConfig":
        """Raise :class:`UsageError` (one line, naming the value and the fix) on bad settings."""
        if self.pue is not None and not self.pue >= 1.0:
            raise UsageError(f"{self._origin('pue', '--pue')} is below 1; PUE is facility energy / IT energy, "
                             "so it is at least 1.0 (cloud defaults: AWS 1.135, GCP 1.1, Azure 1.185)")
        if self.renewable_share is not None and not 0.0 <= self.renewable_share <= 1.0:
            raise UsageError(f"{self._origin('renewable_share', '--renewable-share')} is outside [0, 1]; "
                             "give the renewable share as a fraction, e.g. 0.4 for 40%")
        for name, flag, fix in (("embodied_kg_per_gpu", "--embodied-kg-per-gpu", "e.g. 150 for an A100-class GPU"),
                                ("wue_l_per_kwh", "--wue", "litres per kWh, e.g. 1.8"),
                                ("ttl_s", "--carbon-ttl", "seconds, e.g. 600")):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise UsageError(f"{self._origin(name, flag)} is negative; give {fix}")
        for name, flag, fix in (("service_life_years", "--service-life-years", "years, e.g. 4"),
                                ("timeout_s", "--carbon-timeout", "seconds, e.g. 2")):
            if not getattr(self, name) > 0:
                raise UsageError(f"{self._origin(name, flag)} must be above 0; give {fix}")
        if self.provider not in PROVIDERS:
            close = suggest(self.provider, PROVIDERS) or list(PROVIDERS)
            raise UsageError(f"{self._origin('provider', '--carbon-provider')}: unknown carbon provider; "
                             f"choose {', '.join(PROVIDERS)} (closest: {close[0]})")
        if self.provider_url and not self.provider_url.startswith(("http://", "https://")):
            raise UsageError(f"{self._origin('provider_url', '--carbon-provider-url')} must start with "
                             "http:// or https://")
        if self.provider == "electricitymaps" and not self.provider_token:
            raise UsageError(f"--carbon-provider electricitymaps needs an API token: set {TOKEN_ENV} "
                             "or pass --carbon-token-file PATH")
        zone = self.zone_info()   # raises on an unknown zone or cloud region, with suggestions
        if self.provider == "ukgrid" and zone.country != "GB":
            raise UsageError(f"--carbon-provider ukgrid covers Great Britain only, but the zone is {zone.key}; "
                             "use --zone GB or --carbon-provider table")
        return self

    # -- derived values ----------------------------------------------------------------------
    def zone_info(self) -> ZoneInfo:
        """The zone whose intensity applies; the world average (labelled so) when none is set."""
        zone_spec = self.zone or ("GB" if self.provider == "ukgrid" and not self.cloud else None)
        try:
            found = resolve(zone_spec, self.cloud, allow_subzone=self.provider == "electricitymaps")
        except UsageError as exc:
            name = "zone" if zone_spec else "cloud"
            origin = self.origins.get(name, "")
            raise UsageError(f"{origin}: {exc}" if origin and not origin.startswith("--") else str(exc)) from None
        return found if found is not None else replace(world(), dataset="world-default")

    def effective_pue(self) -> float:
        if self.pue is not None:
            return self.pue
        if self.cloud:
            return provider_pue(self.cloud.split(":", 1)[0].strip().lower())
        zone = self.zone_info()
        return zone.default_pue if zone.default_pue is not None else 1.0

    def build_source(self, clock: Callable[[], float] | None = None) -> IntensitySource:
        """The intensity source these settings ask for; live ones wrapped with the table fallback."""
        zone = self.zone_info()
        table = TableSource(zone)
        extra = {"clock": clock} if clock is not None else {}
        if self.provider == "electricitymaps":
            assert self.provider_token  # validate() guarantees it
            live: IntensitySource = ElectricityMapsSource(
                zone.key if zone.kind != "cloud" else zone.country, self.provider_token,
                self.provider_url or "https://api.electricitymaps.com", self.ttl_s, self.timeout_s, **extra)
        elif self.provider == "ukgrid":
            live = UKCarbonIntensitySource(self.provider_url or "https://api.carbonintensity.org.uk",
                                           self.ttl_s, self.timeout_s, **extra)
        else:
            return table
        return FallbackSource(live, table, self.timeout_s, retry_s=max(self.ttl_s / 10.0, 30.0), **extra)


def _lookup(spec: _Field, args: argparse.Namespace | None, env: Mapping[str, str],
            merged: Mapping[str, Any]) -> tuple[Any, str] | None:
    """The shared precedence engine (:func:`wattmeter.config.lookup`), with carbon's origin texts."""
    found = lookup(getattr(args, spec.dest, None) if args is not None else None, (spec.env,), spec.keys,
                   env, merged)
    if found is None:
        return None
    raw, source, held = found
    origin = {FLAG: f"{spec.flag} {raw}", ENV: f"{spec.env}={raw}"}.get(source, f"config {held} = {raw!r}")
    return _parse(spec, raw, origin), origin


def _parse(spec: _Field, raw: Any, origin: str) -> Any:
    if spec.kind is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{origin}: expected text, e.g. {spec.flag} FR")
        return raw.strip()
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin} is not a number; give a value such as 1.2") from None
    if not math.isfinite(value):
        raise ConfigError(f"{origin} is not a finite number")
    return value


def _read_token(path: str, origin: str) -> str:
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"{origin}: cannot read the token file ({exc.strerror or exc})") from None
    if not token:
        raise UsageError(f"{origin}: the token file is empty")
    return token


def add_carbon_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the carbon flags (all default to None so that env and config can fill them)."""
    g = parser.add_argument_group("carbon", "zone, PUE and optional scopes (see docs/carbon.md)")
    g.add_argument("--zone", metavar="ZONE",
                   help="grid zone: country (FR), US state (US-CA), eGRID subregion (CAMX); env WATTMETER_ZONE")
    g.add_argument("--cloud", metavar="PROVIDER:REGION",
                   help="cloud region, e.g. aws:us-east-1, gcp:europe-west1, azure:westeurope; sets the PUE")
    g.add_argument("--pue", type=float, metavar="X", help="power usage effectiveness, >= 1 (default: cloud's, else 1.0)")
    g.add_argument("--renewable-share", type=float, metavar="F",
                   help="contracted renewable share 0..1: adds a market-based scope")
    g.add_argument("--embodied-kg-per-gpu", type=float, metavar="KG",
                   help="manufacturing kg CO2e per GPU (150 for A100-class, BLOOM/Boavizta): adds an embodied scope")
    g.add_argument("--service-life-years", type=float, metavar="Y", help="amortisation period for embodied (default 4)")
    g.add_argument("--wue", type=float, metavar="L_PER_KWH", help="water usage effectiveness: adds water in litres")
    g.add_argument("--carbon-provider", metavar="NAME",
                   help="table (default), electricitymaps (needs a token) or ukgrid (GB, no key)")
    g.add_argument("--carbon-provider-url", metavar="URL", help="override the provider's base URL")
    g.add_argument("--carbon-ttl", type=float, metavar="S", help="seconds to cache a live intensity (default 600)")
    g.add_argument("--carbon-timeout", type=float, metavar="S", help="live provider timeout in seconds (default 2)")
    g.add_argument("--carbon-token-file", metavar="PATH",
                   help=f"file holding the Electricity Maps token (or set {TOKEN_ENV})")
