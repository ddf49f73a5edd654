"""The deadline policy behind ``with_deadlines`` (sensors/guard.py): how long a caller waits,
which GPUs fail fast, and which move to a lane of their own.

``NvmlDeadlines.call`` hands one call to its handle's lane (sensors/guard_lanes.py) and waits
at most its deadline. ``run_each`` reads every GPU: on a sampler's reader thread the calls run
right there under the watchdog (sensors/guard_readers.py); from any other thread they run as
one batch on the shared lane, and a GPU whose call runs past ``SHARED_SLOW_S`` is left to its
thread while the rest go on at once on a fresh shared lane. A GPU whose call hung or ran slow
has a lane of its own from then on; one whose call is still hung fails fast (its lane or the
call it left behind is *stale*) until the call returns.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

from .base import Reader, current_reader
from .guard_lanes import LIB, MAX_LANES, SHARED, Batch, Job, Lanes, Part, lane_key
from .guard_readers import ReaderWatch

DEFAULT_DEADLINE_S = 1.0
# nvmlInit can take seconds on a board without persistence mode (the driver loads on demand).
SLOW_CALL_DEADLINES_S: Mapping[str, float] = {"nvmlInit": 10.0, "nvmlInitWithFlags": 10.0, "nvmlInit_v2": 10.0,
                                               "nvmlShutdown": 10.0}
SHARED_SLOW_S = 0.02           # a call on the shared lane running longer moves its GPU to a lane of its own


@dataclass
class GuardStats:
    """Counts since the wrapper was built (a snapshot: ``NvmlDeadlines.stats()``)."""

    calls: int = 0
    timeouts: int = 0        # callers that waited their whole deadline
    fast_fails: int = 0      # calls refused at once because their lane was stale
    hung_now: int = 0        # lanes whose call has run past its deadline and not returned yet
    lanes: int = 0
    handoffs: int = 0        # jobs handed to a lane thread (a sampler's reader runs its own calls)


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
        self._lock = threading.Lock()
        self._lanes = Lanes(self._lock, max_lanes)
        self._stats = GuardStats()
        self._inline_ident: int | None = None
        self._on_lane = self._lanes.on_lane
        self._own: set[Hashable] = set()              # GPUs that left the shared lane (a call ran slow)
        self._left: dict[Hashable, Part] = {}         # per GPU: the slow call it left behind, while it runs
        self._readers = ReaderWatch(self._lock, deadline_s, self._reader_call_hung_locked)

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
            hung = self._lanes.stale_count(now)
            hung += sum(1 for key in list(self._left) if self._left_hung(key, now))
            s = self._stats
            return GuardStats(s.calls, s.timeouts, s.fast_fails, hung, len(self._lanes), s.handoffs)

    def stale(self, handle: Any) -> bool:
        """Whether calls on ``handle`` fail fast right now (a call on it is hung)."""
        key, now = lane_key(handle), time.monotonic()
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

    def _leave_locked(self, part: Part) -> None:
        """``part``'s call is left to run on (hung or slow): its GPU fails fast while it hangs,
        and has a lane of its own from then on. Lock held."""
        self._own.add(part.key)
        self._left[part.key] = part

    def _reader_call_hung_locked(self, part: Part) -> None:
        """The watchdog left a reader's call to hang past the deadline. Lock held."""
        self._leave_locked(part)
        self._stats.timeouts += 1

    def _timeout(self) -> BaseException:
        return self.nvml.NVMLError(self.nvml.NVML_ERROR_TIMEOUT)

    def call(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self._on_lane.inline or (self._inline_ident is not None and self._inline_ident == threading.get_ident()):
            return fn(*args, **kwargs)
        key = lane_key(args[0]) if args else LIB
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
        jobs: list[tuple[int, Job]] = []
        parts: list[tuple[int, Part]] = []
        now = time.monotonic()
        with self._lock:
            for i, key, fn in self._sort_calls_locked(calls, now, out, jobs):
                parts.append((i, Part(key, fn)))
            batch = self._queue_batch_locked([p for _, p in parts], self.deadline_s, now) if parts else None
        end = now + self.deadline_s
        if batch is not None:
            self._wait_batch(batch, end)
            for i, part in parts:
                out[i] = part.error if part.error is not None else part.value
        return self._collect(jobs, out)

    def _sort_calls_locked(self, calls: Sequence[tuple[Any, Callable[[], Any]]], now: float, out: list[Any],
                           jobs: list[tuple[int, Job]]) -> list[tuple[int, Hashable, Callable[[], Any]]]:
        """Each call of a batch: failed at once where its GPU is hung or stale (into ``out``),
        queued on the GPU's own lane where it has one (into ``jobs``), else returned as
        (index, lane key, call) for the caller to run together with the others."""
        rest = []
        for i, (handle, fn) in enumerate(calls):
            key = lane_key(handle)
            self._stats.calls += 1
            lane = self._lanes.get(key)
            if self._left_hung(key, now) or (lane is not None and lane.stale(now)):
                self._stats.fast_fails += 1
                out[i] = self._timeout()
            elif key in self._own:
                jobs.append((i, self._queue_locked(key, Job(fn, (), {}, self.deadline_s), now)))
            else:
                rest.append((i, key, fn))
        return rest

    def _run_on_reader(self, reader: Reader, calls: Sequence[tuple[Any, Callable[[], Any]]]) -> list[Any]:
        """``run_each`` on a replaceable reader thread: the calls run right here, no hand-off.
        The watchdog abandons the reader if one hangs past the deadline (its GPU then fails
        fast until the call returns, and has a lane of its own from then on); a GPU whose call
        ran slow gets its own lane too, so slow GPUs are read side by side."""
        out: list[Any] = [None] * len(calls)
        jobs: list[tuple[int, Job]] = []
        now = time.monotonic()
        with self._lock:
            slot = self._readers.slot_locked(reader, now)
            here = self._sort_calls_locked(calls, now, out, jobs)
        self._on_lane.inline = True      # their NVML calls run here, under the watchdog
        try:
            slow = self._readers.run_here(slot, here, out, SHARED_SLOW_S)
        finally:
            self._on_lane.inline = False
        if slow:
            with self._lock:
                self._own.update(slow)
        return self._collect(jobs, out)

    def _collect(self, jobs: list[tuple[int, Job]], out: list[Any]) -> list[Any]:
        """Wait for the calls queued on GPUs' own lanes: each answer, or its error, into ``out``."""
        for i, job in jobs:
            try:
                out[i] = self.wait(job)
            except BaseException as exc:
                out[i] = exc
        return out

    def _queue_batch_locked(self, parts: list[Part], deadline_s: float, now: float) -> Batch:
        batch = Batch(parts, deadline_s)
        self._stats.handoffs += 1
        lane = self._lanes.lane_locked(SHARED)
        batch.lane = lane
        batch.queued_at = now
        lane.queue.put(batch)
        return batch

    def _wait_batch(self, batch: Batch, end: float) -> None:
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

    def _leave_slow_call(self, batch: Batch, now: float, slow: float) -> Batch | None:
        with self._lock:
            return self._leave_slow_call_locked(batch, now, slow, requeue=True)

    def _leave_slow_call_locked(self, batch: Batch, now: float, slow: float, requeue: bool) -> Batch | None:
        """If the batch's call in progress has run ``slow`` seconds, leave that call to its lane
        (whose thread ends once it returns) and give its GPU a lane of its own; with ``requeue``
        the parts not yet started go on at once as a new batch on a fresh shared lane
        (returned), without it (past the deadline) they are not started at all."""
        with batch.guard:
            part = batch.current
            slow_now = part is not None and not part.finished and now - part.started_at >= slow
            if slow_now and self._left.get(part.key) is not part:
                self._leave_locked(part)
                old = batch.lane
                if old is not None:
                    self._lanes.leave_shared_locked(old)
            if not requeue:
                batch.cut = batch.next
                return None
            if not slow_now:
                return None
            rest = batch.parts[batch.next:batch.cut]
            batch.cut = batch.next       # its old lane starts no more of them
        return self._queue_batch_locked(rest, batch.deadline_s, batch.queued_at) if rest else None

    def _submit(self, key: Hashable, fn: Callable[..., Any], args: tuple, kwargs: dict, deadline: float) -> Job:
        job = Job(fn, args, kwargs, deadline)
        with self._lock:
            self._stats.calls += 1
            now = time.monotonic()
            lane = self._lanes.get(key)
            if self._left_hung(key, now) or (lane is not None and lane.stale(now)):
                self._stats.fast_fails += 1
                raise self._timeout()
            return self._queue_locked(key, job, now)

    def _queue_locked(self, key: Hashable, job: Job, now: float) -> Job:
        job.queued_at = now
        self._stats.handoffs += 1
        self._lanes.lane_locked(key).queue.put(job)
        return job

    def wait(self, job: Job) -> Any:
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
