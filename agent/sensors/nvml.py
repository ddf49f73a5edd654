"""NVIDIA GPUs through NVML (the ``pynvml`` module of nvidia-ml-py, or the fake drop-in).

Energy comes from the total-energy counter when the GPU has one (Volta and newer); otherwise
from instant power (field NVML_FI_DEV_POWER_INSTANT), else from ``nvmlDeviceGetPowerUsage``,
integrated by the ledger. NVML errors are translated to SensorError here and nowhere else.
"""
from __future__ import annotations

import ctypes
import math
import os
import random
from collections import deque
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Sequence

from ..clock import Clock, SystemClock
from ..model import Batch, Component, Device, ProcessUsage, Reading, SensorError, Source
from .base import DeadlineLanes, SensorUnavailable
from .nvml_power import FIELD_POWER_AVERAGE, FIELD_POWER_INSTANT, PowerOnlyReader, Stream as _Stream
from .power_evidence import MEAN_WINDOW_S, PowerReference, StampEvidence
from .gpu_selection import GpuSelection
from .nvml_processes import ProcessReader
from .counter_timing import DENSE_START_S, Calibration, CounterTiming

FIELD_PERIOD_S = 0.02
FIELD_READ_DELAY_S = 0.002    # read a new field value this long after it is expected
MIN_FIELD_PERIOD_S = 0.01     # never chase a field faster than 100 Hz
FIELD_STAMPED_AGE_S = 0.0005  # a value stamped this long before its read was stamped when it refreshed
_FIELDS_INSTANT = (FIELD_POWER_INSTANT,)
_FIELDS_BOTH = (FIELD_POWER_INSTANT, FIELD_POWER_AVERAGE)   # one call: instant power and the 1 s mean
MAX_FIELD_AGE_S = 1.0         # older field timestamps mean clocks disagree: use the read time
_struct_get = ctypes.Structure.__getattribute__   # a field value's attributes, without pynvml's wrapper


def load_pynvml() -> ModuleType:
    import pynvml  # the fake installs itself as sys.modules["pynvml"], so this picks it up

    return pynvml


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _Gpu:
    index: int
    handle: Any
    device: Device
    has_counter: bool
    power_mode: str          # "counter" | "power_only"
    counter: CounterTiming | None = None   # GPUs with a counter: when to read it, and its dating
    instant_ok: bool = False     # field 186 works (shapes energy between counter reads)
    shape_usage: bool = False    # else nvmlDeviceGetPowerUsage shapes it
    last_shape_t: float = -1e18
    field_last_us: int = 0              # power-only GPUs: NVML timestamp of the newest field value,
    field_last_t: float | None = None   # its time on our clock...
    field_next: float | None = None     # ...and when the next one is expected
    field_steps: deque = field(default_factory=lambda: deque(maxlen=32))
    field_stamped: bool = False         # the newest value's NVML stamp predates its read (a refresh time)
    field_stamps: StampEvidence = field(default_factory=StampEvidence)   # counter GPUs: what field 186 is
    instant_w: float | None = None      # its newest value (the stall check's evidence)
    power: PowerOnlyReader | None = None   # GPUs with no counter
    average_ok: bool = False     # field 185 (1 s trailing mean) answers
    mean_stream: _Stream = field(default_factory=_Stream)


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
        self.simulated = bool(getattr(self.nvml, "WATTMETER_FAKE", False))
        fake = getattr(self.nvml, "WATTMETER_FAKE_NVML", None)
        # Times the end of each counter call; the fake's own clock keeps virtual-time tests exact.
        self._clock: Clock = clock or (fake.clock if fake is not None else SystemClock())
        self.power_period_s = power_period_s
        self._rng = random.Random(seed)     # shifts counter pairs (sensors/counter_timing.py)
        err = self.nvml.NVMLError
        try:
            self.nvml.nvmlInit()
        except err as exc:
            raise SensorUnavailable("nvml", f"NVML could not start ({_decode(str(exc))})",
                                    "install the NVIDIA driver, or use --fake-gpus N to try the GPU path") from exc
        try:
            self.driver_version = _decode(self.nvml.nvmlSystemGetDriverVersion())
        except err:
            self.driver_version = "unknown"
        self._gpus = self._discover(selection or GpuSelection.from_env())
        if not self._gpus:
            raise SensorUnavailable("nvml", "no GPU is visible to this job",
                                    "check CUDA_VISIBLE_DEVICES, or use --fake-gpus N")
        self.period_s = period_s
        self.set_period(period_s)
        self.fast_edges = any(g.has_counter for g in self._gpus)
        self._calibration = Calibration()
        self._calibrating = False
        self._first_read: float | None = None
        self._edges_pending = False
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

    # -- discovery -------------------------------------------------------------
    def _discover(self, selection: GpuSelection) -> list[_Gpu]:
        n = self.nvml
        count = n.nvmlDeviceGetCount()
        handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_decode(n.nvmlDeviceGetUUID(h)) for h in handles]
        gpus = []
        for idx, mig in selection.match(list(enumerate(uuids))):
            h = handles[idx]
            model = _decode(n.nvmlDeviceGetName(h))
            has_counter = self._probe(lambda: n.nvmlDeviceGetTotalEnergyConsumption(h))
            instant_ok = self._field_ok(h, FIELD_POWER_INSTANT)
            average_ok = self._field_ok(h, FIELD_POWER_AVERAGE)
            mode, source = ("counter", Source.COUNTER) if has_counter else ("power_only", Source.SAMPLED)
            labels = {"gpu": str(idx), "uuid": uuids[idx], "model": model, "hostname": os.uname().nodename}
            if mig:
                labels["mig"] = mig
            key = f"gpu{idx}"
            dev = Device(key=key, component=Component.GPU, source=source, labels=labels,
                         power_is_mean=not has_counter and instant_ok,
                         update_period_s=0.1 if has_counter else self.power_period_s,
                         simulated=self.simulated)
            # Without field 186, GetPowerUsage shapes the counter's spans: instantaneous or a
            # 1 s mean, the counter keeps the energy exact; only the spread inside differs.
            shape_usage = has_counter and not instant_ok
            power = None if has_counter else PowerOnlyReader(n, h, key, self.wall, instant_ok, average_ok)
            counter = CounterTiming(shaped=instant_ok or shape_usage, rng=self._rng) if has_counter else None
            gpus.append(_Gpu(idx, h, dev, has_counter, mode, counter, instant_ok, shape_usage, power=power,
                             average_ok=average_ok))
        return gpus

    def _probe(self, call: Any) -> bool:
        try:
            call()
            return True
        except self.nvml.NVMLError:
            return False

    def _field_ok(self, handle: Any, field_id: int) -> bool:
        """Whether a field answers (a probe at discovery)."""
        try:
            return self.nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0].nvmlReturn == 0
        except self.nvml.NVMLError:
            return False

    def _instant_sample(self, handle: Any, now: float | None, strict: bool = False, average: bool = False
                        ) -> tuple[tuple[float, float | None, int] | None, tuple[float, int] | None]:
        """(watts, clock time the value was sampled) from field 186. NVML stamps each field value
        with the wall time it was taken; a value that is 20 ms old belongs 20 ms back.
        ``strict`` lets NVML errors through (a lost GPU must show as an error, not silence).
        The third item is NVML's raw timestamp (µs), which identifies the value. With
        ``average``, field 185 comes in the same call, returned second as (watts, raw timestamp).
        (Returned, not kept on the sensor: GPUs may be read side by side on their lanes.)"""
        mean = None
        fields = _FIELDS_BOTH if average else _FIELDS_INSTANT
        try:
            values = self.nvml.nvmlDeviceGetFieldValues(handle, fields)
        except self.nvml.NVMLError:
            if strict:
                raise
            return None, None
        # pynvml's field struct wraps each attribute in a Python __getattribute__ (to decode
        # bytes; these are numbers): read them through ctypes' own (~1 us apiece, 8 GPUs x 10 Hz).
        get = _struct_get
        if average and len(values) > 1:
            second = values[1]
            if get(second, "nvmlReturn") == 0:
                mean = (get(second, "value").uiVal / 1000.0, int(get(second, "timestamp") or 0))
        entry = values[0]
        if get(entry, "nvmlReturn") != 0:   # the call succeeds while a field fails: check each entry
            return None, mean
        ts_us = int(get(entry, "timestamp") or 0)
        t = None
        if now is not None and ts_us:
            age = self.wall(now) - ts_us / 1e6
            t = now - age if 0.0 <= age < MAX_FIELD_AGE_S else now
        return (get(entry, "value").uiVal / 1000.0, t, ts_us), mean

    def wants_fast(self, now: float) -> bool:
        """Calibration bursts while some counter's refresh phase is not locked
        (sensors/counter_timing.py)."""
        if not self.fast_edges:
            return False
        return self._calibration.wants_fast(now, any(g.counter is not None and g.counter.unlocked for g in self._gpus))

    def references(self) -> dict[str, PowerReference]:
        """Per GPU, what its energy is measured from and why (``doctor`` prints these)."""
        out = {}
        for g in self._gpus:
            if g.power is not None:
                out[g.device.key] = g.power.reference
            else:
                shape = "field 186" if g.instant_ok else ("nvmlDeviceGetPowerUsage" if g.shape_usage else "")
                stamps, refresh = g.field_stamps, None
                if g.instant_ok and stamps.read_stamped:
                    refresh = stamps.tight_refresh_s
                    # Lagging point samples alias with bursty loads: a wrong split is worse than
                    # the counter's own steps.
                    shape = ("counter steps (field 186 is stamped with the read time and changed at "
                             f"most every {refresh * 1000:.0f} ms: too coarse to split a counter span)"
                             if stamps.coarse and refresh is not None else "field 186 (read-stamped)")
                out[g.device.key] = PowerReference("counter", "energy counter",
                                                   "the GPU has a total-energy counter (exact over any span)", shape, refresh)
        return out

    # -- Sensor protocol -------------------------------------------------------
    def devices(self) -> list[Device]:
        return [g.device for g in self._gpus]

    def set_period(self, period_s: float) -> None:
        """The steady cadence (``--interval``). Power-only GPUs are read faster than counters
        (DESIGN: 10-20 Hz instant power), and where they integrate field 186, a short mean that
        costs ~10 us to read, often enough to see (nearly) every value."""
        period = max(period_s, self.min_period_s)
        if not all(g.has_counter for g in self._gpus):
            period = min(period, self.power_period_s)
        if any(g.power is not None and g.instant_ok for g in self._gpus):
            period = min(period, FIELD_PERIOD_S)
        self.period_s = period

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
        times += [g.field_next + FIELD_READ_DELAY_S for g in self._gpus
                  if g.counter is not None and g.counter.fault and g.instant_ok and g.field_next is not None]
        times += [t for g in self._gpus if g.power is not None and (t := g.power.next_read_at()) is not None]
        due = [t for t in times if t > now - 0.5]     # long-past wishes are not a reason to spin
        return min(due) if due else None

    def cadence_floor(self, now: float) -> float:
        """Steady reads sooner than 0.8 periods after a GPU's last instant-power read skip it
        (``_read_shape``), and a counter's own reads come as ``next_read_at`` wishes: before
        this time a steady read reads nothing (``CadenceFloor``, sensors/base.py). -inf where
        some GPU is read at every tick: power-only, an unshaped or faulted counter, or one
        whose first change is not dated yet."""
        floor = math.inf
        gap = 0.8 * self.period_s
        for g in self._gpus:
            c = g.counter
            if c is None or c.fault or not c.shaped or not c.tracker.dated:
                return -math.inf
            floor = min(floor, g.last_shape_t + gap)
        return floor

    @staticmethod
    def _learn_field_refresh(g: _Gpu, t: float, ts_us: int) -> None:
        """Field 186 refreshes on its own clock: its timestamps give the period (the shortest
        recent step, as missed values show up as multiples) and when the next value lands."""
        if g.field_last_us and ts_us > g.field_last_us:
            g.field_steps.append((ts_us - g.field_last_us) / 1e6)
            g.field_next = t + max(MIN_FIELD_PERIOD_S, min(g.field_steps))
        g.field_last_us, g.field_last_t = ts_us, t

    def _read_shape(self, g: _Gpu, now: float, batch: Batch) -> bool:
        """Read instant power at the sensor's cadence, and at every read while an edge waits
        (the extra wake-ups for scheduled counter reads need no power sample). True: read."""
        dense = g.counter is not None and g.counter.fault and g.instant_ok
        if not dense and not self._edges_pending and now - g.last_shape_t < 0.8 * self.period_s:
            return False
        if g.instant_ok and g.field_stamped and g.field_next is not None and now < g.field_next \
                and now - g.last_shape_t < MIN_FIELD_PERIOD_S:
            # Fast reads (every 1-5 ms near edges and while calibrating) come faster than field
            # 186 refreshes: where its stamps are refresh times, they say when the next value
            # lands, and a read before then returns the same one (~2/3 of a calibration
            # burst's CPU). Skipped for MIN_FIELD_PERIOD_S at most: the refresh period is learnt
            # from these reads, and skipping up to a period learnt too long (a refresh missed
            # while the reader was late) would keep it too long. Read-stamped values are read
            # every time: the read is what dates them.
            return True
        g.last_shape_t = now
        if g.instant_ok:
            sample, mean = self._instant_sample(g.handle, now, strict=True, average=g.average_ok)
            if mean is not None:
                # Field 185, the 1 s trailing mean, read in the same call: between counter
                # reads it carries E(t) over seconds better than sparse instant samples.
                w, ts = mean
                t_mean = g.mean_stream.date(w, ts, now, self.wall)
                if t_mean is not None:
                    batch.readings.append(Reading(g.device.key, t_mean, mean_w=w, mean_window_s=MEAN_WINDOW_S))
            if sample is not None:
                reading = self._date_instant(g, now, sample)
                if reading is not None:
                    batch.readings.append(reading)
        elif g.shape_usage:
            g.instant_w = self.nvml.nvmlDeviceGetPowerUsage(g.handle) / 1000.0
            batch.readings.append(Reading(g.device.key, now, power_w=g.instant_w))
        return True

    def _date_instant(self, g: _Gpu, now: float, sample: tuple[float, float | None, int]) -> Reading | None:
        """A counter GPU's field-186 value as a shaping sample, or None when it is not new.

        Refresh-stamped values are dated by their stamps. Where the data shows the stamps are
        read times (``StampEvidence``; reads that land on refreshes look the same), each read is
        a sample dated at the read. If the value also refreshes no faster than a short box (a
        ~100 ms point sample), it is flagged coarse: such samples alias with bursty loads and
        lag by up to a refresh, so they must not split a counter span (they still bridge faults)."""
        w, t_s, ts_us = sample
        g.instant_w = w
        stamps = g.field_stamps
        stamps.observe(now - t_s if t_s is not None and ts_us else None, w, now)
        coarse = stamps.coarse     # on evidence only: reads a few ms apart saw the changes
        if g.counter is not None:
            # The counter is read sparsely only because instant power shapes its spans; where
            # it cannot, the counter is read at every cadence tick instead (~100 ms spans).
            g.counter.shaped = not coarse
        if stamps.read_stamped:
            # Every read is a sample (a steady load's value never changes, and faults are
            # bridged from these), dated at the read.
            return Reading(g.device.key, t_s or now, power_w=w, instant_coarse=coarse)
        if t_s is not None and ts_us:
            if ts_us == g.field_last_us:
                return None          # the same value again
            self._learn_field_refresh(g, t_s, ts_us)
            g.field_stamped = now - t_s > FIELD_STAMPED_AGE_S
        return Reading(g.device.key, t_s or now, power_w=w)

    def read(self, now: float, fast: bool = False) -> Batch:
        """Read every GPU once. ``fast`` (a window edge waits): also schedule a counter pair at
        the next refresh, so the edge resolves within ~0.1 s instead of at the next steady pair."""
        if fast:
            self._edges_pending = True
        self._calibrating = self._calibration.calibrating(now)   # once per read, for every GPU
        batch = Batch()
        n = self.nvml
        lanes = self._lanes
        if lanes is None:
            for g in self._gpus:
                try:
                    self._read_gpu(g, now, batch)
                except n.NVMLError as exc:
                    batch.errors.append(SensorError(self.name, _error_kind(n, exc), g.device.key, _decode(str(exc))))
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
                    batch.errors.append(SensorError(self.name, kind, g.device.key, _decode(str(outcome))))
                    continue
                if isinstance(outcome, BaseException):
                    raise outcome
                batch.readings.extend(part.readings)
                batch.errors.extend(part.errors)
        self._edges_pending = False
        return batch

    def _read_gpu(self, g: _Gpu, now: float, batch: Batch) -> None:
        """One GPU's read (raises NVMLError; the caller reports it)."""
        if g.counter is not None:
            self._read_counter(g, now, batch)
        elif g.power is not None and not g.power.read(now, batch.readings):
            batch.errors.append(SensorError(self.name, "not_supported", g.device.key, "instant power field failed"))

    def _read_counter(self, g: _Gpu, now: float, batch: Batch) -> None:
        timing = g.counter
        assert timing is not None
        cadence = self._read_shape(g, now, batch)
        if not timing.due(now, cadence, self._calibrating, self._edges_pending):
            return
        try:
            mj = self.nvml.nvmlDeviceGetTotalEnergyConsumption(g.handle)
        except self.nvml.NVMLError:
            timing.failed()
            raise
        key = g.device.key
        # A read is taken somewhere inside the call (3.5 ms on an H100), and ``now`` predates
        # it: a change seen here happened before the call ended.
        dated = timing.observe(now, mj / 1000.0, self._clock.now())
        batch.readings.extend(Reading(key, t, energy_j=v, read_t=now) for t, v in dated)
        if dated:
            return
        if timing.stalled(now, g.instant_w):
            batch.errors.append(SensorError(self.name, "counter_stalled", key,
                                            f"energy counter unchanged for {now - (timing.changed_t or now):.1f} s "
                                            "while the GPU draws power"))

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


def _error_kind(n: ModuleType, exc: Exception) -> str:
    names = {
        "NVML_ERROR_GPU_IS_LOST": "gpu_lost", "NVML_ERROR_NOT_SUPPORTED": "not_supported",
        "NVML_ERROR_TIMEOUT": "timeout", "NVML_ERROR_NO_PERMISSION": "permission",
        "NVML_ERROR_UNINITIALIZED": "uninitialized", "NVML_ERROR_NOT_FOUND": "not_found",
    }
    value = getattr(exc, "value", None)
    for const, kind in names.items():
        if value is not None and value == getattr(n, const, object()):
            return kind
    return "nvml_error"
