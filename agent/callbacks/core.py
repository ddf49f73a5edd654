"""The common core of the training callbacks: one window over training, and every optimizer
step a request of the per-request accounting (wattmeter.requests), so the step, interval and
cumulative figures all come from the same split of the ledger's energy.

Steps are contiguous requests: the first begins where the window begins, each ends when its
optimizer step ends and the next begins at that instant, and the last (the tail after the last
step) ends where the window ends. So every joule of the window lands in exactly one request,
and the interval figures of all logs sum to the final cumulative figures.

A step's figures are final once the ledger has read every device past its end (about one
refresh period, ~0.1 s, later). Logs never wait for that: a log's interval holds the steps that
became final since the previous log; a step still open to revision goes to the next interval.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..model import Component
from ..projection import StepProgress, energy_so_far_j
from ..requests import ALL, Request, RequestAccountant, RequestResult
from ..value import LoggedValue

if TYPE_CHECKING:  # pragma: no cover
    from ..meter import Meter
    from ..model import WindowResult
    from ..windows import Window

TRAINING = "training"     # the token kind training callbacks count under
log = logging.getLogger("wattmeter.callbacks")


def gpu_notice(meter: "Meter") -> str | None:
    """One line saying when the GPU figures are not measured ones, else None."""
    gpus = [d for d in meter.ledger.devices if d.component == Component.GPU]
    if not gpus:
        return "wattmeter: no GPU is metered (none found or --no-gpu); energy covers CPU and RAM only"
    if meter.simulated:
        return f"wattmeter: the {len(gpus)} GPU(s) are SIMULATED (fake NVML); energy figures are not measurements"
    return None


@dataclass
class Span:
    """Final step requests added up: energy, tokens, time and optimizer steps."""

    energy_j: float = 0.0
    tokens: int = 0
    duration_s: float = 0.0
    steps: int = 0

    def add(self, r: RequestResult, steps: int) -> None:
        self.energy_j += r.energy_j
        self.tokens += r.tokens.get(TRAINING, 0)
        self.duration_s += r.duration_s
        self.steps += steps

    def figures(self, prefix: str) -> dict[str, float]:
        e = self.energy_j
        out = {f"{prefix}energy_j": e, f"{prefix}avg_power_w": e / self.duration_s if self.duration_s > 0 else 0.0,
               f"{prefix}tokens": float(self.tokens)}
        if self.tokens > 0:
            out[f"{prefix}joules_per_token"] = e / self.tokens
        return out


class Tracker:
    """A window over training and its steps as requests (see the module doc)."""

    def __init__(self, meter: "Meter | None", name: str) -> None:
        self._meter = meter
        self.name = name
        self.window: Window | None = None
        self.result: WindowResult | None = None
        self.tokens = 0
        self.notice: str | None = None
        self.accountant: RequestAccountant | None = None
        self._open: Request | None = None                      # the step running now
        self._pending: deque[tuple[Request, int]] = deque()    # ended, not yet counted: (request, steps)
        self._final: dict[str, RequestResult] = {}             # final results not yet counted
        self._steps = 0
        self.total = Span()                                    # every counted request since begin()
        self._interval = Span()                                # counted since the last log
        self._last_step: Span | None = None
        self._start_energy_j = 0.0
        self.reconciled_j = 0.0            # window total - sum of step requests, added to the last interval
        self.progress = StepProgress()     # decisions: projection to completion from max_steps
        self.logged = LoggedValue()        # decisions: value from logged metrics

    @property
    def meter(self) -> "Meter":
        if self._meter is None:
            from ..meter import get_meter   # the started process-wide meter, only when used

            self._meter = get_meter()
        return self._meter

    @property
    def open(self) -> bool:
        return self.window is not None and not self.window.ended

    def begin(self) -> None:
        m = self.meter
        self.accountant = RequestAccountant(m, energy_of=ALL, on_result=self._on_final)
        self.window = m.window(self.name)
        self.result = None
        self.tokens = self._steps = 0
        self._pending.clear()
        self._final = {}
        self.total, self._interval, self._last_step = Span(), Span(), None
        self.reconciled_j = 0.0
        self._open = self._next_request(self.window.start_t)
        self._start_energy_j = energy_so_far_j(m.snapshot())
        self.progress = StepProgress()     # a new window: the fit starts over from its energy
        self.notice = gpu_notice(m)
        if self.notice:
            log.warning(self.notice)

    def _next_request(self, at: float | None) -> Request:
        assert self.accountant is not None
        return self.accountant.request(f"{self.name}/step-{self._steps + 1}", model=self.name, at=at)

    def _on_final(self, r: RequestResult) -> None:
        self._final[r.request_id] = r

    def count(self, n: int) -> None:
        if n > 0 and self._open is not None:
            self.meter.add_tokens(n, TRAINING)       # the window's count
            self._open.add_tokens(n, TRAINING)       # and this step's
            self.tokens += n

    def step_done(self) -> None:
        """An optimizer step ended: its request ends now and the next step's begins at that instant."""
        if self._open is None:
            return
        ended = self._open.end()
        self._pending.append((ended, 1))
        self._steps += 1
        self._open = self._next_request(ended.end_t)

    def _count(self, r: RequestResult, steps: int) -> None:
        self.total.add(r, steps)
        self._interval.add(r, steps)
        if steps:
            self._last_step = Span()
            self._last_step.add(r, steps)

    def _drain(self) -> int:
        """Count the ended requests that are final, in order, without waiting; returns how many."""
        if self.accountant is None:
            return 0
        self.accountant.settle()
        n = 0
        while self._pending and self._pending[0][0].request_id in self._final:
            req, steps = self._pending.popleft()
            self._count(self._final.pop(req.request_id), steps)
            n += 1
        return n

    def settled(self) -> bool:
        """Has a step become final since the last log? (else a log would repeat old figures)"""
        self._drain()
        return self._interval.steps > 0

    def figures(self) -> dict[str, float]:
        """Cumulative figures of the final steps since begin() (no interval bookkeeping)."""
        self._drain()
        return self._cumulative(self.total)

    def _cumulative(self, span: Span) -> dict[str, float]:
        cum = span.figures("")
        cum.pop("tokens")
        cum["energy_kwh"] = cum["energy_j"] / 3.6e6
        cum.update(self.progress.figures())
        cum.update(self.logged.figures(cum["energy_j"]))
        return cum

    def step(self, step: object, total: object) -> None:
        """Progress ``step`` of ``total`` (ignored when the total is unknown), for the projection:
        the ledger's running energy, so the fit does not lag by the steps not yet final."""
        energy = energy_so_far_j(self.meter.snapshot())
        self.progress.step(self.meter.clock.now(), step, total, max(0.0, energy - self._start_energy_j))

    def _interval_figures(self) -> dict[str, float]:
        out = self._interval.figures("interval_")
        out["interval_steps"] = float(self._interval.steps)
        if self._last_step is not None:
            out.update(self._last_step.figures("step_"))
        self._interval = Span()
        return out

    def log_figures(self) -> dict[str, float]:
        """Cumulative, interval-since-last-log and last-final-step figures; starts a new interval."""
        self._drain()
        out = self._cumulative(self.total)
        out.update(self._interval_figures())
        return out

    def final_figures(self) -> dict[str, float]:
        """Ends the window and returns its exact result (cumulative names) plus the last interval
        (every step not yet logged, and the tail after the last step), waiting for the sampler."""
        if not self.open:
            return {}
        result = self.end(wait=True)
        if result is None:
            return {}
        out = {"energy_j": result.total_energy_j, "energy_kwh": result.energy_kwh, "avg_power_w": result.avg_power_w}
        jpt = result.joules_per_token(TRAINING)
        if jpt is not None:
            out["joules_per_token"] = jpt
        out.update(self.progress.figures())
        out.update(self.logged.figures(result.total_energy_j))
        out.update(self._interval_figures())
        return out

    def end(self, wait: bool = False) -> "WindowResult | None":
        """End the window and the tail request at the same instant; count every request."""
        if self.open:
            assert self.window is not None and self._open is not None
            self.window.end()
            self.result = self.window.result()
            self._pending.append((self._open.end(at=self.result.end_t), 0))
            self._open = None
            if wait:
                self._pending[-1][0].result()      # bounded: the GPUs read past the end
            self._drain()
            while self._pending:                   # not final in time: as they stand (provisional)
                req, steps = self._pending.popleft()
                self._count(self._final.pop(req.request_id, None) or req.result(timeout_s=0), steps)
            # The window pinned its edges when the first reads past them came; the requests read
            # the ledger one refresh period later, after it may have re-dated a counter step. The
            # difference (typically < 1e-4 of the total) goes to the last interval, so the
            # intervals of all logs sum to the window's exact total.
            self.reconciled_j = self.result.total_energy_j - self.total.energy_j
            self.total.energy_j += self.reconciled_j
            self._interval.energy_j += self.reconciled_j
        return self.result


class TrackerAccess:
    """What the HF and Lightning callbacks share on top of their ``tracker``."""

    tracker: Tracker

    def value_from_logs(self, **keys: str) -> "TrackerAccess":
        """Count logged metrics as value, e.g. ``value_from_logs(eval_accuracy="accuracy")``: the
        logs then carry ``accuracy_per_kwh`` (decisions; see docs/decisions.md)."""
        self.tracker.logged.keys.update(keys)
        return self

    @property
    def result(self) -> "WindowResult | None":
        return self.tracker.result

    def figures(self) -> dict[str, float]:
        return self.tracker.figures() if self.tracker.window is not None else {}
