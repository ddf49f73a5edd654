"""Windows: jobs, decorated calls, context managers, requests. Computed from the ledger only.

Begin and end each create a ledger mark (O(1), no sensor call on the caller's thread). The
result waits, briefly, until the sampler has a point past the end mark on every device, then
interpolates exactly at both edges.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from .ledger import Ledger, Mark
from .model import DeviceEnergy, WindowResult
from .value import WindowValue

if TYPE_CHECKING:  # pragma: no cover
    from .meter import Meter


@dataclass(frozen=True)
class Edge:
    """One window edge: the ledger mark and the token counts at that instant."""

    mark: Mark
    tokens: Mapping[str, int]

    @property
    def t(self) -> float:
        return self.mark.t


class Window:
    def __init__(self, meter: "Meter", name: str, labels: Mapping[str, str] | None = None) -> None:
        self.meter = meter
        self.name = name
        self.labels = dict(labels or {})
        self._start: Edge | None = None
        self._end: Edge | None = None
        self._result: WindowResult | None = None
        self._lock = threading.Lock()
        self.values = WindowValue(meter.values)     # decisions: value delivered in this window

    # -- edges -----------------------------------------------------------------
    def begin(self, at: float | None = None) -> "Window":
        """Open the window at ``at`` (the meter's clock; default now). An earlier instant, such
        as when ``measure()`` was called before the meter had started, is measured back from
        the first readings."""
        if self._start is None:
            self._start = self.meter.edge(at)
            self.values.begin()
        return self

    def end(self) -> "Window":
        if self._start is None:
            raise RuntimeError(f"window {self.name!r} ended before it began")
        if self._end is None:
            self._end = self.meter.edge()
            self.values.end()
        return self

    def add_value(self, n: float, unit: str = "samples") -> None:
        """Value this window delivered (samples, images...); see wattmeter.value."""
        self.values.add(n, unit)

    @property
    def start_t(self) -> float | None:
        """When the window began, on the meter's clock (None: not begun)."""
        return None if self._start is None else self._start.t

    @property
    def ended(self) -> bool:
        return self._end is not None

    def __enter__(self) -> "Window":
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        self.end()

    # -- result ----------------------------------------------------------------
    def result(self, timeout_s: float | None = None) -> WindowResult:
        """The window's energy. Blocks until the sampler covers the end (bounded), then computes."""
        if self._end is None:
            raise RuntimeError(f"window {self.name!r} has not ended; use partial() for a running window")
        with self._lock:
            if self._result is None:
                assert self._start is not None
                self._result = self.meter.result_between(self.name, self._start, self._end, timeout_s)
            return self._result

    def partial(self) -> WindowResult:
        """Energy so far of a running window (ends a private copy now, leaves this one open)."""
        if self._start is None:
            raise RuntimeError(f"window {self.name!r} has not begun")
        return self.meter.result_between(self.name, self._start, self.meter.edge(), None)

    def __repr__(self) -> str:
        state = "done" if self._end else ("open" if self._start else "new")
        return f"<Window {self.name!r} {state}>"


def device_energies(ledger: Ledger, start: Mark, end: Mark) -> tuple[tuple[DeviceEnergy, ...], bool]:
    """Per-device energy between two resolved marks, and whether any of it is approximate."""
    out = []
    any_approx = False
    duration = end.t - start.t
    for dev in ledger.devices:
        k = dev.key
        if k not in end.energy_j:
            continue
        late = k not in start.energy_j
        if late and not ledger.added_after(k, start):
            continue
        # A device that joined after the start (a GPU that came late) is metered from then on.
        e = max(0.0, end.energy_j[k] - start.energy_j.get(k, 0.0))
        approx = (late or duration < dev.update_period_s or k in start.extrapolated or k in end.extrapolated
                  or end.errors.get(k, 0) != start.errors.get(k, 0)
                  or ledger.approximate_between(k, start.t, end.t))
        any_approx |= approx
        avg = e / duration if duration > 0 else 0.0
        peak = ledger.peak_power_w(k, start.t, end.t)
        out.append(DeviceEnergy(key=k, component=dev.component, scope=dev.scope, source=dev.source,
                                energy_j=e, avg_power_w=avg, peak_power_w=max(peak, avg) if peak is not None else avg,
                                labels=dict(dev.labels), approximate=approx))
    return tuple(out), any_approx


__all__ = ["Edge", "Window", "WindowResult", "device_energies"]
