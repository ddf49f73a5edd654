"""The Meter: sensors -> sampler -> ledger -> windows, plus tokens. And the default meter.

    with wattmeter.measure("epoch"):
        train_one_epoch()

    @wattmeter.measure("infer")
    async def infer(...): ...
"""
from __future__ import annotations

import atexit
import functools
import inspect
import os
import threading
from collections import Counter
from typing import Any, Callable, Mapping, Sequence, TypeVar

from .clock import Clock, SystemClock
from .ledger import DeviceSnapshot, Ledger, Mark
from .model import WindowResult
from .projection import Projection, StepProgress, energy_so_far_j
from .value import ValueCounter
from .sampler import Sampler, SensorStatus
from .sensors.base import Sensor
from .windows import Window, device_energies

F = TypeVar("F", bound=Callable[..., Any])


class Meter:
    """Meters a set of sensors. ``start()``/``stop()`` are idempotent and a stopped meter restarts."""

    def __init__(self, sensors: Sequence[Sensor] | None = None, *, clock: Clock | None = None,
                 seed: int | None = None, notes: Sequence[str] = (), pid: int | None = None,
                 fake_gpus: int | None = None, scenario: str | None = None) -> None:
        """``fake_gpus=N`` (1..64) or ``scenario="h100x2"`` (a file or bundled name) meters
        simulated GPUs, as ``run --fake-gpus`` / ``--fake-nvml`` do; results say simulated."""
        if sensors is None:
            from .config import checked_fake_request
            from .discovery import SensorPlan, discover

            fake_gpus, scenario = checked_fake_request(fake_gpus, scenario)
            found = discover(SensorPlan(pid=pid, fake_gpus=fake_gpus, fake_scenario=scenario))
            sensors, notes = found.sensors, [*notes, *found.notes]
        self.sensors = list(sensors)
        self.notes = list(notes)
        self.clock: Clock = clock or SystemClock()
        self.ledger = Ledger()
        self.sampler = Sampler(self.sensors, self.ledger, self.clock, seed=seed)
        self._tokens: Counter[str] = Counter()
        self._tokens_lock = threading.Lock()
        self._closed = False
        self.values = ValueCounter()           # decisions: add_value()
        self.job_progress = StepProgress()     # decisions: progress() -> projection to completion

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "Meter":
        if self._closed:
            raise RuntimeError("this meter was closed; create a new one")
        if not self.sampler.running:
            self.sampler.tick()          # a first point per device, so the first window has an edge
            self.sampler.start()
        return self

    def stop(self) -> None:
        """Stop sampling (idempotent). Open windows keep their start; ``start()`` resumes."""
        if self.sampler.running:
            self.sampler.stop()
        self.ledger.force_resolve_all()

    def close(self) -> None:
        self.stop()
        if not self._closed:
            self._closed = True
            for s in self.sensors:
                s.close()

    def __enter__(self) -> "Meter":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.sampler.running

    def poll(self, now: float | None = None) -> None:
        """Read every sensor once on this thread (for virtual-clock tests and manual stepping)."""
        self.sampler.tick(now)

    # -- windows and tokens ------------------------------------------------------
    def window(self, name: str = "window", labels: Mapping[str, str] | None = None) -> Window:
        """A begun window. End it with ``.end()`` or use it as a context manager."""
        return Window(self, name, labels).begin()

    def measure(self, name: str | None = None, **kw: Any) -> "measure":
        return measure(name, meter=self, **kw)

    def add_tokens(self, n: int, kind: str = "generation") -> None:
        """Count tokens; every window open now gets them. ``kind`` is "generation" or "prompt"."""
        if n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        with self._tokens_lock:
            self._tokens[kind] += int(n)

    def add_value(self, n: float, unit: str = "samples") -> None:
        """Value delivered (samples, images, an eval score); see wattmeter.value and docs/decisions.md."""
        self.values.add(n, unit)

    def progress(self, fraction: float) -> "Projection | None":
        """Job progress in [0, 1]; returns the projection to completion once there is one."""
        return self.job_progress.fraction(self.clock.now(), fraction, energy_so_far_j(self.snapshot()))

    @property
    def tokens(self) -> dict[str, int]:
        return self._token_counts()

    # -- reading -----------------------------------------------------------------
    def snapshot(self) -> dict[str, DeviceSnapshot]:
        return self.ledger.snapshot()

    @property
    def status(self) -> dict[str, SensorStatus]:
        return self.sampler.status

    @property
    def simulated(self) -> bool:
        return any(d.simulated for d in self.ledger.devices)

    # -- internals used by Window ------------------------------------------------
    def _mark(self) -> Mark:
        return self.ledger.mark(self.clock.now())

    def _token_counts(self) -> dict[str, int]:
        with self._tokens_lock:
            return dict(self._tokens)

    def _edge_waiting(self) -> None:
        self.sampler.poke()

    def settle_timeout_s(self) -> float:
        slowest = max((s.period_s for s in self.sensors), default=0.1)
        return 2.0 * slowest + 0.5

    def _compute(self, name: str, start: Mark, end: Mark, tokens0: Mapping[str, int],
                 tokens1: Mapping[str, int], timeout_s: float | None) -> WindowResult:
        for m in (start, end):
            if not m.done.is_set():
                if self.sampler.running:
                    self.sampler.poke()
                    m.done.wait(self.settle_timeout_s() if timeout_s is None else timeout_s)
                if not m.done.is_set():
                    self.ledger.force_resolve(m)
        devices, approx = device_energies(self, start, end)
        tokens = {k: tokens1.get(k, 0) - tokens0.get(k, 0) for k in tokens1}
        return WindowResult(name=name, start_t=start.t, end_t=end.t, start_wall=self.clock.wall(start.t),
                            end_wall=self.clock.wall(end.t), devices=devices,
                            tokens={k: v for k, v in tokens.items() if v},
                            approximate=approx, simulated=any(d.simulated for d in self.ledger.devices))


class measure:
    """Meter a block or every call of a function (sync or async).

    As a context manager it yields the Window; after the block, ``window.result()`` has the figures.
    As a decorator, each call gets its own window; the last one is ``fn.last_window`` and
    ``on_result`` (if given) is called with each result.
    """

    def __init__(self, name: str | None = None, *, meter: Meter | None = None,
                 labels: Mapping[str, str] | None = None,
                 on_result: Callable[[WindowResult], None] | None = None) -> None:
        self.name = name
        self._meter = meter
        self.labels = labels
        self.on_result = on_result
        self._local = threading.local()

    @property
    def meter(self) -> Meter:
        return self._meter or get_meter()

    def __enter__(self) -> Window:
        stack = self._local.__dict__.setdefault("stack", [])
        w = self.meter.window(self.name or "block", self.labels)
        stack.append(w)
        return w

    def __exit__(self, *exc: object) -> None:
        w = self._local.stack.pop()
        w.end()
        if self.on_result is not None:
            self.on_result(w.result())

    def __call__(self, fn: F) -> F:
        name = self.name or getattr(fn, "__qualname__", "call")

        def finish(w: Window) -> None:
            w.end()
            wrapper.last_window = w  # type: ignore[attr-defined]
            if self.on_result is not None:
                self.on_result(w.result())

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                w = self.meter.window(name, self.labels)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    finish(w)
        else:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                w = self.meter.window(name, self.labels)
                try:
                    return fn(*args, **kwargs)
                finally:
                    finish(w)

        wrapper.last_window = None  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]


_default: Meter | None = None
_default_lock = threading.Lock()


def get_meter() -> Meter:
    """The process-wide default meter, created and started on first use. It meters the GPUs
    this process can see and this process tree's share of CPU and RAM."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Meter(pid=os.getpid()).start()
            atexit.register(_default.close)
        return _default
