"""NVML calls run on a sampler's reader thread itself, under a watchdog (sensors/guard.py).

A replaceable ``Reader`` (sensors/base.py) runs its read of every GPU on its own thread: no
hand-off. Each reader has a *slot*: the GPU of its call in progress and when it began. A
watchdog thread looks every ``deadline / 2`` (at most ``WATCH_MAX_S``) at every slot; a call
past its deadline is left to hang (its owner is told, and counts it a timeout) and the reader
is abandoned: the sampler reads on from a fresh thread, and the hung one ends, recording
nothing, once its call returns. The watchdog ends after ``IDLE_EXIT_S`` without reader calls.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Hashable

from .base import Reader, ReaderAbandoned
from .guard_lanes import IDLE_EXIT_S, Part

WATCH_MAX_S = 0.5              # a reader's calls are checked at least this often (deadline / 2 if sooner)


class ReaderWatch:
    """Readers' calls in progress and the watchdog thread that checks them against the deadline.
    ``lock`` is its owner's; ``on_hung(part)`` is called with it held for each call left to
    hang (``part.key`` is its GPU, ``part.finished`` is set once the call returns)."""

    def __init__(self, lock: threading.Lock, deadline_s: float, on_hung: Callable[[Part], None]) -> None:
        self._lock = lock
        self.deadline_s = deadline_s
        self._on_hung = on_hung
        self._readers: weakref.WeakKeyDictionary[Reader, list[Any]] = weakref.WeakKeyDictionary()
        self._watchdog: threading.Thread | None = None
        self._last_call = 0.0

    def slot_locked(self, reader: Reader, now: float) -> list[Any]:
        """``reader``'s slot, the watchdog started if it is not running. Lock held."""
        slot = self._readers.get(reader)
        if slot is None:     # [GPU key of the call in progress, its start, the call left to hang]
            slot = self._readers[reader] = [None, 0.0, None]
        self._last_call = now
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="wattmeter-nvml-watchdog", daemon=True)
            self._watchdog.start()
        return slot

    def run_here(self, slot: list[Any], here: list[tuple[int, Hashable, Callable[[], Any]]],
                 out: list[Any], slow_s: float) -> list[Hashable]:
        """Run each ``(index, GPU key, fn)`` of ``here`` on this thread, its value or the
        exception it raised into ``out[index]``; return the keys of the calls that ran longer
        than ``slow_s``. Raises ``ReaderAbandoned`` once a call the watchdog left to hang
        returns (this thread was replaced)."""
        slow: list[Hashable] = []
        clock, lock = time.monotonic, self._lock
        for i, key, fn in here:
            slot[1] = started = clock()
            slot[0] = key
            try:
                value = fn()
            except Exception as exc:     # handed to the caller, as from a lane
                value = exc
            with lock:                   # the watchdog either saw the call return or left it
                slot[0] = None
                left = slot[2]
            if left is not None:         # it was left to hang: this thread was replaced
                left.finished = True     # its GPU recovers, the call has returned
                raise ReaderAbandoned()
            if clock() - started > slow_s:
                slow.append(key)
            out[i] = value
        return slow

    def _watch(self) -> None:
        """The watchdog of readers' own calls: one that runs past the deadline is left to hang
        (a timeout; its GPU is stale until it returns) and its reader is abandoned, so the
        sampler reads on from a fresh thread. Ends after IDLE_EXIT_S without reader calls."""
        interval = min(WATCH_MAX_S, self.deadline_s / 2)
        while True:
            time.sleep(interval)
            now = time.monotonic()
            hung: list[Reader] = []
            with self._lock:
                for reader, slot in list(self._readers.items()):
                    key, started = slot[0], slot[1]
                    if key is not None and now - started > self.deadline_s:
                        part = Part(key, _never)
                        part.started_at, part.abandoned = started, True
                        slot[2] = part   # its reader marks it finished once the call returns
                        self._on_hung(part)
                        del self._readers[reader]
                        hung.append(reader)
                idle = not hung and now - self._last_call > IDLE_EXIT_S and \
                    not any(slot[0] is not None for slot in self._readers.values())
                if idle:
                    self._watchdog = None
            for reader in hung:
                reader.abandon()         # the sampler starts a fresh reader thread
            if idle:
                return


def _never() -> None:   # the call of a part made only to mark a hung reader call
    raise AssertionError("not run")
