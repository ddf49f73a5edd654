"""What the fake NVML's ``nvmlDeviceGetFieldValues`` answers for each field id, and the power
limits it reports (sim/fake_nvml.py resolves the handle and applies the call's faults first).

Values are pure functions of the simulated GPU and the scenario time of the read: power fields
185/186, the energy counter field and the power-limit fields; any other field id, or any scope
but the GPU's, answers NotSupported as a driver without it would.
"""
from __future__ import annotations

import ctypes
from typing import Any, Sequence

from ..clock import Clock
from .fake_gpu import SimGpu
from .fake_nvml_module import real_pynvml

nv = real_pynvml()
_FIELD_POWER = (nv.NVML_FI_DEV_POWER_AVERAGE, nv.NVML_FI_DEV_POWER_INSTANT)
_set_field = ctypes.Structure.__setattr__   # skips pynvml's per-attribute str/bytes wrapper
_get_field = ctypes.Structure.__getattribute__
_INSTANT, _AVERAGE = nv.NVML_FI_DEV_POWER_INSTANT, nv.NVML_FI_DEV_POWER_AVERAGE
_UINT = nv.NVML_VALUE_TYPE_UNSIGNED_INT
_FIELD_ARRAYS: dict[int, Any] = {}   # array types by length (pynvml builds one per call)


def _field_array(n: int) -> Any:
    t = _FIELD_ARRAYS[n] = nv.c_nvmlFieldValue_t * n
    return t


_FIELD_LIMITS = (nv.NVML_FI_DEV_POWER_MIN_LIMIT, nv.NVML_FI_DEV_POWER_MAX_LIMIT,
                 nv.NVML_FI_DEV_POWER_DEFAULT_LIMIT, nv.NVML_FI_DEV_POWER_CURRENT_LIMIT)


def field_values(gpu: SimGpu, t: float, fieldIds: Sequence[Any], off: bool, clock: Clock, t0: float) -> Any:
    """The ``c_nvmlFieldValue_t`` array pynvml returns for ``fieldIds`` (ids, or (id, scope)
    pairs) of ``gpu`` read at scenario time ``t``; ``off``: every field answers NotSupported.
    Timestamps are wall-clock microseconds of ``clock``, whose time ``t0`` is scenario t=0."""
    n = len(fieldIds)
    values = (_FIELD_ARRAYS.get(n) or _field_array(n))()
    s = gpu.spec.sensor
    power = s.instant_field and not off
    for i, fid in enumerate(fieldIds):
        if power and fid.__class__ is int and (fid == _INSTANT or fid == _AVERAGE):
            # The sampler's read: fields 186/185 of a GPU that has them, filled in one step.
            w, r = gpu.power_instant(t) if fid == _INSTANT else gpu.power_average_1s(t)
            v = values[i]
            put = _set_field
            put(v, "fieldId", fid)
            _get_field(v, "value").uiVal = int(round(w * 1000))
            put(v, "valueType", _UINT)
            put(v, "timestamp", _stamp_us(gpu, fid, t if s.field_timestamp == "read" else r, clock, t0))
            put(v, "latencyUsec", int(gpu.latency_s("nvmlDeviceGetFieldValues") * 1e6))
            continue
        fid, scope = fid if isinstance(fid, tuple) else (fid, 0)
        _fill_field(values[i], int(fid), int(scope), gpu, t, off, clock, t0)
    return values


def _fill_field(v: Any, fid: int, scope: int, gpu: SimGpu, t: float, off: bool, clock: Clock, t0: float) -> None:
    # Plain ctypes stores: pynvml's struct wrapper costs more per attribute than a real
    # driver call takes (field 186: ~10 us on an H100), and the bench meters the readers.
    put = _set_field
    put(v, "fieldId", fid)
    put(v, "scopeId", scope)
    put(v, "nvmlReturn", nv.NVML_ERROR_NOT_SUPPORTED)
    if off or scope != nv.NVML_POWER_SCOPE_GPU:
        return   # no Grace-Hopper module or memory scope in the fake
    s = gpu.spec.sensor
    if fid in _FIELD_POWER and s.instant_field:
        w, r = gpu.power_instant(t) if fid == nv.NVML_FI_DEV_POWER_INSTANT else gpu.power_average_1s(t)
        v.value.uiVal = int(round(w * 1000))
        put(v, "valueType", nv.NVML_VALUE_TYPE_UNSIGNED_INT)
    elif fid == nv.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION and s.energy_counter and \
            gpu.call_fault("nvmlDeviceGetTotalEnergyConsumption", t, "not_supported") is None:
        r = gpu.counter_grid.at(gpu.counter_grid.tick(gpu.stalled_at(t)))
        v.value.ullVal = gpu.energy_mj(t)
        put(v, "valueType", nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)
    elif fid in _FIELD_LIMITS:
        lo, hi = limits_mw(gpu)
        r = t
        v.value.uiVal = {nv.NVML_FI_DEV_POWER_MIN_LIMIT: lo}.get(fid, hi)
        put(v, "valueType", nv.NVML_VALUE_TYPE_UNSIGNED_INT)
    else:
        return
    # Some drivers stamp a field with the time of the read, not of the value's refresh.
    put(v, "timestamp", _stamp_us(gpu, fid, t if s.field_timestamp == "read" else r, clock, t0))
    put(v, "latencyUsec", int(gpu.latency_s("nvmlDeviceGetFieldValues") * 1e6))
    put(v, "nvmlReturn", nv.NVML_SUCCESS)


def _stamp_us(gpu: SimGpu, fid: int, when: float, clock: Clock, t0: float) -> int:
    """The wall-clock microseconds of scenario time ``when``, the same at every read of one
    refresh (as a driver stamps it once)."""
    held = gpu.field_stamps.get(fid)
    if held is not None and held[0] == when:
        return held[1]
    us = int(round(clock.wall(t0 + when) * 1e6))
    gpu.field_stamps[fid] = (when, us)
    return us


def limits_mw(gpu: SimGpu) -> tuple[int, int]:
    """``gpu``'s lowest and highest power limit in mW (H100: 200-700 W)."""
    limit_w = gpu.spec.power_limit_w
    return int(round(limit_w * 2 / 7)) * 1000, int(round(limit_w * 1000))   # H100: 200-700 W
