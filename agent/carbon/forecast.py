"""When to run: grid-intensity forecasts and the start time that minimises a job's CO2e.

Providers:
- UK Carbon Intensity API (National Grid ESO): ``GET /intensity/{from}/fw48h``, half-hour slots
  for 48 h, no key, Great Britain only.
- Electricity Maps: ``GET /v3/carbon-intensity/forecast?zone=Z`` with header ``auth-token``,
  hourly points, where the token's plan allows.

Each source caches its forecast for ``ttl_s`` and bounds every request with ``timeout_s``.
A provider that cannot be reached (timeout, network, HTTP 5xx) is :class:`ForecastUnreachable`:
the caller says so in one line and starts now. A provider that answers without a forecast
(empty data, HTTP 4xx, a shape we cannot read) is :class:`NoForecast`, a usage error (exit 2).

The job draws constant power, so its CO2e is kWh x PUE x the mean intensity over
``[start, start + duration]``; the best start minimises that mean. Candidates are now and every
slot start inside the window whose job span the forecast fully covers.
"""
from __future__ import annotations

import datetime as _dt
import http.client
import json
import math
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TextIO

from ..clock import Clock
from ..errors import UsageError
from .intensity import ProviderError

UNREACHABLE = ("timeout", "network")      # plus any http_5xx
RECHECK_S = 900.0                         # re-read the forecast every 15 min while waiting


class ForecastUnreachable(Exception):
    """No answer from the provider: the job starts now."""

    def __init__(self, provider: str, kind: str) -> None:
        super().__init__(f"{provider}: {kind}")
        self.provider, self.kind = provider, kind


class NoForecast(UsageError):
    """The provider answered but has no forecast for this zone."""


# -- durations -------------------------------------------------------------------------------
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)([smhdw]))+$")


def parse_duration(text: str, flag: str) -> float:
    """``24h``, ``90m``, ``1h30m``, ``7d``, ``3600s`` or bare seconds, as seconds > 0."""
    raw = str(text).strip().lower()
    total = 0.0
    try:
        total = float(raw)
    except ValueError:
        if not _DURATION.match(raw):
            raise UsageError(f"{flag} {text!r} is not a duration; use e.g. 90m, 24h, 7d or 1h30m") from None
        total = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", raw))
    if not total > 0:
        raise UsageError(f"{flag} {text!r} must be above 0; use e.g. 90m, 24h or 7d")
    return total


# -- HTTP ---------------------------------------------------------------------------------------
_MAX_BODY_BYTES = 4 << 20     # a 48 h forecast is ~20 KiB; refuse to buffer junk


def _get_json(url: str, headers: dict[str, str], timeout_s: float) -> Any:
    """GET a JSON body; every failure becomes a ProviderError with a short kind."""
    from .. import __version__

    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": f"wattmeter/{__version__}", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (http(s) URLs)
            body = response.read(_MAX_BODY_BYTES)
    except urllib.error.HTTPError as exc:
        raise ProviderError(f"http_{exc.code}") from None
    except urllib.error.URLError as exc:
        raise ProviderError("timeout" if isinstance(exc.reason, (TimeoutError, socket.timeout)) else "network") \
            from None
    except (TimeoutError, socket.timeout):
        raise ProviderError("timeout") from None
    except (OSError, http.client.HTTPException):
        raise ProviderError("network") from None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProviderError("bad_json") from None


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ProviderError("bad_shape")
    return float(value)


# -- forecasts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    start_unix: float
    end_unix: float
    g_per_kwh: float


@dataclass(frozen=True)
class Forecast:
    provider: str
    zone: str
    slots: tuple[Slot, ...]            # sorted, contiguous

    @property
    def end_unix(self) -> float:
        return self.slots[-1].end_unix

    def mean_g_per_kwh(self, start_unix: float, end_unix: float) -> float:
        """Time-weighted mean intensity over [start, end]; the first slot stands for any gap before it."""
        if end_unix <= start_unix:
            return self.at(start_unix)
        first = self.slots[0]
        total = weight = 0.0
        for slot in self.slots:
            lo = max(start_unix, slot.start_unix if slot is not first else min(slot.start_unix, start_unix))
            hi = min(end_unix, slot.end_unix)
            if hi > lo:
                total += slot.g_per_kwh * (hi - lo)
                weight += hi - lo
        return total / weight if weight > 0 else self.at(start_unix)

    def at(self, t_unix: float) -> float:
        for slot in self.slots:
            if t_unix < slot.end_unix:
                return slot.g_per_kwh
        return self.slots[-1].g_per_kwh


class ForecastSource(Protocol):
    name: str

    def forecast(self, now_unix: float) -> Forecast:
        """The forecast from ``now_unix`` on. Raises ForecastUnreachable or NoForecast."""


def _iso(t_unix: float) -> str:
    return _dt.datetime.fromtimestamp(t_unix, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def _parse_time(text: Any, provider: str) -> float:
    if not isinstance(text, str):
        raise ProviderError("bad_shape")
    value = text.strip().replace("Z", "+00:00")
    try:
        parsed = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ProviderError("bad_shape") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.timestamp()


class _CachedForecast:
    """TTL cache and error translation shared by the two providers."""

    name = "forecast"

    def __init__(self, zone: str, ttl_s: float, timeout_s: float, clock: Callable[[], float]) -> None:
        self.zone, self.ttl_s, self.timeout_s = zone, ttl_s, timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, Forecast] | None = None
        self.requests = 0

    def forecast(self, now_unix: float) -> Forecast:
        with self._lock:
            if self._cached and self._clock() - self._cached[0] < self.ttl_s:
                return self._cached[1]
        self.requests += 1
        try:
            slots = self._fetch(now_unix)
        except ProviderError as exc:
            if exc.kind in UNREACHABLE or exc.kind.startswith("http_5"):
                raise ForecastUnreachable(self.name, exc.kind) from None
            raise NoForecast(f"carbon provider {self.name} gave no forecast for zone {self.zone} ({exc.kind}); "
                             "check the zone and token, or drop --start-window / --wait-for-clean") from None
        if not slots:
            raise NoForecast(f"carbon provider {self.name} has no forecast for zone {self.zone} (empty answer); "
                             "choose another --carbon-provider or drop --start-window / --wait-for-clean")
        result = Forecast(self.name, self.zone, tuple(sorted(slots, key=lambda s: s.start_unix)))
        with self._lock:
            self._cached = (self._clock(), result)
        return result

    def _fetch(self, now_unix: float) -> list[Slot]:
        raise NotImplementedError


class UKForecastSource(_CachedForecast):
    """``GET /intensity/{from}/fw48h``: half-hour slots with ``intensity.forecast``."""

    name = "ukgrid"

    def __init__(self, base_url: str = "https://api.carbonintensity.org.uk", ttl_s: float = 600.0,
                 timeout_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__("GB", ttl_s, timeout_s, clock)
        self.base_url = base_url.rstrip("/")

    def _fetch(self, now_unix: float) -> list[Slot]:
        data = _get_json(f"{self.base_url}/intensity/{_iso(now_unix)}/fw48h", {}, self.timeout_s)
        rows = data.get("data") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise ProviderError("bad_shape")
        slots = []
        for row in rows:
            try:
                g = _number(row["intensity"]["forecast"])
                slots.append(Slot(_parse_time(row["from"], self.name), _parse_time(row["to"], self.name), g))
            except (KeyError, TypeError):
                raise ProviderError("bad_shape") from None
        return slots


class ElectricityMapsForecastSource(_CachedForecast):
    """``GET /v3/carbon-intensity/forecast?zone=Z``: hourly ``forecast[].carbonIntensity``."""

    name = "electricitymaps"

    def __init__(self, zone: str, token: str, base_url: str = "https://api.electricitymaps.com",
                 ttl_s: float = 600.0, timeout_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(zone, ttl_s, timeout_s, clock)
        self._token = token
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:   # the token stays out of logs
        return f"ElectricityMapsForecastSource(zone={self.zone!r}, token=***)"

    def _fetch(self, now_unix: float) -> list[Slot]:
        url = f"{self.base_url}/v3/carbon-intensity/forecast?" + urllib.parse.urlencode({"zone": self.zone})
        data = _get_json(url, {"auth-token": self._token}, self.timeout_s)
        points = data.get("forecast") if isinstance(data, dict) else None
        if not isinstance(points, list):
            raise ProviderError("bad_shape")
        try:
            parsed = sorted((_parse_time(p["datetime"], self.name), _number(p["carbonIntensity"])) for p in points)
        except (KeyError, TypeError):
            raise ProviderError("bad_shape") from None
        slots = []
        for i, (t, g) in enumerate(parsed):
            # Each point holds until the next; the last holds for the spacing before it (1 h default).
            end = parsed[i + 1][0] if i + 1 < len(parsed) else t + (t - parsed[i - 1][0] if i else 3600.0)
            slots.append(Slot(t, end, g))
        return slots


def forecast_source_for(config: Any, clock: Callable[[], float] = time.monotonic) -> ForecastSource:
    """The forecast source a CarbonConfig asks for; the offline table has no forecast."""
    if config.provider == "ukgrid":
        return UKForecastSource(config.provider_url or "https://api.carbonintensity.org.uk",
                                config.ttl_s, config.timeout_s, clock)
    if config.provider == "electricitymaps":
        zone = config.zone_info()
        return ElectricityMapsForecastSource(zone.key if zone.kind != "cloud" else zone.country,
                                             config.provider_token, config.provider_url or
                                             "https://api.electricitymaps.com", config.ttl_s, config.timeout_s, clock)
    raise UsageError("a start window needs an intensity forecast, and the offline table has none; "
                     "add --carbon-provider ukgrid (Great Britain) or --carbon-provider electricitymaps")


# -- choosing the start -----------------------------------------------------------------------
@dataclass(frozen=True)
class StartPlan:
    now_unix: float
    start_unix: float                 # the best start
    duration_s: float
    energy_kwh: float                 # IT energy of the job
    pue: float
    now_g_per_kwh: float              # mean intensity over the job if started now
    best_g_per_kwh: float
    provider: str
    covered: bool                     # False: the job is longer than the forecast; start now

    @property
    def delay_s(self) -> float:
        return self.start_unix - self.now_unix

    @property
    def now_g(self) -> float:
        return self.energy_kwh * self.pue * self.now_g_per_kwh

    @property
    def best_g(self) -> float:
        return self.energy_kwh * self.pue * self.best_g_per_kwh

    @property
    def saving_g(self) -> float:
        return self.now_g - self.best_g

    @property
    def saving_pct(self) -> float:
        return 100.0 * self.saving_g / self.now_g if self.now_g > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "now_unix": self.now_unix, "start_unix": self.start_unix,
                "start": _iso(self.start_unix), "delay_s": self.delay_s, "duration_s": self.duration_s,
                "now_g_per_kwh": self.now_g_per_kwh, "best_g_per_kwh": self.best_g_per_kwh,
                "emissions_g_now": self.now_g, "emissions_g_best": self.best_g, "saving_g": self.saving_g,
                "saving_pct": self.saving_pct, "covered": self.covered}


def plan_start(forecast: Forecast, now_unix: float, window_s: float, duration_s: float,
               energy_kwh: float, pue: float = 1.0) -> StartPlan:
    """The start in ``[now, now + window_s]`` with the lowest mean intensity over the job."""
    now_mean = forecast.mean_g_per_kwh(now_unix, min(now_unix + duration_s, forecast.end_unix))
    covered = now_unix + duration_s <= forecast.end_unix
    best_t, best_g = now_unix, now_mean
    if covered:
        for slot in forecast.slots:
            t = slot.start_unix
            if now_unix < t <= now_unix + window_s and t + duration_s <= forecast.end_unix:
                g = forecast.mean_g_per_kwh(t, t + duration_s)
                if g < best_g - 1e-9:          # ties go to the earlier start
                    best_t, best_g = t, g
    return StartPlan(now_unix, best_t, duration_s, energy_kwh, pue, now_mean, best_g, forecast.provider, covered)


def render_plan(plan: StartPlan) -> str:
    if not plan.covered:
        return (f"start:    now: the job ({plan.duration_s / 3600:g} h) is longer than the {plan.provider} "
                "forecast, so no later start can be compared\n")
    if plan.delay_s <= 0:
        return (f"start:    now is the cleanest start in the window ({plan.now_g_per_kwh:,.1f} g/kWh mean over the "
                f"job, {plan.provider} forecast)\n")
    return (f"start:    {_iso(plan.start_unix)} (in {_hms(plan.delay_s)}): {plan.best_g:,.1f} g CO2e at "
            f"{plan.best_g_per_kwh:,.1f} g/kWh vs {plan.now_g:,.1f} g starting now at {plan.now_g_per_kwh:,.1f} "
            f"g/kWh; saves {plan.saving_g:,.1f} g ({plan.saving_pct:.1f} %), {plan.provider} forecast\n")


def _hms(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plan_or_now(source: ForecastSource, now_unix: float, window_s: float, duration_s: float, energy_kwh: float,
                pue: float, err: TextIO) -> StartPlan | None:
    """The plan, or None after one line on ``err`` when no provider answers (start now)."""
    try:
        forecast = source.forecast(now_unix)
    except ForecastUnreachable as exc:
        err.write(f"wattmeter: no carbon forecast reachable ({exc.provider}: {exc.kind}); starting now\n")
        return None
    return plan_start(forecast, now_unix, window_s, duration_s, energy_kwh, pue)


# -- run --wait-for-clean ----------------------------------------------------------------------
@dataclass(frozen=True)
class WaitOutcome:
    waited_s: float
    plan: StartPlan | None            # the last plan followed (None: no forecast reachable)
    replans: int


def render_wait(plan: StartPlan) -> str:
    """The line ``run --wait-for-clean`` prints: intensities and %, since a job's power is unknown."""
    if plan.delay_s <= 0 or not plan.covered:
        return render_plan(plan).replace("start:    ", "wattmeter: ", 1)
    return (f"wattmeter: holding the job until {_iso(plan.start_unix)} (in {_hms(plan.delay_s)}): "
            f"{plan.best_g_per_kwh:,.1f} g/kWh mean over the job vs {plan.now_g_per_kwh:,.1f} starting now, "
            f"{plan.saving_pct:.1f} % less CO2e, {plan.provider} forecast\n")


def wait_for_clean(source: ForecastSource, clock: Clock, max_delay_s: float, duration_s: float,
                   pue: float = 1.0, err: TextIO | None = None, tty: bool = False,
                   recheck_s: float = RECHECK_S) -> WaitOutcome:
    """Hold until the cleanest start in ``max_delay_s``; never past it. Re-reads the forecast every
    ``recheck_s`` (forecasts change) and shows a live countdown when ``tty``."""
    err = err or sys.stderr
    t0 = clock.now()
    deadline = t0 + max_delay_s
    energy_kwh = 1.0           # the choice does not depend on power; savings are shown in %

    def plan_at(t: float) -> StartPlan | None:
        return plan_or_now(source, clock.wall(t), max(0.0, deadline - t), duration_s, energy_kwh, pue, err)

    plan = plan_at(t0)
    if plan is None:
        return WaitOutcome(0.0, None, 0)
    err.write(render_wait(plan))
    replans = 0
    next_check = t0 + recheck_s
    while True:
        now = clock.now()
        target = min(deadline, now + max(0.0, plan.start_unix - clock.wall(now)))
        if now >= target:
            break
        if now >= next_check:
            next_check = now + recheck_s
            try:
                fresh = plan_at(now)
            except NoForecast:
                fresh = None         # keep the plan we have; the deadline still holds
            if fresh is not None:
                plan, replans = fresh, replans + 1
                continue
        if tty:
            err.write(f"\rwattmeter: waiting for cleaner power, starting in {_hms(target - now)} "
                      f"(saves {plan.saving_pct:.0f} %)   ")
            err.flush()
        clock.sleep(min(1.0 if tty else 30.0, target - now, max(0.0, next_check - now)) or 0.001)
    if tty:
        err.write("\n")
    return WaitOutcome(clock.now() - t0, plan, replans)
