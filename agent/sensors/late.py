"""A sensor whose devices appear when a background connect succeeds (GPUs that come late).

``LateNvmlSensor(connect, clock)`` satisfies the Sensor protocol from the start with no devices.
``connect()`` builds the real sensor (for NVML: init, then discovery); it runs on a background
thread, never on the sampler's or the caller's, so a driver that is still loading or hung never
delays ``Meter.start()`` or a window edge. A failed attempt is retried with exponential backoff;
retries are started by ``read(now)``, so they follow the injected clock (the sampler's cadence,
or a test's virtual time). Once connected, ``devices()`` returns the real sensor's devices and
every call is passed through: the GPUs are metered from then on, and ``appeared_at`` says when.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable, Sequence

from ..clock import Clock
from ..model import Batch, Device, ProcessUsage
from .base import SensorUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from .nvml import NvmlSensor

log = logging.getLogger("wattmeter.sensors.late")

FIRST_RETRY_S = 0.25
MAX_RETRY_S = 5.0     # a driver that loads late is found within 5 s of being ready


class LateNvmlSensor:
    def __init__(self, name: str, connect: Callable[[], "NvmlSensor"], clock: Clock, period_s: float,
                 permanent: Callable[[BaseException], bool] = lambda exc: False,
                 on_ready: Callable[["NvmlSensor", float], None] | None = None,
                 first_retry_s: float = FIRST_RETRY_S, max_retry_s: float = MAX_RETRY_S) -> None:
        self.name = name
        self._period_s = period_s
        self.clock = clock
        self._connect = connect
        self._permanent = permanent
        self._on_ready = on_ready
        self._retry_s = first_retry_s
        self._max_retry_s = max_retry_s
        self._inner: NvmlSensor | None = None
        self._attempt: threading.Thread | None = None
        self._next_try = clock.now()
        self._lock = threading.Lock()
        self._closed = False
        self.attempts = 0
        self.appeared_at: float | None = None       # clock time the devices appeared
        self.last_error: BaseException | None = None
        self.given_up = False                        # a permanent failure: no more retries
        self.try_now(self._next_try)

    @property
    def period_s(self) -> float:
        """The connected sensor's cadence (power-only GPUs read faster), else the planned one."""
        inner = self._inner
        return inner.period_s if inner is not None else self._period_s

    # -- connecting ------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._inner is not None

    @property
    def pending_reason(self) -> str | None:
        """Why there are no devices yet (for doctor and health), or None once connected or given up."""
        if self._inner is not None or self.given_up:
            return None
        return f"NVML not ready ({unavailable_reason(self.last_error)}); retried in the background"

    @property
    def connected_sensor(self) -> "NvmlSensor | None":
        """The connected sensor (None until then)."""
        return self._inner

    def try_now(self, now: float) -> threading.Thread | None:
        """Start an attempt unless one is running, it is too early, or there is nothing left to do.
        Returns the attempt's thread (``discover`` waits on the first one for a short while)."""
        with self._lock:
            if self._inner is not None or self.given_up or self._closed or now < self._next_try:
                return None
            if self._attempt is not None and self._attempt.is_alive():
                return None
            self.attempts += 1
            th = threading.Thread(target=self._run, name=f"wattmeter-{self.name}-connect", daemon=True)
            self._attempt = th
            th.start()   # under the lock: ``wait`` never sees a thread that has not started
        return th

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` (real time) for the running attempt; True once connected."""
        th = self._attempt
        if th is not None:
            th.join(timeout_s)
        return self.connected

    def _run(self) -> None:
        try:
            inner = self._connect()
        except Exception as exc:   # any failure of a driver that is still coming up is retried
            with self._lock:
                self.last_error = exc
                if self._permanent(exc):
                    self.given_up = True
                    log.info("%s: giving up (%s)", self.name, exc)
                    return
                self._next_try = self.clock.now() + self._retry_s
                self._retry_s = min(self._max_retry_s, 2 * self._retry_s)
            log.info("%s: not ready (%s); retrying in the background", self.name, exc)
            return
        with self._lock:
            if self._closed:
                inner.close()
                return
            self._inner = inner
            self.appeared_at = self.clock.now()
        if self._on_ready is not None:
            self._on_ready(inner, self.appeared_at)

    # -- Sensor protocol -------------------------------------------------------
    def devices(self) -> Sequence[Device]:
        inner = self._inner
        return inner.devices() if inner is not None else []

    def read(self, now: float, fast: bool = False) -> Batch:
        inner = self._inner
        if inner is None:
            self.try_now(now)
            return Batch()
        return inner.read(now, fast)

    min_period_s = 0.01       # the NVML sensor's (sensors/base.py ScheduledSensor)

    def set_period(self, period_s: float) -> None:
        self._period_s = max(period_s, self.min_period_s)
        if self._inner is not None:
            self._inner.set_period(period_s)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            inner = self._inner
        if inner is not None:
            inner.close()

    # -- the NVML sensor's cadence capabilities (none until connected) -------------------------
    @property
    def fast_edges(self) -> bool:
        inner = self._inner
        return inner.fast_edges if inner is not None else False

    def read_fast(self, now: float) -> Batch:
        inner = self._inner
        return inner.read_fast(now) if inner is not None else self.read(now)

    def wants_fast(self, now: float) -> bool:
        inner = self._inner
        return inner.wants_fast(now) if inner is not None else False

    def next_read_at(self, now: float) -> float | None:
        """Before connecting: the next retry, so a retry is not left waiting for a slow cadence."""
        inner = self._inner
        if inner is not None:
            return inner.next_read_at(now)
        nxt = self._next_try
        return nxt if not self.given_up and nxt > now else None

    def read_processes(self, now: float) -> list[ProcessUsage]:
        inner = self._inner
        return inner.read_processes(now) if inner is not None else []

    def mig_layout(self) -> dict[str, dict[str, float]]:
        inner = self._inner
        return inner.mig_layout() if inner is not None else {}

    def mig_uuids(self) -> dict[str, tuple[str, str]]:
        inner = self._inner
        return inner.mig_uuids() if inner is not None else {}


def unavailable_reason(exc: BaseException | None) -> str:
    if isinstance(exc, SensorUnavailable):
        return exc.reason
    return f"{type(exc).__name__}: {exc}" if exc is not None else "not tried yet"
