"""The worker threads behind NVML deadlines (sensors/guard.py): jobs, batches and lanes.

A *lane* is one daemon thread that runs its jobs in order: one per GPU handle (``lane_key``),
one for library calls, one *shared* lane for batches of several GPUs' reads. ``Lanes`` holds
them by key, capped at ``max_lanes`` (extra handles share one overflow lane); an idle lane
ends its thread after ``IDLE_EXIT_S``. What a caller waits for, and what counts as hung, is the
deadline policy's (sensors/guard_deadlines.py): this module only runs calls and says which lane
has a call in progress past its deadline (``Lane.stale``).
"""
from __future__ import annotations

import ctypes
import threading
import time
from queue import Empty, SimpleQueue
from typing import Any, Callable, Hashable

MAX_LANES = 65                 # 64 GPUs (or MIG handles) plus the library lane
IDLE_EXIT_S = 10.0             # a lane with no call for this long ends its thread
LIB: Hashable = "lib"
OVERFLOW: Hashable = "overflow"
SHARED: Hashable = "shared"
_SCALARS = (int, float, str, bytes, list, tuple, type(None))


class Job:
    """One call handed to a lane: ``fn(*args, **kwargs)``, its outcome, and when it was queued."""

    __slots__ = ("fn", "args", "kwargs", "done", "value", "error", "abandoned", "deadline_s", "queued_at")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict, deadline_s: float) -> None:
        self.fn, self.args, self.kwargs, self.deadline_s = fn, args, kwargs, deadline_s
        self.done = threading.Lock()
        self.done.acquire()          # released by the lane when the call returns
        self.value: Any = None
        self.error: BaseException | None = None
        self.abandoned = False       # its caller gave up while it waited in the queue
        self.queued_at = 0.0         # time.monotonic() when it was handed to its lane


class Part:
    """One GPU's share of a batch: ``fn()`` and its outcome."""

    __slots__ = ("key", "fn", "value", "error", "started_at", "finished", "abandoned")

    def __init__(self, key: Hashable, fn: Callable[[], Any]) -> None:
        self.key, self.fn = key, fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.finished = False
        self.abandoned = False       # its caller gave up on it (its GPU is hung)


class Batch(Job):
    """Several GPUs' parts, run in order on the shared lane; ``done`` is released once the
    lane stops taking parts (all run, or the rest were handed elsewhere: ``cut``)."""

    __slots__ = ("parts", "next", "cut", "current", "lane", "guard")

    def __init__(self, parts: list[Part], deadline_s: float) -> None:
        super().__init__(self._run_parts, (), {}, deadline_s)
        self.parts = parts
        self.next = 0                # index of the next part to start
        self.cut = len(parts)        # the lane starts no part at or past this index
        self.current: Part | None = None
        self.lane: Lane | None = None
        self.guard = threading.Lock()   # next, cut and current change together

    def _run_parts(self) -> None:
        lane = self.lane
        while True:
            with self.guard:
                if self.next >= self.cut:
                    self.current = None
                    return
                part = self.parts[self.next]
                self.next += 1
                part.started_at = time.monotonic()
                if lane is not None:
                    lane.started_at = part.started_at   # the lane is stale when *this* call hangs
                self.current = part
            try:
                part.value = part.fn()
            except BaseException as exc:   # handed to the caller, who re-raises it
                part.error = exc
            part.finished = True


class OnLane(threading.local):
    """Per thread: whether NVML calls made on it run there directly, without a hand-off."""

    inline = False                   # True on a lane's own thread: nested calls run there directly


class Lane:
    """One daemon thread that runs the calls of one handle, in order. It retires after
    ``IDLE_EXIT_S`` without calls (meters come and go; their lanes must not pile up)."""

    def __init__(self, owner: "Lanes", key: Hashable, name: str) -> None:
        self.owner, self.key = owner, key
        self.queue: SimpleQueue[Job] = SimpleQueue()
        self.running: Job | None = None
        self.started_at = 0.0        # time.monotonic() when ``running`` began
        self.thread = threading.Thread(target=self._run, name=f"wattmeter-nvml-{name}", daemon=True)
        self.thread.start()

    def stale(self, now: float) -> bool:
        """Its call in progress is hung: its caller gave up on it, or it is past its deadline."""
        job = self.running
        return job is not None and (job.abandoned or now - self.started_at > job.deadline_s)

    def _run(self) -> None:
        self.owner.on_lane.inline = True     # a batch's NVML calls run here, under its deadline
        while True:
            try:
                job = self.queue.get(timeout=IDLE_EXIT_S)
            except Empty:
                if self.owner.retire(self):
                    return
                continue
            if job.abandoned:
                continue
            self.started_at = time.monotonic()
            self.running = job
            try:
                job.value = job.fn(*job.args, **job.kwargs)
            except BaseException as exc:   # handed to the caller, who re-raises it
                job.error = exc
            finally:
                self.running = None
                job.done.release()


class Lanes:
    """The lanes of one wrapped module, by key. ``lock`` is its owner's: jobs are queued with it
    held, so a lane that retires (``retire``) never drops one."""

    def __init__(self, lock: threading.Lock, max_lanes: int = MAX_LANES) -> None:
        self.lock = lock
        self.max_lanes = max_lanes
        self.on_lane = OnLane()
        self._by_key: dict[Hashable, Lane] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: Hashable) -> Lane | None:
        """The lane of ``key``, if it has one now (none is started)."""
        return self._by_key.get(key)

    def stale_count(self, now: float) -> int:
        """How many lanes have a call in progress that hangs (``Lane.stale``). Lock held."""
        return sum(1 for lane in self._by_key.values() if lane.stale(now))

    def lane_locked(self, key: Hashable) -> Lane:
        """The lane of ``key``, started if it has none (the overflow lane past ``max_lanes``).
        Lock held."""
        lane = self._by_key.get(key)
        if lane is None and len(self._by_key) >= self.max_lanes:
            key = OVERFLOW
            lane = self._by_key.get(key)
        if lane is None:
            name = str(key) if key in (LIB, OVERFLOW, SHARED) else str(len(self._by_key))
            lane = self._by_key[key] = Lane(self, key, name)
        return lane

    def retire(self, lane: Lane) -> bool:
        """Called by an idle lane: end it unless a call arrived meanwhile. Jobs are queued with
        the lock held, so a job is either seen here or given to a new lane."""
        with self.lock:
            if not lane.queue.empty():
                return False
            if self._by_key.get(lane.key) is lane:
                del self._by_key[lane.key]
            return True

    def leave_shared_locked(self, old: Lane) -> None:
        """The shared lane ``old`` is left to its call in progress (hung or slow; its thread ends
        once the call returns): the next batch gets a fresh shared lane, and the jobs queued
        behind the call go to it at once. Lock held."""
        if self._by_key.get(SHARED) is not old:
            return
        del self._by_key[SHARED]
        while True:
            try:
                job = old.queue.get_nowait()
            except Empty:
                return
            lane = self.lane_locked(SHARED)
            if isinstance(job, Batch):
                job.lane = lane
            lane.queue.put(job)


def lane_key(arg: Any) -> Hashable:
    """A device call's lane: its handle. Real handles are ctypes pointers (a new object per
    lookup, so key by address); the fake's are plain objects, one per GPU."""
    if isinstance(arg, _SCALARS):
        return LIB
    if isinstance(arg, ctypes._Pointer):
        return ("ptr", ctypes.cast(arg, ctypes.c_void_p).value)
    return ("obj", id(arg))
