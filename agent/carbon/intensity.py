"""Grid-intensity sources: the offline table, two optional live providers, and a fallback wrapper.

A source answers ``read(t_wall) -> IntensityReading``. Live sources translate every HTTP,
network and parsing failure into :class:`ProviderError` at this boundary; :class:`FallbackSource`
turns those into the table value with a label that says so, and bounds the caller's wait to
``timeout_s`` whatever the server does. API keys are sent as headers, never logged or repr'd.
"""
from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol, runtime_checkable

from .tables import ZoneInfo

log = logging.getLogger("wattmeter.carbon")

_MAX_BODY_BYTES = 1 << 20   # a latest-intensity answer is < 1 KiB; refuse to buffer junk


@dataclass(frozen=True)
class IntensityReading:
    g_per_kwh: float
    source: str     # "table:ember-owid-2023", "electricitymaps", "table (ukgrid failed: timeout)"
    zone: str


class ProviderError(Exception):
    """A live provider failed. ``kind`` is short snake-case: timeout, http_500, bad_json, network."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@runtime_checkable
class IntensitySource(Protocol):
    name: str

    def read(self, t_wall: float) -> IntensityReading:
        """Intensity at wall time ``t_wall``. Live sources may raise :class:`ProviderError`."""


class TableSource:
    """The offline table row of one zone: constant in time, never fails."""

    name = "table"

    def __init__(self, zone: ZoneInfo, label: str | None = None) -> None:
        self.zone = zone
        self.label = label or zone.source_label

    def read(self, t_wall: float) -> IntensityReading:
        return IntensityReading(self.zone.g_per_kwh, self.label, self.zone.key)


def _get_json(url: str, headers: dict[str, str], timeout_s: float) -> Any:
    from .. import __version__

    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": f"wattmeter/{__version__}", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (https URLs)
            body = response.read(_MAX_BODY_BYTES)
    except urllib.error.HTTPError as exc:
        raise ProviderError(f"http_{exc.code}") from None
    except urllib.error.URLError as exc:
        timed_out = isinstance(exc.reason, (TimeoutError, socket.timeout))
        raise ProviderError("timeout" if timed_out else "network") from None
    except (TimeoutError, socket.timeout):
        raise ProviderError("timeout") from None
    except (OSError, http.client.HTTPException):
        raise ProviderError("network") from None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProviderError("bad_json") from None


class _CachedHttpSource:
    """Shared TTL cache for live providers: at most one request per ``ttl_s`` per source."""

    name = "http"

    def __init__(self, zone: str, ttl_s: float, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.zone = zone
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, IntensityReading] | None = None

    def cached(self) -> IntensityReading | None:
        """The last good reading while it is younger than ``ttl_s``."""
        with self._lock:
            if self._cached and self._clock() - self._cached[0] < self.ttl_s:
                return self._cached[1]
        return None

    def read(self, t_wall: float) -> IntensityReading:
        hit = self.cached()
        if hit is not None:
            return hit
        reading = IntensityReading(self._fetch_g_per_kwh(), self.name, self.zone)
        with self._lock:
            self._cached = (self._clock(), reading)
        return reading

    def _fetch_g_per_kwh(self) -> float:
        raise NotImplementedError


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ProviderError("bad_json")
    return float(value)


class ElectricityMapsSource(_CachedHttpSource):
    """Electricity Maps ``GET /v3/carbon-intensity/latest?zone=Z`` with header ``auth-token``."""

    name = "electricitymaps"

    def __init__(self, zone: str, token: str, base_url: str = "https://api.electricitymaps.com",
                 ttl_s: float = 600.0, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(zone, ttl_s, timeout_s, clock)
        self._token = token
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:  # the token stays out of logs and tracebacks
        return f"ElectricityMapsSource(zone={self.zone!r}, base_url={self.base_url!r}, token=***)"

    def _fetch_g_per_kwh(self) -> float:
        url = f"{self.base_url}/v3/carbon-intensity/latest?" + urllib.parse.urlencode({"zone": self.zone})
        data = _get_json(url, {"auth-token": self._token}, self.timeout_s)
        if not isinstance(data, dict):
            raise ProviderError("bad_json")
        return _number(data.get("carbonIntensity"))


class UKCarbonIntensitySource(_CachedHttpSource):
    """National Grid ESO's Carbon Intensity API ``GET /intensity`` (Great Britain, no key)."""

    name = "ukgrid"

    def __init__(self, base_url: str = "https://api.carbonintensity.org.uk", ttl_s: float = 600.0,
                 timeout_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__("GB", ttl_s, timeout_s, clock)
        self.base_url = base_url.rstrip("/")

    def _fetch_g_per_kwh(self) -> float:
        data = _get_json(f"{self.base_url}/intensity", {}, self.timeout_s)
        try:
            intensity = data["data"][0]["intensity"]
        except (KeyError, IndexError, TypeError):
            raise ProviderError("bad_json") from None
        if not isinstance(intensity, dict):
            raise ProviderError("bad_json")
        actual = intensity.get("actual")   # null for the current half hour until measured
        return _number(actual if actual is not None else intensity.get("forecast"))


class _Fetch(threading.Thread):
    """One live read on a daemon thread, so a stuck server cannot hold the caller."""

    def __init__(self, source: IntensitySource, t_wall: float) -> None:
        super().__init__(name=f"wattmeter-carbon-{source.name}", daemon=True)
        self.source, self.t_wall = source, t_wall
        self.done = threading.Event()
        self.reading: IntensityReading | None = None
        self.error_kind: str | None = None

    def run(self) -> None:
        try:
            self.reading = self.source.read(self.t_wall)
        except ProviderError as exc:
            self.error_kind = exc.kind
        finally:
            self.done.set()


class FallbackSource:
    """A live source with the table behind it. Never raises; never blocks past ``timeout_s``.

    On failure the reading is the table's, labelled ``"table (<provider> failed: <kind>)"``;
    the provider is not asked again until ``retry_s`` has passed. Failures are counted in
    ``errors`` ({kind: n}) and logged once per kind.
    """

    def __init__(self, primary: IntensitySource, fallback: TableSource, timeout_s: float,
                 retry_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.primary, self.fallback = primary, fallback
        self.name = primary.name
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: _Fetch | None = None
        self._failed: tuple[float, str] | None = None
        self.errors: dict[str, int] = {}

    def read(self, t_wall: float) -> IntensityReading:
        cached = getattr(self.primary, "cached", None)
        hit = cached() if callable(cached) else None
        if hit is not None:
            return hit
        with self._lock:
            if self._failed and self._clock() - self._failed[0] < self.retry_s:
                return self._fallback(t_wall, self._failed[1])
            if self._inflight is None or self._inflight.done.is_set():
                self._inflight = _Fetch(self.primary, t_wall)
                self._inflight.start()
            fetch = self._inflight
        if not fetch.done.wait(self.timeout_s):
            return self._failure(t_wall, "timeout")
        if fetch.reading is not None:
            with self._lock:
                self._failed = None
            return fetch.reading
        return self._failure(t_wall, fetch.error_kind or "network")

    def _failure(self, t_wall: float, kind: str) -> IntensityReading:
        with self._lock:
            self._failed = (self._clock(), kind)
            first = kind not in self.errors
            self.errors[kind] = self.errors.get(kind, 0) + 1
        if first:
            log.warning("carbon intensity from %s failed (%s); using the offline table for %s",
                        self.name, kind, self.fallback.zone.key)
        return self._fallback(t_wall, kind)

    def _fallback(self, t_wall: float, kind: str) -> IntensityReading:
        reading = self.fallback.read(t_wall)
        return replace(reading, source=f"table ({self.name} failed: {kind})")


def source_for(config: Any) -> IntensitySource:
    """The source a :class:`~wattmeter.carbon.config.CarbonConfig` asks for (its ``build_source``)."""
    return config.build_source()
