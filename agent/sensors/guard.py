"""Deadlines for every NVML call, at the ``pynvml`` module boundary.

``with_deadlines(pynvml)`` returns a module with the same names whose ``nvml*`` functions run on
worker threads: one lane per GPU handle, one for library calls (init, count, driver version).
A caller waits at most its deadline; past it, the call raises the vendor's own timeout error
(``NVMLError`` with ``NVML_ERROR_TIMEOUT``), which the NVML sensor already reports as kind
``timeout``. While a lane's call is still hung, that lane is *stale*: later calls on the same
handle fail at once with the same error instead of queueing behind it, and it recovers by itself
when the hung call returns. Other GPUs, other sensors, window ends and scrapes never wait on it.

A sensor's read of every GPU (``run_each``, the ``DeadlineLanes`` contract in base.py) needs
no thread of its own per GPU:

- On a sampler reader thread (a replaceable ``Reader``, base.py) the calls run on that thread
  itself: no hand-off at all (each costs two thread wake-ups, ~0.1 ms of CPU each on a VM, 8
  GPUs x 10 Hz). A watchdog thread looks every ``deadline / 2`` (at most ``WATCH_MAX_S``) at
  each reader's call in progress; one past its deadline is left to hang (a timeout, its GPU
  stale until it returns) and the reader is abandoned: the sampler reads on from a fresh
  thread, and the hung one ends, recording nothing, once its call returns. The other GPUs miss
  at most the deadline plus one look of reads, once.
- From any other thread (``Meter.poll()``, a first read in ``start()``) they run on one
  *shared* lane: one hand-off per read. The caller watches the call in progress: one that runs
  past ``SHARED_SLOW_S`` (hung, or just slow) is left to its thread -- which ends once the
  call returns -- and the GPUs not yet read go on at once on a fresh shared lane.

Either way a GPU whose call hung or ran slow gets a lane of its own from then on (slow GPUs are
read side by side). A caller that is not a reader waits at most one deadline in all.

Threads are bounded: a lane is one daemon thread, lanes are capped (``max_lanes``; extra
handles share one overflow lane), a hung lane never spawns another thread, a GPU leaves the
shared lane or a reader at most once (so at most one thread per GPU is left behind with its
call), and an idle lane or watchdog ends its thread after ``IDLE_EXIT_S``.

Deadlines are real-time waits (``threading`` lock timeouts): they bound how long a thread is
really blocked, which no virtual clock can shorten. A fake's ``clock.sleep`` on a VirtualClock
returns at once, so simulated slow calls finish within any deadline; fake ``hang`` faults block
in real time and are what the deadline cuts short.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
import time
import types
import weakref
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

from .base import Reader, ReaderAbandoned, current_reader

DEFAULT_DEADLINE_S = 1.0
# nvmlInit can take seconds on a board without persistence mode (the driver loads on demand).
SLOW_CALL_DEADLINES_S: Mapping[str, float] = {"nvmlInit": 10.0, "nvmlInitWithFlags": 10.0, "nvmlInit_v2": 10.0,
                                               "nvmlShutdown": 10.0}
MAX_LANES = 65                 # 64 GPUs (or MIG handles) plus the library lane
IDLE_EXIT_S = 10.0             # a lane with no call for this long ends its thread
SHARED_SLOW_S = 0.02           # a call on the shared lane running longer moves its GPU to a lane of its own
WATCH_MAX_S = 0.5              # a reader's calls are checked at least this often (deadline / 2 if sooner)
_PURE = frozenset({"nvmlExceptionClass", "nvmlStructToFriendlyObject", "nvmlFriendlyObjectToStruct",
                   "nvmlErrorString"})   # pure Python helpers: no driver, nothing to hang
_LIB: Hashable = "lib"
_OVERFLOW: Hashable = "overflow"
_SHARED: Hashable = "shared"
_SCALARS = (int, float, str, bytes, list, tuple, type(None))


@dataclass
class GuardStats:
    """Counts since the wrapper was built (a snapshot: ``NvmlDeadlines.stats()``)."""

    calls: int = 0
    timeouts: int = 0        # callers that waited their whole deadline
    fast_fails: int = 0      # calls refused at once because their lane was stale
    hung_now: int = 0        # lanes whose call has run past its deadline and not returned yet
    lanes: int = 0
    handoffs: int = 0        # jobs handed to a lane thread (a sampler's reader runs its own calls)


class _Job:
    __slots__ = ("fn", "args", "kwargs", "done", "value", "error", "abandoned", "deadline_s", "queued_at")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict, deadline_s: float) -> None:
        self.fn, self.args, self.kwargs, self.deadline_s = fn, args, kwargs, deadline_s
        self.done = threading.Lock()
        self.done.acquire()          # released by the lane when the call returns
        self.value: Any = None
        self.error: BaseException | None = None
        self.abandoned = False       # its caller gave up while it waited in the queue
        self.queued_at = 0.0         # time.monotonic() when it was handed to its lane


class _Part:
    """One GPU's share of a batch: ``fn()`` and its outcome."""

    __slots__ = ("key", "fn", "value", "error", "started_at", "finished", "abandoned")

    def __init__(self, key: Hashable, fn: Callable[[], Any]) -> None:
        self.key, self.fn = key, fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.finished = False
        self.abandoned = False       # its caller gave up on it (its GPU is hung)


class _Batch(_Job):
    """Several GPUs' parts, run in order on the shared lane; ``done`` is released once the
    lane stops taking parts (all run, or the rest were handed elsewhere: ``cut``)."""

    __slots__ = ("parts", "next", "cut", "current", "lane", "guard")

    def __init__(self, parts: list[_Part], deadline_s: float) -> None:
        super().__init__(self._run_parts, (), {}, deadline_s)
        self.parts = parts
        self.next = 0                # index of the next part to start
        self.cut = len(parts)        # the lane starts no part at or past this index
        self.current: _Part | None = None
        self.lane: _Lane | None = None
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


class _OnLane(threading.local):
    inline = False                   # True on a lane's own thread: nested calls run there directly


class _Lane:
    """One daemon thread that runs the calls of one handle, in order. It retires after
    ``IDLE_EXIT_S`` without calls (meters come and go; their lanes must not pile up)."""

    def __init__(self, owner: "NvmlDeadlines", key: Hashable, name: str) -> None:
        self.owner, self.key = owner, key
        self.queue: SimpleQueue[_Job] = SimpleQueue()
        self.running: _Job | None = None
        self.started_at = 0.0        # time.monotonic() when ``running`` began
        self.thread = threading.Thread(target=self._run, name=f"wattmeter-nvml-{name}", daemon=True)
        self.thread.start()

    def stale(self, now: float) -> bool:
        """Its call in progress is hung: its caller gave up on it, or it is past its deadline."""
        job = self.running
        return job is not None and (job.abandoned or now - self.started_at > job.deadline_s)

    def _run(self) -> None:
        self.owner._on_lane.inline = True     # a batch's NVML calls run here, under its deadline
        while True:
            try:
                job = self.queue.get(timeout=IDLE_EXIT_S)
            except Empty:
                if self.owner._retire(self):
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


class NvmlDeadlines:
    """The lanes, deadlines and counts behind one wrapped module."""

    def __init__(self, nvml: Any, deadline_s: float = DEFAULT_DEADLINE_S,
                 deadlines: Mapping[str, float] | None = None, max_lanes: int = MAX_LANES) -> None:
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        self.nvml = nvml
        self.deadline_s = deadline_s
        self.deadlines = dict(SLOW_CALL_DEADLINES_S if deadlines is None else deadlines)
        self.max_lanes = max_lanes
        self._lanes: dict[Hashable, _Lane] = {}
        self._lock = threading.Lock()
        self._stats = GuardStats()
        self._inline_ident: int | None = None
        self._on_lane = _OnLane()
        self._own: set[Hashable] = set()              # GPUs that left the shared lane (a call ran slow)
        self._left: dict[Hashable, _Part] = {}        # per GPU: the slow call it left behind, while it runs
        # Readers (sensors/base.py) running calls themselves: each one's call in progress, which
        # the watchdog thread checks against the deadline.
        self._readers: weakref.WeakKeyDictionary[Reader, list[Any]] = weakref.WeakKeyDictionary()
        self._watchdog: threading.Thread | None = None
        self._last_inline = 0.0

    @contextlib.contextmanager
    def inline(self) -> Iterator[None]:
        """Calls from this thread run on it directly, without lanes or deadlines, for the block.
        For a thread that is itself disposable (background discovery, which its caller waits on
        with a timeout): it saves a hand-off per discovery call (~5 ms per meter start)."""
        self._inline_ident = threading.get_ident()
        try:
            yield
        finally:
            self._inline_ident = None

    def stats(self) -> GuardStats:
        now = time.monotonic()
        with self._lock:
            hung = sum(1 for lane in self._lanes.values() if lane.stale(now))
            hung += sum(1 for key in list(self._left) if self._left_hung(key, now))
            s = self._stats
            return GuardStats(s.calls, s.timeouts, s.fast_fails, hung, len(self._lanes), s.handoffs)

    def stale(self, handle: Any) -> bool:
        """Whether calls on ``handle`` fail fast right now (a call on it is hung)."""
        key, now = _lane_key(handle), time.monotonic()
        lane = self._lanes.get(key)
        with self._lock:
            left = self._left_hung(key, now)
        return left or (lane is not None and lane.stale(now))

    def _left_hung(self, key: Hashable, now: float) -> bool:
        """Whether the call ``key``'s GPU left behind on a shared lane still hangs (its caller
        gave up on it, or it is past its deadline). Forgotten once it returns. Lock held."""
        part = self._left.get(key)
        if part is None:
            return False
        if part.finished:
            del self._left[key]
            return False
        return part.abandoned or now - part.started_at > self.deadline_s

    def _timeout(self) -> BaseException:
        return self.nvml.NVMLError(self.nvml.NVML_ERROR_TIMEOUT)

    def _lane_locked(self, key: Hashable) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None and len(self._lanes) >= self.max_lanes:
            key = _OVERFLOW
            lane = self._lanes.get(key)
        if lane is None:
            name = str(key) if key in (_LIB, _OVERFLOW, _SHARED) else str(len(self._lanes))
            lane = self._lanes[key] = _Lane(self, key, name)
        return lane

    def _retire(self, lane: _Lane) -> bool:
        """Called by an idle lane: end it unless a call arrived meanwhile. Jobs are queued with
        the lock held, so a job is either seen here or given to a new lane."""
        with self._lock:
            if not lane.queue.empty():
                return False
            if self._lanes.get(lane.key) is lane:
                del self._lanes[lane.key]
            return True

    def call(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self._on_lane.inline or (self._inline_ident is not None and self._inline_ident == threading.get_ident()):
            return fn(*args, **kwargs)
        key = _lane_key(args[0]) if args else _LIB
        return self.wait(self._submit(key, fn, args, kwargs, self.deadlines.get(name, self.deadline_s)))

    def run_each(self, calls: Sequence[tuple[Any, Callable[[], Any]]]) -> list[Any]:
        """Run ``fn()`` for each ``(handle, fn)``, every NVML call it makes on a lane under one
        deadline, and return each outcome in order: its value, or the exception it raised (the
        vendor's timeout error where its GPU hung or is stale). GPUs on the shared lane cost one
        hand-off for all; a GPU whose call ran slow there has its own lane (module docstring).
        Waits at most one deadline in all."""
        if self._on_lane.inline:
            raise RuntimeError("run_each() from a lane's own thread would wait on itself")
        reader = current_reader()
        if reader is not None:
            return self._run_on_reader(reader, calls)
        out: list[Any] = [None] * len(calls)
        jobs: list[tuple[int, _Job]] = []
        parts: list[tuple[int, _Part]] = []
        now = time.monotonic()
        with self._lock:
            for i, key, fn in self._sort_calls_locked(calls, now, out, jobs):
                parts.append((i, _Part(key, fn)))
            batch = self._queue_batch_locked([p for _, p in parts], self.deadline_s, now) if parts else None
        end = now + self.deadline_s
        if batch is not None:
            self._wait_batch(batch, end)
            for i, part in parts:
                out[i] = part.error if part.error is not None else part.value
        return self._collect(jobs, out)

    def _sort_calls_locked(self, calls: Sequence[tuple[Any, Callable[[], Any]]], now: float, out: list[Any],
                           jobs: list[tuple[int, "_Job"]]) -> list[tuple[int, Hashable, Callable[[], Any]]]:
        """Each call of a batch: failed at once where its GPU is hung or stale (into ``out``),
        queued on the GPU's own lane where it has one (into ``jobs``), else returned as
        (index, lane key, call) for the caller to run together with the others."""
        rest = []
        for i, (handle, fn) in enumerate(calls):
            key = _lane_key(handle)
            self._stats.calls += 1
            lane = self._lanes.get(key)
            if self._left_hung(key, now) or (lane is not None and lane.stale(now)):
                self._stats.fast_fails += 1
                out[i] = self._timeout()
            elif key in self._own:
                jobs.append((i, self._queue_locked(key, _Job(fn, (), {}, self.deadline_s), now)))
            else:
                rest.append((i, key, fn))
        return rest

    def _run_on_reader(self, reader: Reader, calls: Sequence[tuple[Any, Callable[[], Any]]]) -> list[Any]:
        """``run_each`` on a replaceable reader thread: the calls run right here, no hand-off.
        The watchdog abandons the reader if one hangs past the deadline (its GPU then fails
        fast until the call returns, and has a lane of its own from then on); a GPU whose call
        ran slow gets its own lane too, so slow GPUs are read side by side."""
        out: list[Any] = [None] * len(calls)
        jobs: list[tuple[int, _Job]] = []
        here: list[tuple[int, Hashable, Callable[[], Any]]] = []
        now = time.monotonic()
        with self._lock:
            slot = self._readers.get(reader)
            if slot is None:     # [GPU key of the call in progress, its start, the call left to hang]
                slot = self._readers[reader] = [None, 0.0, None]
            self._last_inline = now
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="wattmeter-nvml-watchdog", daemon=True)
                self._watchdog.start()
            here.extend(self._sort_calls_locked(calls, now, out, jobs))
        slow: list[Hashable] = []
        clock, lock = time.monotonic, self._lock
        self._on_lane.inline = True      # their NVML calls run here, under the watchdog
        try:
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
                if clock() - started > SHARED_SLOW_S:
                    slow.append(key)
                out[i] = value
        finally:
            self._on_lane.inline = False
        if slow:
            with self._lock:
                self._own.update(slow)
        return self._collect(jobs, out)

    def _collect(self, jobs: list[tuple[int, "_Job"]], out: list[Any]) -> list[Any]:
        """Wait for the calls queued on GPUs' own lanes: each answer, or its error, into ``out``."""
        for i, job in jobs:
            try:
                out[i] = self.wait(job)
            except BaseException as exc:
                out[i] = exc
        return out

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
                        part = _Part(key, _never)
                        part.started_at, part.abandoned = started, True
                        slot[2] = part   # its reader marks it finished once the call returns
                        self._own.add(key)
                        self._left[key] = part
                        self._stats.timeouts += 1
                        del self._readers[reader]
                        hung.append(reader)
                idle = not hung and now - self._last_inline > IDLE_EXIT_S and \
                    not any(slot[0] is not None for slot in self._readers.values())
                if idle:
                    self._watchdog = None
            for reader in hung:
                reader.abandon()         # the sampler starts a fresh reader thread
            if idle:
                return

    def _queue_batch_locked(self, parts: list[_Part], deadline_s: float, now: float) -> _Batch:
        batch = _Batch(parts, deadline_s)
        self._stats.handoffs += 1
        lane = self._lane_locked(_SHARED)
        batch.lane = lane
        batch.queued_at = now
        lane.queue.put(batch)
        return batch

    def _wait_batch(self, batch: _Batch, end: float) -> None:
        """Wait for a batch until ``end``, moving a GPU whose call runs slow off the shared lane
        (the rest go on at once on a fresh one). Parts never finished get the timeout error."""
        slow = min(SHARED_SLOW_S, self.deadline_s / 2)
        waiting = [batch]
        while waiting:
            b = waiting[0]
            left = end - time.monotonic()
            if left > 0 and b.done.acquire(timeout=min(left, slow)):
                waiting.pop(0)
                continue
            now = time.monotonic()
            if now < end:
                rest = self._leave_slow_call(b, now, slow)
                if rest is not None:
                    waiting.append(rest)
                continue
            # Past the deadline: a call still running is left to hang (its GPU is stale until
            # it returns), parts never started are skipped by their lane, and every part not
            # finished is a timeout.
            with self._lock:
                for w in waiting:
                    self._leave_slow_call_locked(w, now, 0.0, requeue=False)
                    w.abandoned = True
                    for part in w.parts:
                        if not part.finished:
                            part.abandoned = True
                            part.error = self._timeout()
                            self._stats.timeouts += 1
            return

    def _leave_slow_call(self, batch: _Batch, now: float, slow: float) -> _Batch | None:
        with self._lock:
            return self._leave_slow_call_locked(batch, now, slow, requeue=True)

    def _leave_slow_call_locked(self, batch: _Batch, now: float, slow: float, requeue: bool) -> _Batch | None:
        """If the batch's call in progress has run ``slow`` seconds, leave that call to its lane
        (whose thread ends once it returns) and give its GPU a lane of its own; with ``requeue``
        the parts not yet started go on at once as a new batch on a fresh shared lane
        (returned), without it (past the deadline) they are not started at all."""
        with batch.guard:
            part = batch.current
            slow_now = part is not None and not part.finished and now - part.started_at >= slow
            if slow_now and self._left.get(part.key) is not part:
                self._own.add(part.key)
                self._left[part.key] = part
                old = batch.lane
                if old is not None and self._lanes.get(_SHARED) is old:
                    del self._lanes[_SHARED]
                    self._move_queued(old)
            if not requeue:
                batch.cut = batch.next
                return None
            if not slow_now:
                return None
            rest = batch.parts[batch.next:batch.cut]
            batch.cut = batch.next       # its old lane starts no more of them
        return self._queue_batch_locked(rest, batch.deadline_s, batch.queued_at) if rest else None

    def _move_queued(self, old: _Lane) -> None:
        """Jobs queued behind a call that was left to hang go to the fresh shared lane."""
        while True:
            try:
                job = old.queue.get_nowait()
            except Empty:
                return
            lane = self._lane_locked(_SHARED)
            if isinstance(job, _Batch):
                job.lane = lane
            lane.queue.put(job)

    def _submit(self, key: Hashable, fn: Callable[..., Any], args: tuple, kwargs: dict, deadline: float) -> "_Job":
        job = _Job(fn, args, kwargs, deadline)
        with self._lock:
            self._stats.calls += 1
            now = time.monotonic()
            lane = self._lanes.get(key)
            if self._left_hung(key, now) or (lane is not None and lane.stale(now)):
                self._stats.fast_fails += 1
                raise self._timeout()
            return self._queue_locked(key, job, now)

    def _queue_locked(self, key: Hashable, job: _Job, now: float) -> _Job:
        job.queued_at = now
        self._stats.handoffs += 1
        self._lane_locked(key).queue.put(job)
        return job

    def wait(self, job: "_Job") -> Any:
        """The result of a submitted job, waiting at most what is left of its deadline (counted
        from when it was submitted); past it, the vendor's timeout error."""
        left = job.deadline_s - (time.monotonic() - job.queued_at)
        if not job.done.acquire(timeout=max(0.0, left)):
            job.abandoned = True     # if still queued, the lane skips it
            with self._lock:
                self._stats.timeouts += 1
            raise self._timeout()
        if job.error is not None:
            raise job.error
        return job.value


def _never() -> None:   # the call of a part made only to mark a hung reader call
    raise AssertionError("not run")


def _lane_key(arg: Any) -> Hashable:
    """A device call's lane: its handle. Real handles are ctypes pointers (a new object per
    lookup, so key by address); the fake's are plain objects, one per GPU."""
    if isinstance(arg, _SCALARS):
        return _LIB
    if isinstance(arg, ctypes._Pointer):
        return ("ptr", ctypes.cast(arg, ctypes.c_void_p).value)
    return ("obj", id(arg))


def with_deadlines(nvml: Any, deadline_s: float = DEFAULT_DEADLINE_S,
                   deadlines: Mapping[str, float] | None = None, max_lanes: int = MAX_LANES) -> types.ModuleType:
    """A ``pynvml`` module (or the fake's) whose driver calls have deadlines. Every other name
    (constants, error classes, structs, ``WATTMETER_FAKE``) is the wrapped module's own.
    ``module.WATTMETER_DEADLINES`` is the ``NvmlDeadlines`` (stats, stale handles)."""
    guard = NvmlDeadlines(nvml, deadline_s, deadlines, max_lanes)
    mod = types.ModuleType(getattr(nvml, "__name__", "pynvml"), getattr(nvml, "__doc__", None))
    source = vars(nvml) if isinstance(nvml, types.ModuleType) else {n: getattr(nvml, n) for n in dir(nvml)}
    skip = {"__name__", "__spec__", "__loader__", "__package__", "__builtins__", "__cached__", "__doc__"}
    ns = mod.__dict__
    for name, value in source.items():
        if name in skip:
            continue
        if name.startswith("nvml") and callable(value) and name not in _PURE and not isinstance(value, type):
            value = _wrap(guard, name, value)
        ns[name] = value
    mod.WATTMETER_DEADLINES = guard
    return mod


def _wrap(guard: NvmlDeadlines, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def with_deadline(*args: Any, **kwargs: Any) -> Any:
        return guard.call(name, fn, args, kwargs)

    with_deadline.__name__ = with_deadline.__qualname__ = name
    with_deadline.__doc__ = getattr(fn, "__doc__", None)
    with_deadline.__wrapped__ = fn   # inspect.signature sees pynvml's own signature
    return with_deadline
