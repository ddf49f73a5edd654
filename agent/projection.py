"""Projection to completion: total energy, CO2e and end time of a job from its progress so far.

A job reports a progress fraction in [0, 1] (callbacks from ``max_steps``, ``meter.progress()``,
or a progress file that ``run`` watches). Each report is paired with the energy metered so far.

Why the recent rate and not the average since start: jobs warm up (data loading, compilation,
the first slow steps) at a different energy per unit of progress than their steady state, so the
fit is a least-squares slope over the latest half of the progress seen. The band comes from the
slope's standard error (2 sigma) and how much the rate drifted inside that window, with a floor of 1 % because no
past rate predicts the future exactly. It narrows as the remaining fraction shrinks.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError

J_PER_KWH = 3.6e6
MIN_FRACTION = 0.01          # publish from the first percent of progress on
RATE_FLOOR = 0.01            # the band is never narrower than 1 % of the remaining energy
POLL_MIN_S = 0.5             # a progress file is looked at no more often than this
RACY_NS = 2_000_000_000      # a file changed this recently may change again within its mtime tick


class ProgressError(UsageError):
    """A progress value that is not a fraction in [0, 1]."""


def check_fraction(fraction: Any, origin: str = "progress") -> float:
    """``fraction`` as a float in [0, 1], or a one-line :class:`ProgressError` naming it."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ProgressError(f"{origin} {fraction!r} is not a number; report a fraction in [0, 1] "
                            "such as 0.25, or STEP/TOTAL such as 250/1000") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ProgressError(f"{origin} {fraction!r} is outside [0, 1]; report done/total as a fraction, e.g. 0.25")
    return value


def parse_progress_text(text: str, origin: str) -> float:
    """The body of a progress file: ``0.42`` or ``420/1000``."""
    body = text.strip()
    if "/" in body:
        done, _, total = body.partition("/")
        try:
            d, t = float(done), float(total)
        except ValueError:
            raise ProgressError(f"{origin}: {body!r} is not STEP/TOTAL; write e.g. 420/1000 or 0.42") from None
        if not t > 0:
            raise ProgressError(f"{origin}: total in {body!r} must be above 0; write e.g. 420/1000")
        return check_fraction(d / t, origin)
    return check_fraction(body, origin)


class ProgressFile:
    """A progress file a job writes, followed cheaply: one ``stat`` per look, at most every
    ``min_interval_s``, and a read only when its mtime, size or inode changed.

    mtime has the file system's granularity (a few ms, a second on some), so two writes inside
    one tick of the same size ("0.41" then "0.42") leave the same stat behind. As git does for
    its index, a file whose mtime was within ``RACY_NS`` of the last read is read again at the
    next look until it is older than that; a read that finds the same text returns None."""

    def __init__(self, path: str, min_interval_s: float = POLL_MIN_S) -> None:
        self.path = path
        self.min_interval_s = min_interval_s
        self.reads = 0                  # file reads so far (stats are not counted)
        self._last_look: float | None = None
        self._key: tuple[int, int, int] | None = None
        self._racy = False
        self._text: str | None = None

    def read_if_changed(self, now: float, force: bool = False) -> str | None:
        """The file's text when it changed since the last read, else None. ``now`` (any clock
        that moves forward) spaces the looks; ``force`` looks even if the last was just now.
        A missing file is None; other OSErrors and undecodable text are raised."""
        last = self._last_look
        if not force and last is not None and 0.0 <= now - last < self.min_interval_s:
            return None
        self._last_look = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._key = None
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._key and not self._racy:
            return None
        text = Path(self.path).read_text(encoding="utf-8")
        self.reads += 1
        self._key = key
        self._racy = time.time_ns() - st.st_mtime_ns < RACY_NS
        if text == self._text:
            return None
        self._text = text
        return text


@dataclass(frozen=True)
class ProgressSample:
    t_s: float           # monotonic (or wall) seconds; the projection's end time is on the same clock
    fraction: float
    energy_j: float      # energy metered so far


@dataclass(frozen=True)
class Projection:
    fraction: float
    energy_j: float                 # metered so far
    total_j: float                  # projected at completion
    total_low_j: float
    total_high_j: float
    end_t_s: float                  # on the samples' clock
    end_low_t_s: float
    end_high_t_s: float
    samples: int                    # samples used for the fit

    @property
    def total_kwh(self) -> float:
        return self.total_j / J_PER_KWH

    def emissions_g(self, g_per_kwh: float, pue: float = 1.0) -> tuple[float, float, float]:
        """(central, low, high) location-based grams CO2e at ``g_per_kwh`` and ``pue``."""
        k = pue * g_per_kwh / J_PER_KWH
        return self.total_j * k, self.total_low_j * k, self.total_high_j * k

    def as_record(self, g_per_kwh: float | None = None, pue: float = 1.0,
                  to_wall: Callable[[float], float] = lambda t: t) -> dict[str, Any]:
        """The ``projection`` object of a run record (docs/decisions.md)."""
        out: dict[str, Any] = {
            "fraction": round(self.fraction, 6),
            "energy_j": round(self.energy_j, 3),
            "projected_energy_j": round(self.total_j, 3),
            "projected_energy_j_low": round(self.total_low_j, 3),
            "projected_energy_j_high": round(self.total_high_j, 3),
            "projected_kwh": self.total_j / J_PER_KWH,
            "projected_end_unix": round(to_wall(self.end_t_s), 3),
            "projected_end_unix_low": round(to_wall(self.end_low_t_s), 3),
            "projected_end_unix_high": round(to_wall(self.end_high_t_s), 3),
        }
        if g_per_kwh is not None:
            c, lo, hi = self.emissions_g(g_per_kwh, pue)
            out.update(projected_emissions_g=round(c, 3), projected_emissions_g_low=round(lo, 3),
                       projected_emissions_g_high=round(hi, 3))
        return out


def _slope(samples: list[ProgressSample], attr: str) -> tuple[float, float]:
    """Least-squares slope of ``attr`` against progress, and its standard error.

    A regression over every sample in the window, not the two end points: progress moves in
    steps, so any one sample's energy is ahead of its fraction by part of a step."""
    n = len(samples)
    xs = [s.fraction for s in samples]
    ys = [getattr(s, attr) for s in samples]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n <= 2:
        return slope, 0.0
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return slope, math.sqrt(resid / (n - 2) / sxx)


def _rate(samples: list[ProgressSample], attr: str) -> tuple[float, float]:
    """Per-unit-progress rate of ``attr`` over the window and its band half-width."""
    rate, stderr = _slope(samples, attr)
    # Drift: the later half of the window against the whole window.
    mid = samples[0].fraction + (samples[-1].fraction - samples[0].fraction) / 2.0
    late = [s for s in samples if s.fraction >= mid]
    drift = 0.0
    if len(late) >= 3:
        drift = abs(_slope(late, attr)[0] - rate)
    return rate, max(2.0 * stderr, drift, RATE_FLOOR * abs(rate))


class ProgressTracker:
    """Collects (time, fraction, energy) samples and projects the job to completion.

    Progress that goes backwards (a job resumed from an earlier checkpoint) returns a warning and
    restarts the fit from that sample; energy already metered is kept.
    """

    def __init__(self, min_fraction: float = MIN_FRACTION) -> None:
        self.min_fraction = min_fraction
        self._samples: list[ProgressSample] = []     # first sample at each new fraction: the fit
        self._latest: ProgressSample | None = None   # the latest sample: the base energy and time
        self.warnings: list[str] = []

    @property
    def fraction(self) -> float | None:
        return self._samples[-1].fraction if self._samples else None

    @property
    def last_t_s(self) -> float | None:
        return self._latest.t_s if self._latest else None

    def add(self, t_s: float, fraction: Any, energy_j: float, origin: str = "progress") -> str | None:
        """Add a sample. Raises :class:`ProgressError` outside [0, 1]; returns a warning or None."""
        value = check_fraction(fraction, origin)
        warning = None
        if self._samples:
            last = self._samples[-1]
            if value < last.fraction:
                warning = (f"{origin} went backwards from {last.fraction:g} to {value:g}; "
                           "projection restarts from here")
                self.warnings.append(warning)
                self._samples = []
                self._latest = None
            elif value == last.fraction:
                # No new progress: nothing to fit, but the energy and time spent stalled still count.
                self._latest = ProgressSample(t_s, value, energy_j)
                return None
        self._samples.append(ProgressSample(t_s, value, energy_j))
        self._latest = self._samples[-1]
        return warning

    def projection(self) -> Projection | None:
        """The projection, or None before ``min_fraction`` of progress over at least two samples."""
        if len(self._samples) < 2:
            return None
        last = self._samples[-1]
        if last.fraction < self.min_fraction or last.fraction <= self._samples[0].fraction:
            return None
        # The latest half of the progress seen (at least the last two samples).
        cut = self._samples[0].fraction + (last.fraction - self._samples[0].fraction) / 2.0
        window = [s for s in self._samples if s.fraction >= cut]
        if len(window) < 2:
            window = self._samples[-2:]
        remaining = 1.0 - last.fraction
        e_rate, e_half = _rate(window, "energy_j")
        t_rate, t_half = _rate(window, "t_s")
        last = self._latest or last
        total = last.energy_j + remaining * e_rate
        low = max(last.energy_j, last.energy_j + remaining * (e_rate - e_half))
        high = last.energy_j + remaining * (e_rate + e_half)
        end = last.t_s + remaining * t_rate
        return Projection(
            fraction=last.fraction, energy_j=last.energy_j, total_j=total, total_low_j=low, total_high_j=high,
            end_t_s=end, end_low_t_s=max(last.t_s, last.t_s + remaining * (t_rate - t_half)),
            end_high_t_s=last.t_s + remaining * (t_rate + t_half), samples=len(window))


def render_projection(p: Projection, g_per_kwh: float | None = None, pue: float = 1.0) -> str:
    """One line for summaries and callback logs."""
    text = (f"projected {p.total_j / J_PER_KWH:,.4f} kWh ({p.total_low_j / J_PER_KWH:,.4f}-"
            f"{p.total_high_j / J_PER_KWH:,.4f}) at {p.fraction:.1%} done")
    if g_per_kwh is not None:
        c, lo, hi = p.emissions_g(g_per_kwh, pue)
        text += f", {c:,.1f} g CO2e ({lo:,.1f}-{hi:,.1f})"
    return text


def energy_so_far_j(snapshot: Any) -> float:
    """Energy in a ledger snapshot, per component the process-tree share where one exists, else
    the host figure (as WindowResult totals do, so CPU is not counted twice)."""
    from .model import Component, Scope

    total = 0.0
    for comp in Component:
        parts = [s for s in snapshot.values() if s.device.component == comp]
        scoped = [s for s in parts if s.device.scope == Scope.PROCESS]
        total += sum(s.energy_j for s in scoped or parts)
    return total


class StepProgress:
    """Progress from a step count (``max_steps`` in HF and Lightning, or ``meter.progress``), with
    the projection as flat numbers for trainer logs. Thread-safe; a bad value raises ProgressError."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self.tracker = ProgressTracker()
        self._warned = False

    def fraction(self, t_s: float, fraction: Any, energy_j: float) -> Projection | None:
        import logging

        with self._lock:
            warning = self.tracker.add(t_s, fraction, energy_j)
            projection = self.tracker.projection()
        if warning:
            logging.getLogger("wattmeter").warning("%s", warning)
        return projection

    def step(self, t_s: float, step: Any, total: Any, energy_j: float) -> Projection | None:
        """``step`` of ``total``; ignored (None) when the total is unknown (<= 0, e.g. max_steps -1)."""
        try:
            n, of = float(step), float(total)
        except (TypeError, ValueError):
            return None
        if not of > 0:
            return None
        return self.fraction(t_s, min(1.0, max(0.0, n / of)), energy_j)

    def figures(self) -> dict[str, float]:
        """``projected_energy_kwh`` (and low/high) and ``projected_remaining_s`` once there is a projection."""
        with self._lock:
            p = self.tracker.projection()
            last_t = self.tracker.last_t_s or 0.0
        if p is None:
            return {}
        return {"progress": p.fraction, "projected_energy_kwh": p.total_kwh,
                "projected_energy_kwh_low": p.total_low_j / J_PER_KWH,
                "projected_energy_kwh_high": p.total_high_j / J_PER_KWH,
                "projected_remaining_s": max(0.0, p.end_t_s - last_t)}
