"""The Meter: sensors -> sampler -> ledger -> windows, plus tokens. And the default meter.

    with wattmeter.measure("epoch"):
        train_one_epoch()

    @wattmeter.measure("infer")
    async def infer(...): ...

    # the settings `run` has, as keyword arguments: each window's record appended to a JSONL file
    with wattmeter.measure("epoch", records="runs.jsonl", zone="FR", pue=1.2):
        train_one_epoch()
"""
from __future__ import annotations

import functools
import inspect
import os
import threading
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from .clock import Clock, SystemClock
from .ledger import DeviceSnapshot, Ledger
from .model import Component, WindowResult
from .projection import Projection, StepProgress, energy_so_far_j
from .value import ValueCounter
from .sampler import Sampler, SensorStatus
from .sensors.base import Sensor
from .windows import Edge, Window, device_energies

if TYPE_CHECKING:  # pragma: no cover
    from .carbon.accounting import CarbonResult
    from .compose import WindowRecorder
    from .requests import Request, RequestAccountant

F = TypeVar("F", bound=Callable[..., Any])


class Meter:
    """Meters a set of sensors. ``start()``/``stop()`` are idempotent and a stopped meter restarts."""

    def __init__(self, sensors: Sequence[Sensor] | None = None, *, clock: Clock | None = None,
                 seed: int | None = None, notes: Sequence[str] = (), pid: int | None = None,
                 fake_gpus: int | None = None, scenario: str | os.PathLike[str] | None = None,
                 interval_s: float | None = None, records: str | os.PathLike[str] | None = None,
                 csv: str | os.PathLike[str] | None = None, zone: str | None = None, cloud: str | None = None,
                 pue: float | None = None) -> None:
        """``fake_gpus=N`` (1..64) or ``scenario="h100x2"`` (a file or bundled name) meters
        simulated GPUs, as ``run --fake-gpus`` / ``--fake-nvml`` do; results say simulated.

        The settings ``run`` has, as keyword arguments (checked as ``run`` checks its flags; a
        bad value is a ``ValueError`` with ``run``'s one-line message): ``records=`` (a JSONL
        path: every window ``measure()`` ends on this meter appends ``run``'s record there),
        ``csv=``, ``zone=``, ``cloud=`` and ``pue=`` (the records' carbon, and
        :meth:`carbon_of`)."""
        from .compose import window_recorder
        from .config import checked_argument, interval_s as parse_interval

        # checked first: a bad setting fails before any sensor is opened
        if interval_s is not None:
            interval_s = checked_argument("interval_s", interval_s, parse_interval)
        self.recorder: "WindowRecorder | None" = window_recorder(records=records, csv=csv, zone=zone, cloud=cloud,
                                                                  pue=pue)
        self.clock: Clock = clock or SystemClock()
        # Set-up (sensor discovery) counts: a window opened at construction starts here.
        self.created_t = self.clock.now()
        self.started_t: float | None = None
        discovered = sensors is None
        if sensors is None:
            from .compose import discover_sensors

            sensors, found_notes = discover_sensors(pid=pid, fake_gpus=fake_gpus, scenario=scenario, clock=clock)
            notes = [*notes, *found_notes]
        elif fake_gpus is not None or scenario is not None:
            raise ValueError("pass either sensors or fake_gpus/scenario, not both")
        self.sensors = list(sensors)
        self.notes = list(notes)
        self.ledger = Ledger()
        # interval_s (--interval) sets every sensor's cadence (see sensors/base.py).
        self.sampler = Sampler(self.sensors, self.ledger, self.clock, seed=seed, interval_s=interval_s)
        self._tokens: Counter[str] = Counter()
        self._tokens_lock = threading.Lock()
        self._requests: "RequestAccountant | None" = None
        self._closed = False
        self.values = ValueCounter()           # decisions: add_value()
        self.job_progress = StepProgress()     # decisions: progress() -> projection to completion
        if discovered:
            _warn_if_no_gpu(self)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "Meter":
        if self._closed:
            raise RuntimeError("this meter was closed; create a new one")
        if not self.sampler.running:
            if self.started_t is None:
                self.started_t = self.clock.now()
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
    def window(self, name: str = "window", labels: Mapping[str, str] | None = None,
               at: float | None = None) -> Window:
        """A begun window (from ``at`` on this meter's clock, default now). End it with
        ``.end()`` or use it as a context manager."""
        return Window(self, name, labels).begin(at)

    def measure(self, name: str | None = None, **kw: Any) -> "measure":
        """``measure(name, meter=self, ...)``: the same keyword arguments."""
        return measure(name, meter=self, **kw)

    def request(self, request_id: str, model: str = "default") -> "Request":
        """Per-request energy in a batched server: ``with meter.request(id) as r: r.add_tokens(n)``.
        Overlapping requests share each GPU's energy (see wattmeter.requests)."""
        from .requests import RequestAccountant

        with self._tokens_lock:
            if self._requests is None:
                self._requests = RequestAccountant(self)
        return self._requests.request(request_id, model)

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
        with self._tokens_lock:
            return dict(self._tokens)

    # -- the settings `run` has ----------------------------------------------------
    def carbon_of(self, result: WindowResult) -> "CarbonResult | None":
        """CO2e of ``result`` with this meter's ``zone=``/``cloud=``/``pue=`` (else
        ``WATTMETER_ZONE``..., the config file, then the world average, as in ``run``)."""
        if self.recorder is None:
            from .compose import window_recorder

            self.recorder = window_recorder(always=True)
        return self.recorder.carbon_of(result)

    def write_record(self, window: Window, failed: bool = False) -> None:
        """Append an ended window's record to ``records=`` (``measure()`` does this itself)."""
        if self.recorder is not None:
            self.recorder.write(window.result(), window.labels, failed)

    # -- reading -----------------------------------------------------------------
    def snapshot(self) -> dict[str, DeviceSnapshot]:
        """Each device's E at this instant (a pure read). While sampling, the newest readings
        are carried to now (a scrape's time); a stopped meter reports its last reading."""
        return self.ledger.snapshot(self.clock.now() if self.sampler.running else None)

    @property
    def status(self) -> dict[str, SensorStatus]:
        return self.sampler.status

    @property
    def simulated(self) -> bool:
        return any(d.simulated for d in self.ledger.devices)

    # -- edges and results (what windows are made of) ----------------------------
    def edge(self, at: float | None = None) -> Edge:
        """Pin every device's energy and the token counts at ``at`` (default now); O(1), no
        sensor call. The sampler is asked for a prompt read so the edge resolves soon."""
        edge = Edge(self.ledger.mark(self.clock.now() if at is None else at), self.tokens)
        self.sampler.poke()
        return edge

    def settle_timeout_s(self) -> float:
        """How long a result waits for its edges to resolve before pinning them from estimates
        (flagged approximate): two reads of the slowest sensor and 0.5 s, or longer where a
        device settles later (a counter-less GPU's mean covers an instant ~0.5-0.6 s on; at
        0.54 s, half its windows timed out by a few ms and were flagged)."""
        slowest = max((s.period_s for s in self.sensors), default=0.1)
        return 2.0 * slowest + max(0.5, self.ledger.settle_lag_s() + 0.2)

    def result_between(self, name: str, start: Edge, end: Edge, timeout_s: float | None = None) -> WindowResult:
        """The figures between two edges, waiting (bounded) until the sampler covers both."""
        for m in (start.mark, end.mark):
            if not m.done.is_set():
                if self.sampler.running:
                    self.sampler.poke()
                    m.done.wait(self.settle_timeout_s() if timeout_s is None else timeout_s)
                if not m.done.is_set():
                    self.ledger.force_resolve(m)
        devices, approx = device_energies(self.ledger, start.mark, end.mark)
        tokens = {k: end.tokens.get(k, 0) - start.tokens.get(k, 0) for k in end.tokens}
        return WindowResult(name=name, start_t=start.mark.t, end_t=end.mark.t,
                            start_wall=self.clock.wall(start.mark.t), end_wall=self.clock.wall(end.mark.t),
                            devices=devices, tokens={k: v for k, v in tokens.items() if v},
                            approximate=approx, simulated=any(d.simulated for d in self.ledger.devices))


_warned_no_gpu = False


def _warn_if_no_gpu(meter: Meter) -> None:
    """Once per process, when discovery found no GPU: say that GPU energy is not metered, and why."""
    global _warned_no_gpu
    if _warned_no_gpu or any(d.component == Component.GPU for d in meter.ledger.devices):
        return
    _warned_no_gpu = True
    why = next((n for n in meter.notes if "GPU" in n), "no GPU sensor was found")
    warnings.warn(f"wattmeter meters no GPU: {why}", RuntimeWarning, stacklevel=3)


class measure:
    """Meter a block or every call of a function (sync or async).

    As a context manager it yields the Window; after the block, ``window.result()`` has the figures.
    As a decorator, each call gets its own window; the last one is ``fn.last_window`` and
    ``on_result`` (if given) is called with each result.

    ``records=``, ``csv=``, ``zone=``, ``cloud=`` and ``pue=`` are ``run``'s settings (see
    :class:`Meter`): each window's record is appended to ``records``, with status ``failed``
    when the block raised. Without them, the meter's own ``records=`` (if any) applies.
    """

    def __init__(self, name: str | None = None, *, meter: Meter | None = None,
                 labels: Mapping[str, str] | None = None,
                 on_result: Callable[[WindowResult], None] | None = None,
                 records: str | os.PathLike[str] | None = None, csv: str | os.PathLike[str] | None = None,
                 zone: str | None = None, cloud: str | None = None, pue: float | None = None) -> None:
        from .compose import window_recorder

        self.recorder: "WindowRecorder | None" = window_recorder(records=records, csv=csv, zone=zone, cloud=cloud,
                                                                  pue=pue)
        self.name = name
        self._meter = meter
        self.labels = labels
        self.on_result = on_result
        self._local = threading.local()

    @property
    def meter(self) -> Meter:
        return self._meter or get_meter()

    def _call_t(self) -> float:
        """The instant of the call, before a default meter is created (its set-up counts)."""
        return (self._meter.clock if self._meter is not None else _SYSTEM_CLOCK).now()

    def _finish(self, w: Window, failed: bool) -> None:
        w.end()
        recorder = self.recorder or w.meter.recorder
        if recorder is not None:
            recorder.write(w.result(), w.labels, failed)
        if self.on_result is not None:
            self.on_result(w.result())

    def __enter__(self) -> Window:
        stack = self._local.__dict__.setdefault("stack", [])
        t = self._call_t()
        w = self.meter.window(self.name or "block", self.labels, at=t)
        stack.append(w)
        return w

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._finish(self._local.stack.pop(), exc_type is not None)

    def __call__(self, fn: F) -> F:
        name = self.name or getattr(fn, "__qualname__", "call")

        def finish(w: Window, failed: bool) -> None:
            wrapper.last_window = w  # type: ignore[attr-defined]
            self._finish(w, failed)

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                t = self._call_t()
                w = self.meter.window(name, self.labels, at=t)
                failed = True
                try:
                    out = await fn(*args, **kwargs)
                    failed = False
                    return out
                finally:
                    finish(w, failed)
        else:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t = self._call_t()
                w = self.meter.window(name, self.labels, at=t)
                failed = True
                try:
                    out = fn(*args, **kwargs)
                    failed = False
                    return out
                finally:
                    finish(w, failed)

        wrapper.last_window = None  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]


_SYSTEM_CLOCK = SystemClock()   # the default meter's clock base (time.monotonic)
_default: Meter | None = None
_default_lock = threading.Lock()


def get_meter() -> Meter:
    """The process-wide default meter, created and started on first use. It meters the GPUs
    this process can see and this process tree's share of CPU and RAM."""
    global _default
    with _default_lock:
        if _default is None:
            from .compose import default_meter

            _default = default_meter()
        return _default
