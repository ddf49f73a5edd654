"""Running a child command under a meter: signals, checkpoints, the final record.

Nothing measured is lost and the child's exit code always wins:
- a first checkpoint record comes ``first_checkpoint_s`` after the start, then one every
  ``checkpoint_s``, so even a SIGKILL of the agent leaves a record of what ran;
- records go to a ``RunSink`` (``runsink.py``), which never raises: what it cannot write now it
  retries at each checkpoint and saves to a fallback at the end;
- SIGINT, SIGTERM and SIGHUP sent to the agent are forwarded to the child, whatever stdin is.
  The child stays in the agent's process group (the shell's job, so Ctrl-Z and `fg` just work).
  On Linux the signals are taken synchronously with their sender's details: one the terminal
  sent (Ctrl-C, a hangup) went to the whole foreground group, the child included, so it is not
  sent twice; one sent with kill(2) is forwarded;
- the child dies with the agent, and so does what it started (``orphans.py``): an agent
  killed by the OOM killer never leaves an orphan job holding a GPU.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from .meter import Meter
from .model import WindowResult
from .orphans import CAN_DIE_WITH_PARENT, die_with_parent, start_watchdog
from .runsink import RunFacts, RunIdentity, RunSink, SinkClose
from .timeline import Timeline
from .windows import Window

TIMELINE_PERIOD_S = 1.0
# The timeline is read from the ledger's history, which changes until a counter segment's
# neighbours are known (a few seconds) and is kept for a few minutes only (a ring). Spans older
# than TIMELINE_LAG_S are taken during the run, settled and still held; the rest, at the end,
# from the final E(t). So a run up to TIMELINE_LAG_S long is read entirely at its end.
TIMELINE_LAG_S = 30.0
WAIT_POLL_S = 0.1         # how often the child's state is polled
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SI_KERNEL = 0x80          # si_code of a signal the kernel sent (a terminal's Ctrl-C or hangup)
# Linux: signals are blocked and taken with sigtimedwait, which says who sent them.
SIGWAIT = sys.platform.startswith("linux")


@dataclass
class RunOutcome:
    status: str                  # completed | failed | killed | not_found
    exit_code: int
    result: WindowResult         # peak powers from the timeline (the ledger's one E(t))
    facts: RunFacts
    message: str = ""
    sink: SinkClose = field(default_factory=SinkClose)
    hook_errors: list[str] = field(default_factory=list)   # failed pushes etc., each said once


def _foreground_at_terminal() -> bool:
    """Whether we are in the foreground group of a controlling terminal (fallback path only)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _pending() -> set[int]:
    return signal.sigpending() & set(FORWARDED)


def _dequeue(pending: set[int]) -> list[Any]:
    """Dequeue these pending signals with their siginfo. Only signals known to be pending are
    asked for, with no wait: CPython's sigtimedwait returns an uninitialised siginfo when a wait
    is cut short by a stop/continue (EINTR) at its deadline, which would forward a made-up signal."""
    out = []
    for _ in range(len(pending)):
        info = signal.sigtimedwait(pending, 0)
        if info is None or info.si_signo not in pending:
            break
        pending = pending - {info.si_signo}
        out.append(info)
    return out


def hold_signals() -> None:
    """Hold SIGINT in the calling thread. `run` calls this before any other
    thread starts (discovery, exporters, sampler), so every thread inherits it and ``JobRunner``
    takes each SIGINT itself with its sender's details (``sigtimedwait``): only SIGINT needs
    them, since a terminal sends it to the whole group. SIGTERM and SIGHUP stay deliverable (a
    hung start-up still yields to them) and are forwarded however they arrive. A SIGINT held
    before the command starts stops the run there. No-op where sigtimedwait is unavailable."""
    if SIGWAIT:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


@dataclass
class JobRunner:
    meter: Meter
    ident: RunIdentity
    sink: RunSink
    checkpoint_s: float = 30.0
    first_checkpoint_s: float = 2.0
    kill_grace_s: float = 10.0
    carbon: Any = None                              # CarbonAccountant-like: add_energy/add_device_hours/snapshot
    on_tick: list[Callable[[], None]] = field(default_factory=list)   # e.g. pushgateway pushes
    on_result: list[Callable[[WindowResult], None]] = field(default_factory=list)  # before the last tick
    env: dict[str, str] | None = None
    child_stdout: int | None = None                 # fd for the child's stdout; None: the agent's
    start_t: float | None = None                    # when `run` was called (meter clock); None: now
    die_with_agent: bool = True

    def __post_init__(self) -> None:
        self._child: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self._signals: list[int] = []
        self._carbon_t: float | None = None
        self._carbon_e = 0.0
        self._hook_errors: dict[str, str] = {}
        self.child_exit_code: int | None = None      # set as soon as the child is reaped

    def _call(self, hook: Callable[..., None], *args: Any) -> None:
        """Run an on_tick/on_result hook (a Pushgateway push...): its failure is reported once at
        the end, and never stops the run, the records or the exit code."""
        try:
            hook(*args)
        except Exception as exc:   # noqa: BLE001 - any hook failure must not cost the job's outcome
            what = f"{type(exc).__name__}: {exc}"
            self._hook_errors.setdefault(what, f"an exporter hook failed ({what}); the run went on")

    # -- signals ---------------------------------------------------------------
    def _on_signal(self, signum: int, from_terminal: bool) -> None:
        self._signals.append(signum)
        child = self._child
        if child is None or child.returncode is not None:
            return
        if from_terminal:
            return      # the terminal signalled the whole foreground group: the child has it already
        try:
            os.kill(child.pid, signum)
        except OSError:     # gone since the poll
            pass

    def _handler(self, signum: int, _frame: Any) -> None:
        """Where signals are not taken synchronously (or reach a thread that did not block them):
        the sender is unknown, so a SIGINT while we own the terminal's foreground is taken to be
        its Ctrl-C."""
        self._on_signal(signum, signum == signal.SIGINT and _foreground_at_terminal())

    def _install_signals(self) -> tuple[dict[int, Any], set[int] | None]:
        old = {}
        for sig in FORWARDED:
            try:
                old[sig] = signal.signal(sig, self._handler)
            except ValueError:   # not the main thread (tests calling run() from a thread)
                break
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED) if SIGWAIT else None
        return old, mask

    def _take_signals(self, timeout_s: float) -> None:
        """Take the forwarded signals that are pending, waiting up to timeout_s for one (Linux),
        else just sleep."""
        if not SIGWAIT:
            time.sleep(timeout_s)
            return
        pending = _pending()
        if not pending and timeout_s > 0:
            time.sleep(timeout_s)      # blocked signals stay pending; at most WAIT_POLL_S late
            pending = _pending()
        for info in _dequeue(pending):
            self._on_signal(info.si_signo, info.si_code == SI_KERNEL)

    def _restore_signals(self, old: dict[int, Any], mask: set[int] | None) -> None:
        if mask is not None:
            for _ in _dequeue(_pending()):
                pass        # for a child that is gone: nothing left to forward
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in old.items():
            signal.signal(sig, handler)

    # -- the child -------------------------------------------------------------
    def _preexec(self) -> Callable[[], None] | None:
        parent = os.getpid()
        die = self.die_with_agent and CAN_DIE_WITH_PARENT

        def setup() -> None:   # in the child, between fork and exec
            if SIGWAIT:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)   # exec keeps the mask
            if die:
                die_with_parent(parent)
        return setup if (SIGWAIT or die) else None

    def _spawn(self, cmd: Sequence[str]) -> subprocess.Popen:
        child = subprocess.Popen(list(cmd), env=self.env, stdout=self.child_stdout, preexec_fn=self._preexec())
        if self.die_with_agent:
            self._watchdog = start_watchdog(os.getpid(), child.pid)
        return child

    # -- carbon ------------------------------------------------------------------
    def _feed_carbon(self, partial: WindowResult) -> None:
        """Give the accountant each interval's energy with its own wall times (time-varying intensity)."""
        if self.carbon is None:
            return
        total = partial.total_energy_j
        t0 = self._carbon_t if self._carbon_t is not None else partial.start_t
        if total > self._carbon_e or partial.end_t > t0:
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
        old, mask = self._install_signals()      # before the sampler starts: its thread inherits the mask
        meter.start()
        window = meter.window(self.ident.job, at=self.start_t)
        # From the window's own start (when `run` was called, before the meter started): from
        # the meter's start, the set-up's ~0.1 s of energy was packed into the spans, and a
        # steady 300 W GPU's timeline read ~306 W.
        start = window.start_t
        timeline = Timeline(t0=start if start is not None else meter.clock.now())
        status, code, message = "completed", 0, ""
        try:
            self._take_signals(0.0)      # held during start-up (hold_signals): a Ctrl-C then stops here
            try:
                if self._signals:
                    sig = self._signals[0]
                    status, code = "killed", 128 + sig
                    message = f"interrupted by {signal.Signals(sig).name} before the command started"
                else:
                    self._child = self._spawn(cmd)
            except FileNotFoundError:
                status, code, message = "not_found", 127, f"command not found: {cmd[0]}"
            except PermissionError:
                status, code, message = "not_found", 126, f"command not executable: {cmd[0]}"
            except OSError as exc:
                status, code, message = "not_found", 126, f"cannot run {cmd[0]}: {exc.strerror or exc}"
            if self._child is not None:
                code = self._wait(window, timeline)
                self.child_exit_code = 128 - code if code < 0 else code
                status = "completed" if code == 0 else ("killed" if code < 0 else "failed")
                if code < 0:
                    code = 128 - code
        finally:
            if self._watchdog is not None:
                self._watchdog.kill()
                self._watchdog.wait()
            window.end()
            result = window.result()
            meter.stop()
            timeline = self._final_timeline(timeline, result)
            result = _with_timeline_peaks(result, timeline)
            self._feed_carbon(result)
            for done in self.on_result:
                self._call(done, result)
            for hook in self.on_tick:
                self._call(hook)
            self._restore_signals(old, mask)
        facts = RunFacts(self.ident, status, code, carbon=self._carbon_record(), timeline=timeline.to_record(),
                         errors=self._errors())
        self.sink.write(result, facts)
        return RunOutcome(status, code, result, facts, message, self.sink.close(), list(self._hook_errors.values()))

    def _wait(self, window: Window, timeline: Timeline) -> int:
        child = self._child
        assert child is not None
        clock = self.meter.clock
        start = clock.now()
        next_checkpoint = start + min(self.first_checkpoint_s, self.checkpoint_s)
        next_timeline = start + TIMELINE_PERIOD_S
        term_at: float | None = None
        while True:
            rc = self._poll_child(child)
            if rc is not None:
                return rc
            now = clock.now()
            if now >= next_timeline:
                next_timeline = now + TIMELINE_PERIOD_S
                self._extend_timeline(timeline, now - TIMELINE_LAG_S)
            if term_at is None and signal.SIGTERM in self._signals:
                term_at = now
            if term_at is not None and now - term_at > self.kill_grace_s:
                child.kill()       # the child ignored SIGTERM past the grace period
            if now >= next_checkpoint:
                next_checkpoint = now + self.checkpoint_s
                self._checkpoint(window, timeline)

    def _poll_child(self, child: subprocess.Popen) -> int | None:
        """The child's exit status, or None after waiting WAIT_POLL_S (taking signals meanwhile)."""
        rc = child.poll()
        if rc is None:
            self._take_signals(WAIT_POLL_S)
            rc = child.poll()
        return rc

    # -- timeline ------------------------------------------------------------------
    def _extend_timeline(self, timeline: Timeline, until: float) -> None:
        """Spans of TIMELINE_PERIOD_S up to ``until`` (TIMELINE_LAG_S ago: settled history),
        each the difference of the ledger's E(t) at its two ends."""
        self._spans_from_ledger(timeline, until, final=False)

    def _spans_from_ledger(self, timeline: Timeline, until: float, final: bool) -> None:
        ledger = self.meter.ledger
        if timeline.last_t + (0.0 if final else TIMELINE_PERIOD_S) > until:
            return
        va = ledger.values_at(timeline.last_t)
        while timeline.last_t < until - 1e-9:
            b = timeline.last_t + TIMELINE_PERIOD_S
            if b > until:
                if not final:
                    break
                b = until
            elif final and until - b < 0.5 * TIMELINE_PERIOD_S:
                b = until                          # no sliver of a span at the end
            vb = ledger.values_at(b)
            timeline.add_span(b, {k: max(0.0, vb[k] - va.get(k, vb[k])) for k in vb})
            va = vb

    def _final_timeline(self, timeline: Timeline, result: WindowResult) -> Timeline:
        """Complete the timeline to the window's end from the final E(t), then anchor it to the
        window's energies so it integrates to what the record says."""
        self._spans_from_ledger(timeline, result.end_t, final=True)
        timeline.finish({d.key: d.energy_j for d in result.devices})
        return timeline

    def _checkpoint(self, window: Window, timeline: Timeline) -> None:
        try:
            partial = window.partial()
        except Exception as exc:   # noqa: BLE001 - a failed checkpoint must not end the job's metering
            what = f"{type(exc).__name__}: {exc}"
            self._hook_errors.setdefault(what, f"a checkpoint failed ({what}); the run went on")
            return
        self._feed_carbon(partial)
        facts = RunFacts(self.ident, "running", None, checkpoint=True, carbon=self._carbon_record(),
                         timeline=timeline.to_record(), errors=self._errors())
        self.sink.write(partial, facts)     # never raises; a failed record is kept and retried
        for hook in self.on_tick:
            self._call(hook)

    def _errors(self) -> dict[str, int]:
        return {f"{name}:{kind}": n for name, st in self.meter.status.items() for kind, n in st.errors.items()}


def _with_timeline_peaks(result: WindowResult, timeline: Timeline) -> WindowResult:
    """Peak power from the same E(t) as the energy: the highest ~1 s mean power of the timeline,
    capped by the highest power the ledger holds for the window (sensor values, or counter slopes
    over at least 1 s), so a lumpy stretch of interpolation is never reported as a peak; never
    below the average. A run too short for a full span keeps the ledger's figure."""
    devices = []
    for d in result.devices:
        peak = timeline.peak_w(d.key)
        cap = d.peak_power_w
        if peak is None:
            peak = cap if cap is not None else d.avg_power_w
        elif cap is not None:
            peak = min(peak, cap)
        devices.append(replace(d, peak_power_w=max(d.avg_power_w, peak)))
    return replace(result, devices=tuple(devices))
