"""Clocks. Only the sampler owns cadence; everything takes a clock so tests run in virtual time."""
from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""

    def wall(self, t: float) -> float:
        """Unix time of monotonic instant ``t``."""

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self, t: float) -> float:
        # The offset is read at each call, not once: NTP may step the wall clock (a daemon
        # started at boot, before the clock was synced, runs for weeks), and NVML stamps field
        # values with the wall clock as it is. With an offset fixed at start, a step back of
        # 0.5 s made every field value look 0.5 s old, and it was dated that much early.
        return t + (time.time() - time.monotonic())

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class VirtualClock:
    """A clock that moves only when told. ``sleep`` advances it, so code under test runs instantly."""

    def __init__(self, start: float = 1000.0, wall_start: float = 1.7e9) -> None:
        self._t = start
        self._wall_offset = wall_start - start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def wall(self, t: float) -> float:
        return t + self._wall_offset

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._t += seconds
            return self._t

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.advance(seconds)
