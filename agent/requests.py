"""Per-request energy in a batched server: overlapping requests share each GPU's energy.

    acct = RequestAccountant(meter, intensity_g_per_kwh=350)
    with acct.request("req-17", model="llama") as r:        # or: async with ...
        ...
        r.add_tokens(812, kind="generation")                # tokens belong to this request only
    r.result()          # -> RequestResult: J, J/token, g CO2e; final once every overlap is known
    acct.summary()      # -> {model: ModelSummary} p50/p90 J/request and J/token over recent requests

How energy is split. Every request event (begin, tokens, end) is a boundary. Between two
boundaries, each GPU's energy E (from the ledger's history, ``meter.ledger.values_at``) goes to
the requests open on that GPU, in proportion to the generation tokens each produced in that
interval, else equally (by time: they were all open for the whole interval). Tokens reported
at once are spread evenly over the time since the request's previous report, so a server that
reports usage only when a request ends still gets a fair share for every interval. With no
request open, E goes to the device's ``idle`` share. Each interval's E is handed out exactly
once, so the parts never sum to more than the device energy.

Intervals are settled in time order up to a frontier: the latest time the ledger has read on
every GPU and every open request has reported up to. A request is final once the frontier
passes its end; before that ``result()`` gives a provisional figure (equal shares where other
requests' tokens are not known yet) with ``final=False``.

A server splits the GPUs' energy (``energy_of="gpus"``, the default: ``meter.request()``). The
training callbacks, where a step is a request, split every device a WindowResult counts
(``energy_of="all"``), so their per-step figures add up to the window's. The sharing rules live
in wattmeter.request_shares and the rolling p50/p90 summary in wattmeter.request_summary.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from .request_shares import ALL, GENERATION, GPUS, PROMPT, ReqState, chosen_devices, split, sweep
from .request_summary import ModelSummary, RequestView, RollingSummary

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import Mark
    from .meter import Meter

YIELD_EVERY = 32          # settling yields the GIL after this many intervals...
YIELD_S = 50e-6           # ...for this long, so request threads are not held up by a long settle
MAX_LAG_S = 10.0          # a device not read for this long no longer holds the frontier back (lost GPU)
J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class RequestResult:
    request_id: str
    model: str
    start_t: float
    end_t: float
    energy_j: float
    tokens: Mapping[str, int]
    device_energy_j: Mapping[str, float]
    final: bool                            # False: other overlapping requests' tokens are not known yet
    co2e_g: float | None = None            # given a grid intensity

    @property
    def duration_s(self) -> float:
        return self.end_t - self.start_t

    @property
    def energy_per_token_j(self) -> float | None:
        """J per generation token (None without generation tokens)."""
        gen = self.tokens.get(GENERATION, 0)
        return self.energy_j / gen if gen > 0 else None


class Request:
    """One request's handle: ``add_tokens`` while it runs, ``result()`` after it ends."""

    def __init__(self, accountant: "RequestAccountant", state: ReqState) -> None:
        self._acct = accountant
        self._state = state

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def start_t(self) -> float:
        """When the request began, on the meter's clock."""
        return self._state.start

    @property
    def end_t(self) -> float | None:
        """When it ended (None while open)."""
        return self._state.end

    def add_tokens(self, n: int, kind: str = GENERATION) -> None:
        if n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        self._acct._add_tokens(self._state, int(n), kind)

    def end(self, at: float | None = None) -> "Request":
        """End the request now, or at ``at`` on the meter's clock (never before its start or
        before energy already handed out)."""
        self._acct._end(self._state, at)
        return self

    def result(self, timeout_s: float | None = None) -> RequestResult:
        """The request's energy. Waits briefly (bounded) for the GPUs to be read past its end."""
        return self._acct._result(self._state, timeout_s)

    async def aresult(self, timeout_s: float | None = None) -> RequestResult:
        """``result()`` for async code: waits without blocking the event loop."""
        return await self._acct._aresult(self._state, timeout_s)

    def __enter__(self) -> "Request":
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    async def __aenter__(self) -> "Request":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.end()


class RequestAccountant:
    """Splits GPU energy among concurrent requests (see the module doc). Thread-safe.

    ``energy_of``: ``"gpus"`` (default) splits every GPU's energy; ``"all"`` splits every device a
    WindowResult counts (GPUs, and CPU/RAM with the process-tree share where one exists).

    ``intensity_g_per_kwh`` (a number, or a function giving the grid's current one) adds g CO2e
    to each result. ``gpus`` maps a model to the device keys serving it (default: every GPU); ``on_result`` is
    called (outside the lock) with each request's final result. ``settle_on_end=False`` leaves
    settling to ``settle()`` calls (a server's periodic task), keeping it off the request path.
    """

    def __init__(self, meter: "Meter", *, intensity_g_per_kwh: float | Callable[[], float | None] | None = None,
                 gpus: Mapping[str, Sequence[str]] | None = None, summary_size: int = 1000,
                 on_result: Callable[[RequestResult], None] | None = None, settle_on_end: bool = True,
                 energy_of: str = GPUS) -> None:
        if energy_of not in (GPUS, ALL):
            raise ValueError(f"energy_of must be {GPUS!r} or {ALL!r}, got {energy_of!r}")
        self.meter = meter
        self.energy_of = energy_of
        self.intensity_g_per_kwh = intensity_g_per_kwh
        self.gpus = {m: frozenset(keys) for m, keys in (gpus or {}).items()}
        self.on_result = on_result
        self._lock = threading.Lock()               # request state; held briefly
        self._settle_lock = threading.Lock()        # one settler at a time (the heavy part is outside _lock)
        self.settle_on_end = settle_on_end
        self._live: list[ReqState] = []
        self._times: set[float] = set()
        self._frontier = meter.clock.now()
        self._v_frontier: dict[str, float] | None = None       # set once every device has a reading
        self._idle_j: dict[str, float] = {}
        self._ended_at_frontier = False               # a request ended exactly at the frontier (virtual clocks)
        self._summary = RollingSummary(summary_size)
        self._end_mark: Mark | None = None          # the last ledger mark made at a request's end

    # -- requests ------------------------------------------------------------------------
    def request(self, request_id: str, model: str = "default", devices: Sequence[str] | None = None,
                at: float | None = None) -> Request:
        """Begin a request now (or at ``at``, on the meter's clock; never before energy already
        handed out). ``devices`` overrides the model's GPUs."""
        devs = frozenset(devices) if devices is not None else self.gpus.get(model)
        with self._lock:
            t = self._now() if at is None else max(at, self._frontier)
            st = ReqState(str(request_id), model, devs, t, known_until=t)
            self._live.append(st)
            self._times.add(t)
        return Request(self, st)

    def _add_tokens(self, st: ReqState, n: int, kind: str) -> None:
        with self._lock:
            if st.end is not None:
                raise RuntimeError(f"request {st.request_id!r} has ended; count its tokens before it ends")
            st.tokens[kind] = st.tokens.get(kind, 0) + n
            if kind != GENERATION:
                return                   # shares follow generation tokens: other kinds are only counted
            t = self._now()
            if n:
                st.reports.append((st.known_until, t, n))
            # Generation up to t is now known; the next report covers the time from here. Settling
            # waits for the next end or settle(): a stream's reports come often and cost nothing here.
            st.known_until = t
            self._times.add(t)

    def _end(self, st: ReqState, at: float | None = None) -> None:
        with self._lock:
            if st.end is not None:
                return
            t = max(self._now() if at is None else max(at, self._frontier), st.start)
            st.end = t
            st.known_until = float("inf")
            self._times.add(t)
            self._ended_at_frontier |= t <= self._frontier
        # A ledger mark at the end makes the sampler read the GPUs' counters at its next tick (as a
        # window's edge does), so the frontier passes the end in a read or two, not at the next slow
        # counter read. No poke: waking every reader per request would cost a busy server more than
        # the tick it saves; ``result()`` pokes when someone waits. While an earlier end's mark is
        # still pending, the read that resolves it comes after this end too: no new mark (a busy
        # server ends a request every millisecond; one mark per sampler tick is enough).
        mark = self._end_mark
        if self.meter.running and (mark is None or mark.done.is_set()):   # a stopped sampler would leave it pending
            self._end_mark = self.meter.ledger.mark(t)
        if self.settle_on_end:
            self._emit(self._settle())

    def _deadline(self, st: ReqState, timeout_s: float | None) -> float:
        if st.end is None:
            raise RuntimeError(f"request {st.request_id!r} has not ended")
        return time.monotonic() + (self.meter.settle_timeout_s() if timeout_s is None else timeout_s)

    def _try_result(self, st: ReqState, deadline: float) -> RequestResult | None:
        """The final result, or None while waiting for a GPU read past the end is worth it."""
        _, blocked_by_ledger = self.settle()
        if st.result is not None:
            return st.result
        if blocked_by_ledger and self.meter.running and time.monotonic() < deadline:
            self.meter.sampler.poke()       # a read past the end settles it sooner
            return None
        with self._lock:
            return st.result or self._provisional(st)

    def _result(self, st: ReqState, timeout_s: float | None) -> RequestResult:
        deadline = self._deadline(st, timeout_s)
        while (res := self._try_result(st, deadline)) is None:
            time.sleep(0.01)
        return res

    async def _aresult(self, st: ReqState, timeout_s: float | None) -> RequestResult:
        deadline = self._deadline(st, timeout_s)
        while (res := self._try_result(st, deadline)) is None:
            await asyncio.sleep(0.01)       # never block the event loop while the GPUs are read
        return res

    def settle(self) -> tuple[list[RequestResult], bool]:
        """Hand out energy up to the frontier. Returns the requests that became final, and
        whether the ledger (not an open request) is what holds the frontier back."""
        done = self._settle()
        with self._lock:
            limit_ledger = self._covered(self._now())
            blocked = any(st.end is not None and st.result is None and limit_ledger < st.end for st in self._live)
        self._emit(done)
        return done, blocked

    # -- reading -------------------------------------------------------------------------
    @property
    def idle_j(self) -> dict[str, float]:
        """Per GPU, the settled energy burned while no request was open on it."""
        with self._lock:
            return dict(self._idle_j)

    @property
    def settled_until(self) -> float:
        """Energy up to this time has been handed out (to requests and idle), for good."""
        with self._lock:
            return self._frontier

    @property
    def totals(self) -> dict[str, tuple[int, float]]:
        """Per model: (final requests, their energy in J), both monotonic (Prometheus counters)."""
        return self._summary.totals

    @property
    def open_requests(self) -> int:
        with self._lock:
            return sum(1 for st in self._live if st.end is None)

    def view(self) -> RequestView:
        return RequestView(self.totals, self.idle_j, self.summary())

    def summary(self) -> dict[str, ModelSummary]:
        """Per model: p50/p90 J/request and J/token over its most recent final requests."""
        return self._summary.summary()

    # -- internals (under the lock) ------------------------------------------------------
    def _now(self) -> float:
        # Event times never go below the frontier, so an interval is never handed out twice.
        return max(self.meter.clock.now(), self._frontier)

    def _keys(self) -> list[str]:
        return chosen_devices(self.meter.ledger.devices, self.energy_of)

    def _covered(self, now: float) -> float:
        """The latest time whose energy the ledger will not revise on any GPU: one refresh period
        behind its last reading (a counter's last step is dated from the reads after it). A GPU
        silent for MAX_LAG_S is skipped."""
        covered = now
        keys = set(self._keys())
        for k, s in self.meter.snapshot().items():
            if k in keys and s.t is not None and now - s.t < MAX_LAG_S:
                covered = min(covered, s.t - s.device.update_period_s)
        return covered

    def _start_frontier(self) -> bool:
        """Pin the frontier's energy once every GPU has a reading (the ledger's history holds a
        device's first value for any earlier time, so energy before it counts as none)."""
        if self._v_frontier is not None:
            return True
        keys = set(self._keys())
        if any(s.t is None for k, s in self.meter.snapshot().items() if k in keys) or self._covered(self.meter.clock.now()) < self._frontier:
            return False                 # the ledger's value at the start is not settled yet
        self._v_frontier = dict(self.meter.ledger.values_at(self._frontier))
        return True

    def _settle(self) -> list[RequestResult]:
        """Settle up to the frontier. The heavy part (the ledger's history at every bound) runs
        outside the main lock, so requests begin, report and end meanwhile: every event after
        the snapshot below is at or after ``limit``, and no new report span starts before it."""
        with self._settle_lock:
            with self._lock:
                if not self._start_frontier():
                    return []
                now = self._now()
                limit = min([self._covered(now)] + [st.known_until for st in self._live if st.end is None])
                if limit <= self._frontier:
                    return self._finish(self._frontier) if self._ended_at_frontier else []
                bounds = sorted(t for t in self._times if self._frontier < t < limit) + [limit]
                live = list(self._live)
                a0, va = self._frontier, self._v_frontier
            assert va is not None
            keys = self._keys()
            shares: dict[int, dict[str, float]] = {}
            idle: dict[str, float] = {}
            for i, (a, b, open_now) in enumerate(sweep(a0, bounds, live), 1):
                vb = self.meter.ledger.values_at(b)
                split(a, b, va, vb, keys, open_now, shares, idle)
                va = vb
                if i % YIELD_EVERY == 0:
                    # A busy server's settle covers thousands of bounds (~20 us each); holding the
                    # GIL through it delays the proxy's requests by up to a switch interval (5 ms).
                    time.sleep(YIELD_S)
            with self._lock:
                for st in live:
                    for k, e in shares.get(id(st), {}).items():
                        st.energy_j += e
                        st.device_j[k] = st.device_j.get(k, 0.0) + e
                for k, e in idle.items():
                    self._idle_j[k] = self._idle_j.get(k, 0.0) + e
                self._frontier, self._v_frontier = bounds[-1], dict(va)
                return self._finish(self._frontier)

    def _finish(self, a: float) -> list[RequestResult]:
        self._ended_at_frontier = False
        self._times = {t for t in self._times if t > a}
        done = []
        for st in self._live:
            if st.end is not None and st.end <= a:
                st.result = self._make_result(st, st.energy_j, st.device_j, final=True)
                done.append(st.result)
            else:
                st.reports = [r for r in st.reports if r[1] > a]      # spans before the frontier are spent
        self._live = [st for st in self._live if st.result is None]
        self._summary.add(done)
        return done

    def _provisional(self, st: ReqState) -> RequestResult:
        assert st.end is not None
        keys = self._keys()
        extra: dict[int, dict[str, float]] = {}
        bounds = sorted(t for t in self._times if self._frontier < t < st.end) + [st.end]
        va = self._v_frontier
        if va is None:
            return self._make_result(st, 0.0, {}, final=False)      # no GPU reading yet
        for a, b, open_now in sweep(self._frontier, bounds, self._live):
            vb = self.meter.ledger.values_at(b)
            split(a, b, va, vb, keys, open_now, extra, {})
            va = vb
        dev = dict(st.device_j)
        for k, e in extra.get(id(st), {}).items():
            dev[k] = dev.get(k, 0.0) + e
        return self._make_result(st, sum(dev.values()), dev, final=False)

    def _make_result(self, st: ReqState, energy_j: float, device_j: Mapping[str, float], final: bool) -> RequestResult:
        assert st.end is not None
        src = self.intensity_g_per_kwh
        intensity = src() if callable(src) else src
        co2 = None if intensity is None else energy_j / J_PER_KWH * intensity
        return RequestResult(st.request_id, st.model, st.start, st.end, energy_j, dict(st.tokens),
                             dict(device_j), final, co2)

    def _emit(self, done: list[RequestResult]) -> None:
        if self.on_result is not None:
            for r in done:
                self.on_result(r)



__all__ = ["ALL", "GENERATION", "GPUS", "PROMPT", "ModelSummary", "Request", "RequestAccountant", "RequestResult",
           "RequestView"]
