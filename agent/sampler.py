"""The sampler owns the cadence: it reads sensors and feeds the ledger.

Each sensor gets its own small reader thread so a slow or hung sensor (an NVML call stuck on a
falling GPU) cannot stall the others. Reads are jittered inside each period (stratified
sampling): a fixed cadence aliases with periodic workloads and biases power integration.
While window edges are waiting to be resolved, sensors that support it are read at a fast
cadence, so counter refreshes are timed to a few milliseconds around the edge.
"""
from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .clock import Clock
from .ledger import Ledger
from .model import Batch
from .sensors.base import (CadenceFloor, Reader, ReaderAbandoned, ScheduledSensor, Sensor, declare_reader,
                           scheduled)

log = logging.getLogger("wattmeter.sampler")

FAST_PERIOD_S = 0.005       # cadence near window edges, for sensors with ``fast_edges``
MIN_INTERVAL_S = 0.01       # the fastest cadence any built-in sensor supports (``--interval`` floor)
MIN_POKE_GAP_S = 0.005      # an edge poke reads a sensor at most this often


@dataclass
class SensorStatus:
    """Health of one sensor, for ``wattmeter_up`` and ``wattmeter_sensor_errors_total``."""

    name: str
    up: bool = True
    reads: int = 0
    errors: Counter = field(default_factory=Counter)   # error kind -> count
    last_error: str = ""


class _Loop:
    """One reader thread: calls ``fn(now, fast)`` at a jittered cadence until stopped.

    A sensor's loop declares its thread a replaceable ``Reader`` (sensors/base.py): its driver
    calls may then run on it directly instead of being handed to a worker thread (two thread
    wake-ups per read, ~0.1 ms of CPU each on a VM). If one hangs, the deadline machinery
    abandons the thread and ``_replace`` starts a fresh one on the same schedule."""

    def __init__(self, name: str, period_s: float, fn: Callable[[float, bool], None], clock: Clock,
                 rng: random.Random, fast: Callable[[float], bool],
                 next_at: Callable[[float], float | None] | None = None, replaceable: bool = False,
                 floor: Callable[[float], float] | None = None) -> None:
        self.name, self.period_s, self.fn, self.clock = name, period_s, fn, clock
        self.rng, self.fast, self.next_at = rng, fast, next_at
        self.floor = floor                # the sensor's CadenceFloor, if it declares one
        self.replaceable = replaceable
        self.replaced = 0                 # threads abandoned in a hung call
        self._swap = threading.Lock()     # one thread is the loop's at a time
        # A poke releases this lock; the reader's timed acquire is its sleep. (An Event's wait
        # is a Condition in Python: ~15 us more per wake-up, ~11 wake-ups a second.)
        self._poked = threading.Lock()
        self._poked.acquire()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"wattmeter-{name}", daemon=True)
        self.last_read = -1e18

    def _run(self) -> None:
        reader = Reader(self._replace) if self.replaceable else None
        declare_reader(reader)
        try:
            self._loop(reader)
        except ReaderAbandoned:
            return                        # replaced while a call hung: the new thread reads on

    def _replace(self) -> None:
        """This loop's thread is stuck in a hung call (called from another thread): read on
        from a fresh one."""
        with self._swap:
            if self.stopping.is_set():
                return
            self.replaced += 1
            log.warning("sensor %s: a read hung past its deadline; reading on from a new thread", self.name)
            self.thread = threading.Thread(target=self._run, name=f"wattmeter-{self.name}", daemon=True)
            self.thread.start()

    def current_thread(self) -> threading.Thread:
        with self._swap:
            return self.thread

    def _loop(self, reader: Reader | None) -> None:
        clock, period = self.clock, self.period_s
        slot = clock.now()
        due = slot + self.rng.random() * period
        poke_owed = False     # a poke that came too soon after a read is served, not dropped
        fast_gap = FAST_PERIOD_S
        while not self.stopping.is_set():
            now = clock.now()
            fast = self.fast(now)
            if not fast and self.floor is not None:
                # Slots whose read the sensor would ignore are skipped, not woken for: each
                # wake-up costs ~0.1 ms of CPU on a VM. (Each slot still draws its own time.)
                floor = min(self.floor(now), now + max(1.0, 10 * period))   # (bounded: a bad floor never spins)
                while due < floor:
                    slot += period
                    due = slot + self.rng.random() * period
            target = min(due, self.last_read + fast_gap) if fast else due
            wish = self.next_at(now) if self.next_at is not None else None
            if wish is not None and wish < target:
                target = max(wish, self.last_read + MIN_POKE_GAP_S / 5)   # a scheduled read (counter pair)
            if poke_owed:
                target = min(target, self.last_read + MIN_POKE_GAP_S)
            if now < target:
                poked = self._poked.acquire(timeout=target - now)
                if self.stopping.is_set():
                    break
                now = clock.now()
                if poked and now - self.last_read < MIN_POKE_GAP_S:
                    poke_owed = True
                    continue
                if not poked and now < target - 0.0005:
                    continue
            poke_owed = False
            self.last_read = now
            # Jittered too: a fixed 5 ms beat divides a 100 ms refresh period, so every refresh
            # would be seen at the same offset and brackets around it would never narrow.
            fast_gap = FAST_PERIOD_S * (0.5 + self.rng.random())
            self.fn(now, fast)
            if reader is not None and reader.abandoned:
                return
            if now >= due:
                slot += period
                due = slot + self.rng.random() * period
                if due < clock.now():      # fell behind (a slow read): restart the grid
                    slot = clock.now()
                    due = slot + self.rng.random() * period
        self.fn(clock.now(), False)   # final read, so the ledger covers the stop instant

    def poke(self) -> None:
        """Wake the reader now (several pokes before it wakes count as one)."""
        try:
            self._poked.release()
        except RuntimeError:          # already poked
            pass


def _fast_policy(cadence: ScheduledSensor, ledger: Ledger) -> Callable[[float], bool]:
    """When a reader goes fast: an edge waits for one of *its* devices (``fast_edges``), or
    the sensor asks to (``wants_fast(now)``, e.g. calibrating its counter timing)."""
    def fast(now: float) -> bool:
        if cadence.wants_fast(now):
            return True
        if not cadence.fast_edges:
            return False
        # Looked up each time: a sensor's devices may grow after start.
        return ledger.unresolved(frozenset(d.key for d in cadence.devices()))
    return fast


class Sampler:
    """Reads every sensor on its own thread at its cadence (``sensors/base.py``) into the ledger.
    ``interval_s`` (``--interval``) sets every sensor's period, never below what it supports."""

    def __init__(self, sensors: Sequence[Sensor], ledger: Ledger, clock: Clock, *,
                 seed: int | None = None, interval_s: float | None = None) -> None:
        self.sensors = list(sensors)
        self.ledger = ledger
        self.clock = clock
        self.status = {s.name: SensorStatus(s.name) for s in self.sensors}
        self._cadence = {id(s): scheduled(s) for s in self.sensors}
        if interval_s is not None:
            for c in self._cadence.values():
                c.set_period(max(interval_s, c.min_period_s))
        self._rng = random.Random(seed)
        self._loops: list[_Loop] = []
        self._tasks: list[tuple[str, float, Callable[[float], None]]] = []
        self._lock = threading.Lock()
        self._known: set[str] = set()
        for s in self.sensors:
            for dev in s.devices():
                ledger.add_device(dev)
                self._known.add(dev.key)

    @property
    def min_interval_s(self) -> float:
        """The shortest ``interval_s`` every sensor here supports (at least MIN_INTERVAL_S)."""
        return max([MIN_INTERVAL_S, *(c.min_period_s for c in self._cadence.values())])

    def cadence(self, sensor: Sensor) -> ScheduledSensor:
        """The cadence contract of one of this sampler's sensors."""
        return self._cadence[id(sensor)]

    def wants_fast(self, sensor: Sensor, now: float) -> bool:
        """Whether ``sensor`` should be read at the fast cadence now (an edge waits on it, or it
        asks to)."""
        return _fast_policy(self._cadence[id(sensor)], self.ledger)(now)

    def add_task(self, name: str, period_s: float, fn: Callable[[float], None]) -> None:
        """Run an extra periodic reader (e.g. per-process GPU usage) on its own thread. On a
        running sampler (the default meter is started on first use) it starts at once."""
        with self._lock:
            self._tasks.append((name, period_s, fn))
            if self._loops:
                loop = self._task_loop(name, period_s, fn)
                self._loops.append(loop)
                loop.current_thread().start()

    def _task_loop(self, name: str, period_s: float, fn: Callable[[float], None]) -> _Loop:
        return _Loop(name, period_s, lambda now, fast: fn(now), self.clock, random.Random(self._rng.random()),
                     lambda now: False)

    # -- reading ---------------------------------------------------------------
    def read_sensor(self, sensor: Sensor, now: float, fast: bool = False) -> None:
        status = self.status[sensor.name]
        try:
            batch = self._cadence[id(sensor)].read(now, fast)
        except Exception as exc:  # a sensor bug must not kill its reader thread; counted and logged
            log.warning("sensor %s raised %s: %s", sensor.name, type(exc).__name__, exc)
            batch = Batch()
            status.errors["exception"] += 1
            status.last_error = f"{type(exc).__name__}: {exc}"
            status.up = False
            return
        if any(r.device_key not in self._known for r in batch.readings):
            for dev in sensor.devices():   # devices that appeared later (GPUs that came late)
                self.ledger.add_device(dev)
                self._known.add(dev.key)
        self.ledger.record(batch.readings, now)
        for err in batch.errors:
            status.errors[err.kind] += 1
            status.last_error = err.message or err.kind
            self.ledger.record_error(err.device_key, err.kind, now)
        status.reads += 1
        status.up = not batch.errors

    def tick(self, now: float | None = None) -> None:
        """Read every sensor and task once, synchronously (virtual-time tests, final flush)."""
        now = self.clock.now() if now is None else now
        for s in self.sensors:
            self.read_sensor(s, now)
        for _, _, fn in self._tasks:
            fn(now)

    # -- threads ---------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._loops)

    def start(self) -> None:
        with self._lock:
            if self._loops:
                return
            for s in self.sensors:
                c = self._cadence[id(s)]
                self._loops.append(_Loop(s.name, c.period_s, lambda now, fast, s=s: self.read_sensor(s, now, fast),
                                         self.clock, random.Random(self._rng.random()),
                                         _fast_policy(c, self.ledger), c.next_read_at, replaceable=True,
                                         floor=c.cadence_floor if isinstance(c, CadenceFloor) else None))
            for name, period, fn in self._tasks:
                self._loops.append(self._task_loop(name, period, fn))
            for loop in self._loops:
                loop.current_thread().start()

    def poke(self) -> None:
        """Ask every reader for a prompt read (a window edge is waiting)."""
        for loop in self._loops:
            loop.poke()

    def stop(self, timeout_s: float = 2.0) -> None:
        with self._lock:
            loops, self._loops = self._loops, []
        for loop in loops:
            loop.stopping.set()
            loop.poke()
        for loop in loops:
            thread = loop.current_thread()
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("sensor %s did not stop within %.1f s (a hung read?)", loop.name, timeout_s)
