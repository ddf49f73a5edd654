"""Running a child command under a meter: signals, checkpoints, the final record.

Nothing measured is lost: checkpoint records are appended every ``checkpoint_s``; SIGTERM and
SIGINT are forwarded to the child and the final record is still written; a child that crashes,
is killed, or cannot be started still gets a record.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .meter import Meter
from .model import WindowResult
from .timeline import Timeline
from .windows import Window
from .exporters.records import RecordWriter, RunIdentity, run_record

TIMELINE_PERIOD_S = 1.0
TIMELINE_LAG_S = 2.5      # the slowest sensor (1 s) has certainly reported by then


@dataclass
class RunOutcome:
    status: str                  # completed | failed | killed | not_found
    exit_code: int
    result: WindowResult
    record: dict
    message: str = ""


@dataclass
class JobRunner:
    meter: Meter
    ident: RunIdentity
    writer: RecordWriter
    checkpoint_s: float = 30.0
    kill_grace_s: float = 10.0
    carbon: Any = None                              # CarbonAccountant-like: add_energy/add_device_hours/snapshot
    on_tick: list[Callable[[], None]] = field(default_factory=list)   # e.g. pushgateway pushes
    on_result: list[Callable[[WindowResult], None]] = field(default_factory=list)  # before the last tick
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self._child: subprocess.Popen | None = None
        self._signals: list[int] = []
        self._lock = threading.Lock()
        self._carbon_t: float | None = None
        self._carbon_e = 0.0

    # -- signals ---------------------------------------------------------------
    def _forward(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)
        child = self._child
        if child is None or child.poll() is not None:
            return
        # At a terminal, Ctrl-C already reached the child through the process group.
        if signum == signal.SIGINT and os.isatty(0):
            return
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    def _install_signals(self) -> dict[int, Any]:
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                old[sig] = signal.signal(sig, self._forward)
            except ValueError:   # not the main thread (tests calling run() from a thread)
                break
        return old

    # -- carbon ------------------------------------------------------------------
    def _feed_carbon(self, window: Window) -> None:
        """Give the accountant each interval's energy with its own wall times (time-varying intensity)."""
        if self.carbon is None:
            return
        now_t = self.meter.clock.now()
        partial = window.partial() if not window.ended else window.result()
        total = partial.total_energy_j
        t0 = self._carbon_t if self._carbon_t is not None else partial.start_t
        if total > self._carbon_e or now_t > t0:
            self.carbon.add_energy(max(0.0, total - self._carbon_e), self.meter.clock.wall(t0),
                                   self.meter.clock.wall(partial.end_t))
            gpus = sum(1 for d in partial.devices if d.component.value == "gpu")
            if gpus:
                self.carbon.add_device_hours(gpus, max(0.0, partial.end_t - t0) / 3600.0)
        self._carbon_e, self._carbon_t = total, partial.end_t

    def _carbon_record(self) -> dict | None:
        return None if self.carbon is None else self.carbon.snapshot().to_record()

    # -- main ------------------------------------------------------------------
    def run(self, cmd: Sequence[str]) -> RunOutcome:
        meter = self.meter
        meter.start()
        window = meter.window(self.ident.job)
        t0 = window._start.t  # type: ignore[union-attr]
        timeline = Timeline(t0=t0)
        self._timeline_t = t0
        timeline.add(t0, meter.ledger.values_at(t0))
        old = self._install_signals()
        status, code, message = "completed", 0, ""
        try:
            try:
                self._child = subprocess.Popen(list(cmd), env=self.env)
            except FileNotFoundError:
                status, code, message = "not_found", 127, f"command not found: {cmd[0]}"
            except PermissionError:
                status, code, message = "not_found", 126, f"command not executable: {cmd[0]}"
            except OSError as exc:
                status, code, message = "not_found", 126, f"cannot run {cmd[0]}: {exc.strerror or exc}"
            if self._child is not None:
                code = self._wait(window, timeline)
                status = "completed" if code == 0 else ("killed" if code < 0 else "failed")
                if code < 0:
                    code = 128 - code
        finally:
            window.end()
            result = window.result()
            meter.stop()
            self._extend_timeline(timeline, result.end_t, final=True)
            self._feed_carbon(window)
            for done in self.on_result:
                done(result)
            for hook in self.on_tick:
                hook()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        record = run_record(result, self.ident, status=status, exit_code=code, carbon=self._carbon_record(),
                            timeline=timeline.to_record(), errors=self._errors())
        self.writer.write(record)
        return RunOutcome(status, code, result, record, message)

    def _wait(self, window: Window, timeline: Timeline) -> int:
        child = self._child
        assert child is not None
        clock = self.meter.clock
        next_checkpoint = clock.now() + self.checkpoint_s
        term_at: float | None = None
        while True:
            try:
                rc = child.wait(timeout=TIMELINE_PERIOD_S)
                return rc
            except subprocess.TimeoutExpired:
                pass
            now = clock.now()
            self._extend_timeline(timeline, now - TIMELINE_LAG_S)
            if self._signals and term_at is None and signal.SIGTERM in self._signals:
                term_at = now
            if term_at is not None and now - term_at > self.kill_grace_s:
                child.kill()       # the child ignored SIGTERM past the grace period
            if now >= next_checkpoint:
                next_checkpoint = now + self.checkpoint_s
                self._checkpoint(window, timeline)

    def _extend_timeline(self, timeline: Timeline, until: float, final: bool = False) -> None:
        """Timeline points each TIMELINE_PERIOD_S, read from the ledger's history once the
        sampler has covered them (so slow sensors do not show as spikes)."""
        while self._timeline_t + TIMELINE_PERIOD_S <= until:
            self._timeline_t += TIMELINE_PERIOD_S
            timeline.add(self._timeline_t, self.meter.ledger.values_at(self._timeline_t))
        if final and until > self._timeline_t:
            self._timeline_t = until
            timeline.add(until, self.meter.ledger.values_at(until))

    def _checkpoint(self, window: Window, timeline: Timeline) -> None:
        self._feed_carbon(window)
        partial = window.partial()
        record = run_record(partial, self.ident, status="running", exit_code=None, checkpoint=True,
                            carbon=self._carbon_record(), timeline=timeline.to_record(), errors=self._errors())
        try:
            self.writer.write(record, final=False)
        except OSError as exc:   # a full disk must not kill the job; the final write will retry
            sys.stderr.write(f"wattmeter: warning: checkpoint not written: {exc}\n")
        for hook in self.on_tick:
            hook()

    def _errors(self) -> dict[str, int]:
        return {f"{name}:{kind}": n for name, st in self.meter.status.items() for kind, n in st.errors.items()}
