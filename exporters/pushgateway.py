"""Pushing a job's metrics to a Prometheus Pushgateway, periodically and at the end.

``push_to_gateway`` (HTTP PUT) replaces every metric under the grouping key, so the key is
unique per run: ``job``, ``run_id`` and ``instance``. The same replacement ends a run cleanly:
the final push carries only the job's energy totals (``jobexport.JobCollector``), so its
power gauge leaves the gateway and the Pushgateway's ``push_time_seconds`` dates the totals. A gateway that is down, slow or
refusing never fails the job: each failed push is counted by kind, logged once per change
of state, and the next push (or the final retries) tries again.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
from collections import Counter
from typing import Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import push_to_gateway

from ..errors import UsageError
from .prometheus import Health

log = logging.getLogger("wattmeter.pushgateway")


def validate_gateway_url(url: str, flag: str = "--pushgateway") -> str:
    """``http(s)://host[:port][/prefix]``; anything else is a one-line UsageError."""
    text = str(url).strip()
    example = "e.g. http://pushgateway:9091"
    if not text or any(c.isspace() for c in text):
        raise UsageError(f"{flag} {url!r}: not a URL; give the gateway's address, {example}")
    if "://" not in text:
        text = "http://" + text     # prometheus_client's convention for a bare host:port
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{flag} {url!r}: not a valid URL ({exc}); {example}") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"{flag} {url!r}: scheme {parts.scheme!r} is not supported; "
                         f"use http:// or https://, {example}")
    if not parts.hostname:
        raise UsageError(f"{flag} {url!r}: no host in the URL; {example}")
    if parts.query or parts.fragment:
        raise UsageError(f"{flag} {url!r}: a gateway URL has no query or fragment; {example}")
    if port == 0:
        raise UsageError(f"{flag} {url!r}: port 0 is not a gateway port; {example}")
    return text.rstrip("/")


def _kind(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"http_{exc.code}"
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timeout"
    return "unreachable"


class Pusher:
    """Pushes ``registry`` under a grouping key. ``push()`` never raises."""

    def __init__(self, url: str, job: str, grouping_key: Mapping[str, str], registry: CollectorRegistry, *,
                 interval_s: float = 15.0, timeout_s: float = 3.0) -> None:
        self.url = validate_gateway_url(url)
        self.job = job
        self.grouping_key = dict(grouping_key)
        self.registry = registry
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.errors: Counter[str] = Counter()
        self.pushes = 0
        self.up: bool | None = None          # None until the first attempt
        self._push_lock = threading.Lock()   # one push at a time (PUTs replace each other)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def push(self) -> bool:
        with self._push_lock:
            try:
                push_to_gateway(self.url, job=self.job, registry=self.registry, grouping_key=self.grouping_key,
                                timeout=self.timeout_s)
            except (OSError, ValueError, urllib.error.URLError) as exc:   # never into the job
                kind = _kind(exc)
                self.errors[kind] += 1
                level = logging.WARNING if self.up is not False else logging.DEBUG
                log.log(level, "push to %s failed (%s: %s); will retry", self.url, kind, exc)
                self.up = False
                return False
            if self.up is False:
                log.warning("push to %s works again", self.url)
            self.up = True
            self.pushes += 1
            return True

    # -- periodic ----------------------------------------------------------------------------
    def start(self) -> "Pusher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="wattmeter-push", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.push()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def request(self) -> None:
        """Ask for a push soon, from the loop's thread (never blocks the caller)."""
        self._wake.set()

    def close(self, attempts: int = 3, backoff_s: float = 1.0) -> bool:
        """Stop the loop and push the final values, retrying a few times. True if it landed."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 1.0)
        for i in range(max(1, attempts)):
            if self.push():
                return True
            if i + 1 < attempts:
                time.sleep(backoff_s * (i + 1))
        log.warning("final push to %s failed after %d attempts; the job's metrics are in its record", self.url,
                    attempts)
        return False

    def health(self) -> list[Health]:
        return [Health("pushgateway", self.up, dict(self.errors))]
