"""How overlapping requests share a device's energy: the per-request state and the split of one
interval's energy (see wattmeter.requests for the rules). Pure functions of their inputs: the
accountant holds the locks and the ledger."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

from .model import Component, Scope

if TYPE_CHECKING:  # pragma: no cover
    from .requests import RequestResult

GENERATION, PROMPT = "generation", "prompt"
GPUS, ALL = "gpus", "all"            # what a RequestAccountant splits (its ``energy_of``)


@dataclass
class ReqState:
    """One request's bookkeeping inside the accountant."""

    request_id: str
    model: str
    devices: frozenset[str] | None          # None: every metered device
    start: float
    end: float | None = None
    reports: list[tuple[float, float, int]] = field(default_factory=list)   # (from, to, generation tokens)
    tokens: dict[str, int] = field(default_factory=dict)
    known_until: float = 0.0                # generation tokens are known up to here (end: forever)
    energy_j: float = 0.0
    device_j: dict[str, float] = field(default_factory=dict)
    result: "RequestResult | None" = None

    def weight(self, a: float, b: float) -> float:
        """Generation tokens this request produced in [a, b], reports spread over their span."""
        w = 0.0
        for s0, s1, n in self.reports:
            if s1 > s0:
                overlap = min(b, s1) - max(a, s0)
                if overlap > 0:
                    w += n * overlap / (s1 - s0)
            elif a < s1 <= b:
                w += n
        return w

    def on(self, key: str) -> bool:
        return self.devices is None or key in self.devices


def chosen_devices(devices: Iterable, energy_of: str) -> list[str]:
    """Keys of the devices whose energy is split. ``gpus``: every GPU. ``all``: every component,
    the process-tree share where one exists, else the host figure (as a WindowResult counts)."""
    devs = list(devices)
    if energy_of == GPUS:
        return [d.key for d in devs if d.component == Component.GPU]
    keys: list[str] = []
    for comp in Component:
        parts = [d for d in devs if d.component == comp]
        scoped = [d for d in parts if d.scope == Scope.PROCESS]
        keys.extend(d.key for d in scoped or parts)
    return keys


def sweep(a0: float, bounds: Sequence[float], live: Sequence[ReqState]) -> Iterator[tuple[float, float, list[ReqState]]]:
    """(a, b, the requests open for all of [a, b]) for consecutive bounds, in one pass (every
    begin and end is a bound, so a request is open for all of an interval or none of it)."""
    by_start = sorted(live, key=lambda st: st.start)
    i, a = 0, a0
    active: list[ReqState] = []
    for b in bounds:
        while i < len(by_start) and by_start[i].start <= a:
            active.append(by_start[i])
            i += 1
        active = [st for st in active if st.end is None or st.end >= b]
        yield a, b, active
        a = b


def split(a: float, b: float, va: Mapping[str, float], vb: Mapping[str, float], keys: Iterable[str],
          open_now: Sequence[ReqState], into: dict[int, dict[str, float]], idle: dict[str, float]) -> None:
    """Hand out each device's energy in [a, b] into ``into`` (id(req) -> device -> J) and ``idle``.
    Where a request's tokens are not known yet (provisional figures only), by time."""
    if b <= a:
        return
    for k in keys:
        if k not in va or k not in vb:
            continue                     # a device with no reading yet: nothing known to hand out
        e = max(0.0, vb[k] - va[k])
        parts = [st for st in open_now if st.on(k)]
        if not parts:
            idle[k] = idle.get(k, 0.0) + e
            continue
        weights = [st.weight(a, b) for st in parts]
        total = sum(weights)
        if total <= 0 or any(st.known_until < b for st in parts):
            weights, total = [1.0] * len(parts), float(len(parts))   # by time: all open the whole interval
        for st, w in zip(parts, weights):
            d = into.setdefault(id(st), {})
            d[k] = d.get(k, 0.0) + e * w / total
