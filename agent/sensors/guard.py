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

The pieces: the module wrapper here; the deadline policy (``NvmlDeadlines``, what a caller
waits for and which GPUs fail fast) in guard_deadlines.py; the lane threads, jobs and batches
in guard_lanes.py; readers' own calls and their watchdog in guard_readers.py.
"""
from __future__ import annotations

import types
from typing import Any, Callable, Mapping

from .guard_deadlines import DEFAULT_DEADLINE_S, NvmlDeadlines
from .guard_lanes import MAX_LANES

_PURE = frozenset({"nvmlExceptionClass", "nvmlStructToFriendlyObject", "nvmlFriendlyObjectToStruct",
                   "nvmlErrorString"})   # pure Python helpers: no driver, nothing to hang


def with_deadlines(nvml: Any, deadline_s: float = DEFAULT_DEADLINE_S,
                   deadlines: Mapping[str, float] | None = None, max_lanes: int = MAX_LANES) -> types.ModuleType:
    """A ``pynvml`` module (or the fake's) whose driver calls have deadlines. Every other name
    (constants, error classes, structs, a fake's clock) is the wrapped module's own.
    ``module.WATTMETER_DEADLINES`` is the ``NvmlDeadlines`` (stats, stale handles)."""
    guard = NvmlDeadlines(nvml, deadline_s, deadlines, max_lanes)
    if isinstance(nvml, types.ModuleType):
        # type(nvml): a wrapped fake stays a ``SimulatedNvml`` (its clock is copied below)
        mod, source = type(nvml)(nvml.__name__, nvml.__doc__), vars(nvml)
    else:
        mod, source = types.ModuleType("pynvml"), {n: getattr(nvml, n) for n in dir(nvml)}
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
