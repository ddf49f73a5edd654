"""Joining scraped tokens with GPU energy into live J/token per model.

Each good scrape records a point (time, tokens counted since we first reached the server). The
energy at a point's time is read from the ledger's history (``meter.ledger.values_at``) when
J/token is asked for, not when the point was taken: by then the ledger holds reads on both
sides of it, so the energy is interpolated at the instant the tokens were counted instead of
lagging behind by a counter refresh and moving in steps.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from ..errors import UsageError
from ..model import Component
from .parse import GENERATION, PROMPT, TokenKey
from .scrape import TokenSource

if TYPE_CHECKING:  # pragma: no cover
    from ..meter import Meter
    from ..requests import RequestAccountant, RequestView

IDLE_HORIZON_S = 3600.0          # idle power is the lowest seen over this long (a GPU's idle floor drifts)
# The ledger extrapolates a device past its last reading for at most 5 s (then holds): a window
# edge further out than this would see no energy at all.
EXTRAPOLATE_S = 4.0


@dataclass(frozen=True)
class TokenStat:
    """Per model, for ``wattmeter_tokens_total{model,kind}`` and ``wattmeter_energy_per_token_joules``."""

    model: str
    prompt_tokens_total: int
    generation_tokens_total: int
    energy_per_token_j: float | None            # GPU J per generation token over the window
    energy_above_idle_per_token_j: float | None
    age_s: float | None = None                  # how long ago the J/token window ended (last good scrape in reach)


@dataclass(frozen=True)
class _Point:
    t: float
    counted: Mapping[TokenKey, int]             # tokens counted since the baseline (never history)


class TokenJoiner:
    """Feeds scraped tokens into the meter and keeps J/token per model over a sliding window.

    J/token = ΔE of the GPUs serving the model ÷ Δ generation tokens, over the last ``window_s``
    (keep it long: some servers count tokens only when a request ends). ``gpus`` maps a model
    to the device keys serving it (default: every GPU). Energy above idle subtracts
    ``idle_w_per_gpu`` × GPUs × Δt, or, unset, the lowest power seen over an interval of the
    last hour (intervals without tokens are the idle periods that set it).

    J/token is withheld (None) once the source has not answered for ``window_s``: a stale ratio
    is never shown as current. A model the source has not listed for ``forget_after_s`` is
    dropped from ``snapshot()``.
    """

    def __init__(self, meter: "Meter", source: TokenSource, window_s: float = 60.0,
                 idle_w_per_gpu: float | None = None, gpus: Mapping[str, Sequence[str]] | None = None,
                 forget_after_s: float = 900.0, requests: "RequestAccountant | None" = None) -> None:
        if window_s <= 0:
            raise UsageError(f"token window must be > 0 s, got {window_s}")
        self.meter = meter
        self.source = source
        self.window_s = window_s
        self.idle_w_per_gpu = idle_w_per_gpu
        self.forget_after_s = forget_after_s
        self.requests = requests                  # per-request figures (proxy mode), exported beside J/token
        self.gpus = {m: tuple(keys) for m, keys in (gpus or {}).items()}
        self._points: deque[_Point] = deque()
        self._counted: dict[TokenKey, int] = {}
        self._seen: dict[str, float] = {}                       # model -> last time the source listed it
        self._idle: dict[tuple[str, ...], deque[tuple[float, float]]] = {}   # GPU keys -> (t, W) idle intervals
        self._last_ok: float | None = None
        self._lock = threading.Lock()

    def tick(self, now: float) -> None:
        """One scrape: count new tokens into the meter and record a (time, tokens) point."""
        if self.requests is not None:
            self.requests.settle()               # quiet periods settle too (idle share, finals)
        deltas = self.source.deltas()
        # The server counted these tokens while we were fetching: date them mid-fetch.
        t = (now + self.meter.clock.now()) / 2.0
        for (_, kind), n in sorted(deltas.items()):
            if n > 0:
                self.meter.add_tokens(n, kind)
        if not self.source.up:
            return                              # no point: a failed scrape says nothing about tokens
        # Before every GPU has a reading the ledger cannot say what energy was at t: such a
        # point would make a window edge with too little energy behind it. Tokens still count.
        ready = all(s.t is not None for s in self.meter.snapshot().values() if s.device.component == Component.GPU)
        with self._lock:
            for key, n in deltas.items():
                self._counted[key] = self._counted.get(key, 0) + n
            for model in self.source.models | {m for (m, _), n in deltas.items() if n > 0}:
                self._seen[model] = t
            self._last_ok = t
            if not ready:
                self._points.clear()
                return
            if self._points and t <= self._points[-1].t:
                return                           # a duplicate tick at the same instant adds nothing
            self._points.append(_Point(t, dict(self._counted)))
            if len(self._points) >= 3:
                self._note_idle(self._points[-3], self._points[-2])
            # Keep the newest point at or before the window start as its anchor edge.
            while len(self._points) >= 2 and self._points[1].t <= t - self.window_s:
                self._points.popleft()

    def _note_idle(self, a: _Point, b: _Point) -> None:
        """Remember the GPU power over a settled interval in which a model produced no tokens."""
        keys_all = self._gpu_keys()
        for model in {m for m, _ in b.counted} | set(self.gpus):
            if b.counted.get((model, GENERATION), 0) != a.counted.get((model, GENERATION), 0):
                continue
            keys = tuple(self.gpus.get(model, keys_all))
            power = self._energy(keys, a.t, b.t)
            if power is None:
                continue
            q = self._idle.setdefault(keys, deque())
            q.append((b.t, power / (b.t - a.t)))
            while q and q[0][0] < b.t - IDLE_HORIZON_S:
                q.popleft()

    def snapshot(self) -> list[TokenStat]:
        now = self.meter.clock.now()
        with self._lock:
            points = list(self._points)
            seen = dict(self._seen)
            fresh = self._last_ok is not None and now - self._last_ok <= self.window_s
        totals = self.source.totals
        out = []
        for model in sorted({m for m, _ in totals}):
            if model in seen and now - seen[model] > self.forget_after_s:
                continue                         # the server no longer serves it: drop its series
            jpt, above, end_t = self._per_token(model, points) if fresh else (None, None, None)
            out.append(TokenStat(model, totals.get((model, PROMPT), 0), totals.get((model, GENERATION), 0),
                                 jpt, above, None if end_t is None else max(0.0, now - end_t)))
        return out

    def request_view(self) -> "RequestView | None":
        """Per-request figures (proxy mode) for the exporter; None without per-request accounting."""
        return self.requests.view() if self.requests is not None else None

    def _gpu_keys(self) -> tuple[str, ...]:
        return tuple(k for k, s in self.meter.snapshot().items() if s.device.component == Component.GPU)

    def _reach(self, keys: Sequence[str]) -> float:
        """The latest time the ledger can give every one of these GPUs' energy for."""
        snap = self.meter.snapshot()
        times = [snap[k].t for k in keys if k in snap]
        return min((t for t in times if t is not None), default=float("-inf")) + EXTRAPOLATE_S

    def _energy(self, keys: Sequence[str], t0: float, t1: float) -> float | None:
        if not keys or t1 <= t0 or t1 > self._reach(keys):
            return None
        e0, e1 = self.meter.ledger.values_at(t0), self.meter.ledger.values_at(t1)
        if not all(k in e0 and k in e1 for k in keys):
            return None
        return sum(max(0.0, e1[k] - e0[k]) for k in keys)

    def _per_token(self, model: str, points: list[_Point]) -> tuple[float | None, float | None, float | None]:
        keys = tuple(self.gpus.get(model, self._gpu_keys()))
        reach = self._reach(keys)
        points = [p for p in points if p.t <= reach]    # the newest edge the ledger has energy for
        if len(points) < 2:
            return None, None, None
        first, last = points[0], points[-1]
        gen = last.counted.get((model, GENERATION), 0) - first.counted.get((model, GENERATION), 0)
        energy = self._energy(keys, first.t, last.t)
        if energy is None or gen <= 0:
            return None, None, None
        idle_w = self._idle_w(keys, points)
        above = None if idle_w is None else max(0.0, energy - idle_w * (last.t - first.t)) / gen
        return energy / gen, above, last.t

    def _idle_w(self, keys: tuple[str, ...], points: list[_Point]) -> float | None:
        if self.idle_w_per_gpu is not None:
            return self.idle_w_per_gpu * len(keys)
        powers = [e / (b.t - a.t) for a, b in zip(points, points[1:])
                  if (e := self._energy(keys, a.t, b.t)) is not None]
        with self._lock:
            powers += [w for _, w in self._idle.get(keys, ())]
        return min(powers) if len(powers) >= 2 else None   # one interval says nothing about idle
