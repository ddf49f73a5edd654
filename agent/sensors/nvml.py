"""NVIDIA GPUs through NVML (the ``pynvml`` module of nvidia-ml-py, or the fake drop-in).

Energy comes from the total-energy counter when the GPU has one (Volta and newer); otherwise
from instant power (field NVML_FI_DEV_POWER_INSTANT), else from ``nvmlDeviceGetPowerUsage``,
integrated by the ledger. NVML errors are translated to SensorError here and nowhere else.

``NvmlSensor`` is the facade: the cadence contract, references, processes and MIG. Finding
the GPUs is sensors/nvml_discovery.py; reading a counter GPU, sensors/nvml_counter.py; a GPU
with no counter, sensors/nvml_power.py.
"""
from __future__ import annotations

import math
import random
from types import ModuleType
from typing import Any, Callable

from ..clock import Clock, SystemClock
from ..model import Batch, Device, ProcessUsage, SensorError
from .base import DeadlineLanes, SensorUnavailable, SimulatedNvml
from .counter_timing import DENSE_START_S, Calibration
from .gpu_selection import GpuSelection
from .nvml_discovery import NvmlGpu, decode, discover_gpus
from .nvml_power import MIN_FIELD_PERIOD_S
from .nvml_processes import ProcessReader
from .power_evidence import PowerReference
from .quiet import QUIET_PERIOD_S, QuietEvidence, QuietSchedule

FIELD_PERIOD_S = 0.02
POWER_EARLY_S = 0.001   # a reader may wake this much before its planned time
PLAN_FRESH_S = 0.25     # a plan stands until the next read, or this long (its long-past filter)


def load_pynvml() -> ModuleType:
    import pynvml  # the fake installs itself as sys.modules["pynvml"], so this picks it up

    return pynvml


class NvmlSensor:
    """The NVML sensor; implements the ``ScheduledSensor`` cadence contract (sensors/base.py)."""

    name = "nvml"
    min_period_s = MIN_FIELD_PERIOD_S

    def __init__(self, nvml: ModuleType | None = None, selection: GpuSelection | None = None,
                 period_s: float = 0.1, power_period_s: float = 0.05,
                 wall: Callable[[float], float] | None = None, clock: Clock | None = None,
                 seed: int | None = None) -> None:
        self.nvml = nvml or self._import()
        # Maps the meter's clock to wall time, to date NVML's field timestamps.
        self.wall = wall or SystemClock().wall
        self.simulated = isinstance(self.nvml, SimulatedNvml)
        # Times the end of each counter call; the fake's own clock keeps virtual-time tests exact.
        self._clock: Clock = clock or (self.nvml.clock if isinstance(self.nvml, SimulatedNvml) else SystemClock())
        self.power_period_s = power_period_s
        self._rng = random.Random(seed)     # shifts counter pairs (sensors/counter_timing.py)
        # When GPUs whose power holds still are read (sensors/quiet.py); its own draws, so the
        # counter pairs' are the same whether or not a GPU goes quiet.
        self._quiet = QuietSchedule(random.Random(None if seed is None else f"quiet:{seed}"))
        err = self.nvml.NVMLError
        try:
            self.nvml.nvmlInit()
        except err as exc:
            raise SensorUnavailable("nvml", f"NVML could not start ({decode(str(exc))})",
                                    "install the NVIDIA driver, or use --fake-gpus N to try the GPU path") from exc
        try:
            self.driver_version = decode(self.nvml.nvmlSystemGetDriverVersion())
        except err:
            self.driver_version = "unknown"
        self._gpus: list[NvmlGpu] = discover_gpus(
            self.nvml, selection or GpuSelection.from_env(), wall=self.wall, clock=self._clock, rng=self._rng,
            power_period_s=self.power_period_s, simulated=self.simulated)
        if not self._gpus:
            raise SensorUnavailable("nvml", "no GPU is visible to this job",
                                    "check CUDA_VISIBLE_DEVICES, or use --fake-gpus N")
        self._has_counter = any(g.has_counter for g in self._gpus)
        self._quiets: list[QuietEvidence] = [(g.reader or g.power).quiet for g in self._gpus
                                             if g.reader is not None or g.power is not None]
        self._power_quiets = [g.power.quiet for g in self._gpus if g.power is not None]
        self._dense_power = False     # an edge waits (the last read was fast): power-only GPUs follow their fields
        self.period_s = period_s
        self._default_period_s = period_s
        self.set_period(period_s)
        self._calibration = Calibration()
        self._calibrating = False
        self._first_read: float | None = None
        self._edges_pending = False
        self._power_wait: frozenset[str] = frozenset()   # power-only GPUs whose planned read is still to come
        # (asked at, plan, the power-only GPUs in it): until the next read changes what it rests on
        self._plan_memo: tuple[float, tuple[float | None, float | None], frozenset[str]] | None = None
        # Where every NVML call has a deadline (sensors/guard.py), one read of every GPU is
        # handed to the lanes at once: one hand-off per read instead of one per call.
        lanes = vars(self.nvml).get("WATTMETER_DEADLINES") if isinstance(self.nvml, ModuleType) else None
        self._lanes: DeadlineLanes | None = lanes if isinstance(lanes, DeadlineLanes) else None
        self._processes = ProcessReader(self.nvml, [(g.device, g.handle) for g in self._gpus])

    @staticmethod
    def _import() -> ModuleType:
        try:
            return load_pynvml()
        except ImportError as exc:
            raise SensorUnavailable("nvml", "the nvidia-ml-py package is not installed",
                                    "pip install nvidia-ml-py") from exc

    def wants_fast(self, now: float) -> bool:
        """Calibration bursts while some counter's refresh phase is not locked
        (sensors/counter_timing.py)."""
        if not self._has_counter:
            return False
        return self._calibration.wants_fast(now, any(g.counter is not None and g.counter.unlocked for g in self._gpus))

    def references(self) -> dict[str, PowerReference]:
        """Per GPU, what its energy is measured from and why (``doctor`` prints these)."""
        out = {}
        for g in self._gpus:
            if g.power is not None:
                out[g.device.key] = g.power.reference
            elif g.reader is not None:
                out[g.device.key] = g.reader.reference
        return out

    # -- Sensor protocol -------------------------------------------------------
    def devices(self) -> list[Device]:
        return [g.device for g in self._gpus]

    def set_period(self, period_s: float) -> None:
        """The steady cadence (``--interval``). At the default, power-only GPUs are read faster
        than counters (DESIGN: 10-20 Hz instant power), and where they integrate field 186, a
        short mean that costs ~10 us to read, every value is read once (``next_read_at``). A
        longer period is a request for less CPU: every GPU is then read at that period (8
        power-only GPUs read at each 20 ms value cost ~4 % of a core), and power-only GPUs
        follow their fields only while an edge waits (``fast_edges``): read at the period
        alone, the edge kernels of 1.5 s jobs were shaped by two or three samples (10-32 %
        p90 on bursty loads at 0.5 s)."""
        period = max(period_s, self.min_period_s)
        self._follow_fields = period_s <= self._default_period_s   # every field value of power-only GPUs is read
        if self._follow_fields:
            if not all(g.has_counter for g in self._gpus):
                period = min(period, self.power_period_s)
            if any(g.power is not None and g.instant_ok for g in self._gpus):
                period = min(period, FIELD_PERIOD_S)
        self.period_s = period
        self._fast_edges = self._has_counter or not self._follow_fields

    @property
    def fast_edges(self) -> bool:
        """Read fast while an edge waits: counters (a pair at the next refresh), and power-only
        GPUs read at a longer period or gone quiet (sensors/quiet.py), which then follow their
        fields again. (A quiet power-only GPU read every ~0.1 s at an edge left the mean that
        resolves it, ~0.6 s on, to a forced estimate: 10-11 windows in 12 flagged approximate
        on a steady load in the robustness matrix, against 6-7 in 12 read at every value.)"""
        return self._fast_edges or any(q.engaged for q in self._power_quiets)

    def read_fast(self, now: float) -> Batch:
        return self.read(now, fast=True)

    def next_read_at(self, now: float) -> float | None:
        """When the sampler should read next: a scheduled counter read, or just after the next
        field-186 refresh of a power-only GPU (so every value is read once). None: no wish."""
        if self._first_read is None:
            self._first_read = now
        if now - self._first_read < DENSE_START_S and \
                any(g.counter is not None and not g.counter.tracker.dated for g in self._gpus):
            # Until a counter's first change is seen, read back to back: that change dates the
            # first point, which a new meter's first window edge is measured back from.
            return now
        times = [t for g in self._gpus if g.counter is not None and (t := g.counter.wish()) is not None]
        times += [t for g in self._gpus if g.reader is not None and (t := g.reader.field_wish()) is not None]
        times += [t for t in self._power_plan(now)[0] if t is not None]
        due = [t for t in times if t > now - 0.5]     # long-past wishes are not a reason to spin
        return min(due) if due else None

    def _power_plan(self, now: float) -> tuple[tuple[float | None, float | None], frozenset[str]]:
        """((the one read planned for the power-only GPUs whose values hold a period, the first
        wish of the others: read-stamped samples, due at their own times), the GPUs planned
        for, by device key). The planned read is as late as the first of them can wait: read
        each at its own time, 8 GPUs whose 20 ms values land at different phases woke the
        reader ~190 times a second and read every GPU each time (7 % of a core). Worked out
        once between two reads (each read changes what it rests on): the reader asks three
        times per wake-up and once more at the read, 8 window look-ups each time."""
        if not (self._follow_fields or self._dense_power):
            return (None, None), frozenset()   # a longer --interval: power-only GPUs at the steady cadence
        memo = self._plan_memo
        if memo is not None and now - memo[0] < PLAN_FRESH_S:
            return memo[1], memo[2]
        windows, others, planned = [], [], []
        for g in self._gpus:
            if g.power is None or (g.power.quiet.engaged and not self._dense_power):
                continue         # (a quiet GPU waits for the quiet read: cadence_floor)
            w = g.power.read_window()
            if w is not None:
                planned.append(g.device.key)
                if w[1] > now - 0.5:
                    windows.append(w)
            elif (t := g.power.next_read_at()) is not None:
                others.append(t)
        at = min(min(hi for _, hi in windows), max(lo for lo, _ in windows)) if windows else None
        plan, keys = (at, min(others) if others else None), frozenset(planned)
        self._plan_memo = (now, plan, keys)
        return plan, keys

    def cadence_floor(self, now: float) -> float:
        """Steady reads sooner than 0.8 periods after a GPU's last instant-power read skip it
        (``CounterReader.steady_floor``), a counter's own reads come as ``next_read_at`` wishes,
        power-only GPUs are read together at one planned time (``_power_plan``), and a GPU
        whose power holds still at its quiet period (sensors/quiet.py): before this time a
        steady read reads nothing (``CadenceFloor``, sensors/base.py). -inf where
        some GPU is read at every tick: an unshaped or faulted counter, one whose first change
        is not dated yet, or a power-only GPU whose field refresh is not known yet."""
        floor = math.inf
        gap = 0.8 * self.period_s
        (power_at, _), planned = self._power_plan(now)
        for g in self._gpus:
            if g.reader is not None:
                at = g.reader.steady_floor(gap, self._quiet)
            elif g.device.key in planned:
                # Read at the one time planned for every power-only GPU (next_read_at).
                at = -math.inf if power_at is None else power_at
            elif g.power is not None and g.power.quiet.engaged:
                at = self._quiet.due_t        # its power holds still (sensors/quiet.py)
            else:
                at = -math.inf
            if at == -math.inf:
                return at
            floor = min(floor, at)
        return floor

    def read(self, now: float, fast: bool = False) -> Batch:
        """Read every GPU once. ``fast`` (a window edge waits): also schedule a counter pair at
        the next refresh, so the edge resolves within ~0.1 s instead of at the next steady pair."""
        if fast:
            self._edges_pending = True
        if fast != self._dense_power:
            self._dense_power = fast
            self._plan_memo = None
        self._calibrating = self._calibration.calibrating(now)   # once per read, for every GPU
        # Power-only GPUs wait for the read planned for them all (next_read_at), unless an edge
        # waits at the default cadence on a sensor with counters (then they are read at every
        # fast tick, as counters are; where all are power-only, quiet ones rejoin the plan).
        (at, _), planned = self._power_plan(now)
        wait = at is not None and now < at - POWER_EARLY_S and \
            not (fast and self._follow_fields and self._has_counter)
        self._power_wait = planned if wait else frozenset()
        quiet_due = self._quiet.due(now)      # every quiet GPU is read now
        batch = Batch()
        n = self.nvml
        lanes = self._lanes
        if lanes is None:
            for g in self._gpus:
                try:
                    self._read_gpu(g, now, batch)
                except n.NVMLError as exc:
                    batch.errors.append(SensorError(self.name, _error_kind(n, exc), g.device.key, decode(str(exc))))
        else:
            # One read of each GPU, handed over at once: a hung GPU costs its own deadline
            # and never delays the others' values (sensors/guard.py).
            parts = [Batch() for _ in self._gpus]
            outcomes = lanes.run_each([(g.handle, lambda g=g, part=part: self._read_gpu(g, now, part))
                                       for g, part in zip(self._gpus, parts)])
            for g, part, outcome in zip(self._gpus, parts, outcomes):
                if isinstance(outcome, n.NVMLError):
                    kind = _error_kind(n, outcome)
                    if kind == "timeout" and g.counter is not None:
                        g.counter.failed()     # as a counter call that timed out: bridge its gap
                    batch.errors.append(SensorError(self.name, kind, g.device.key, decode(str(outcome))))
                    continue
                if isinstance(outcome, BaseException):
                    raise outcome
                batch.readings.extend(part.readings)
                batch.errors.extend(part.errors)
        if quiet_due:                 # the next quiet read
            self._quiet.read(now, min([q.period_s for q in self._quiets if q.engaged], default=QUIET_PERIOD_S))
        self._edges_pending = False
        self._plan_memo = None        # planned on what this read has changed
        return batch

    def _read_gpu(self, g: NvmlGpu, now: float, batch: Batch) -> None:
        """One GPU's read (raises NVMLError; the caller reports it)."""
        if g.reader is not None:
            if not g.reader.read(now, batch.readings, period_s=self.period_s, calibrating=self._calibrating,
                                 edges_pending=self._edges_pending, quiet=self._quiet):
                changed_t = g.reader.timing.changed_t
                batch.errors.append(SensorError(self.name, "counter_stalled", g.device.key,
                                                f"energy counter unchanged for {now - (changed_t or now):.1f} s "
                                                "while the GPU draws power"))
        elif g.device.key in self._power_wait or \
                (g.power is not None and not self._edges_pending and g.power.quiet.waits(self._quiet, now)):
            return           # (a power-only GPU whose power holds still waits for the quiet read)
        elif g.power is not None and not g.power.read(now, batch.readings):
            batch.errors.append(SensorError(self.name, "not_supported", g.device.key, "instant power field failed"))

    def read_processes(self, now: float) -> list[ProcessUsage]:
        """SM share per process since the last call (for attribution). Host PIDs."""
        return self._processes.read(now)

    def mig_layout(self) -> dict[str, dict[str, float]]:
        """Per GPU in MIG mode, each GPU instance's SM fraction (sensors/nvml_processes.py)."""
        return self._processes.mig_layout(self._clock.now())

    def mig_uuids(self) -> dict[str, tuple[str, str]]:
        """MIG device UUID -> (parent GPU UUID, GPU instance id), for pod-resources IDs."""
        return self._processes.mig_uuids(self._clock.now())

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def _error_kind(n: ModuleType, exc: Any) -> str:
    kinds = {
        n.NVML_ERROR_GPU_IS_LOST: "gpu_lost", n.NVML_ERROR_NOT_SUPPORTED: "not_supported",
        n.NVML_ERROR_TIMEOUT: "timeout", n.NVML_ERROR_NO_PERMISSION: "permission",
        n.NVML_ERROR_UNINITIALIZED: "uninitialized", n.NVML_ERROR_NOT_FOUND: "not_found",
    }
    return kinds.get(exc.value, "nvml_error")
