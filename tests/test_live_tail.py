"""The live tail of a counter GPU (what a scrape reads between counter reads): the trailing mean
fitted to several recent counter points, carried over its newest half window by the identity
E(t) = E(t - w) + w M(t). Fed to the ledger by hand, against exact integrals."""
from __future__ import annotations

import random

import pytest

from wattmeter.ledger import Ledger
from wattmeter.model import Component, Device, Reading, Source
from wattmeter.shaping import InstantSamples
from wattmeter.trailing_mean import TrailingMean

GPU = Device("gpu0", Component.GPU, Source.COUNTER)
PERIOD_S = 0.4          # a square load: 500 W for 0.2 s, 100 W for 0.2 s


def power_w(t: float) -> float:
    return 500.0 if (t % PERIOD_S) < 0.2 else 100.0


def energy_j(t: float) -> float:
    whole, part = divmod(t, PERIOD_S)
    return whole * 120.0 + 500.0 * min(part, 0.2) + 100.0 * max(0.0, part - 0.2)


def feed(ledger: Ledger, t0: float, t1: float, mean_gain: float, counter_every_s: float) -> None:
    """Counter values every ``counter_every_s``; 100 ms trailing means (reading ``mean_gain``
    times the truth) and 20 ms instant samples between."""
    k, next_counter = 0, t0
    while True:
        t = t0 + k * 0.02
        if t > t1:
            return
        readings = [Reading("gpu0", t, power_w=power_w(t - 0.01))]
        if k % 5 == 0 and t >= 1.0:
            readings.append(Reading("gpu0", t, mean_w=mean_gain * (energy_j(t) - energy_j(t - 1.0)), mean_window_s=1.0))
        if t >= next_counter:
            readings.append(Reading("gpu0", t, energy_j=energy_j(t)))
            next_counter += counter_every_s
        ledger.record(readings)
        k += 1


@pytest.mark.parametrize("gain", [1.0, 1.01])
def test_the_tail_between_counter_reads_follows_the_truth(gain):
    ledger = Ledger([GPU])
    feed(ledger, 0.0, 30.0, gain, counter_every_s=5.0)
    d = ledger.snapshot(30.0)["gpu0"]
    last = 30.0
    # Go on without counter reads: the tail is all the estimate.
    worst = 0.0
    for step in range(1, 5):
        t_end = last + 1.0 * step
        feed_tail(ledger, t_end - 1.0 + 0.02, t_end, gain)
        got = ledger.snapshot(t_end)["gpu0"].energy_j - d.energy_j
        worst = max(worst, abs(got - (energy_j(t_end) - energy_j(last))) / (energy_j(t_end) - energy_j(last)))
    # A 1 % gain of the mean is fitted out (scale), and the newest half second is no guess.
    assert worst < 0.01


def feed_tail(ledger: Ledger, t0: float, t1: float, gain: float) -> None:
    t = t0
    while t <= t1 + 1e-9:
        readings = [Reading("gpu0", t, power_w=power_w(t - 0.01))]
        if round(t / 0.02) % 5 == 0:
            readings.append(Reading("gpu0", t, mean_w=gain * (energy_j(t) - energy_j(t - 1.0)), mean_window_s=1.0))
        ledger.record(readings)
        t = round(t + 0.02, 6)


def square(period_s: float):
    """650/90 W, half a period each: (power at t, energy up to t)."""
    def p(t: float) -> float:
        return 650.0 if (t % period_s) < 0.5 * period_s else 90.0

    def e(t: float) -> float:
        whole, part = divmod(t, period_s)
        half = 0.5 * period_s
        return whole * 370.0 * period_s + 650.0 * min(part, half) + 90.0 * max(0.0, part - half)
    return p, e


def tail_errors(period_s: float, seed: int = 4) -> tuple[TrailingMean, list[float], list[float]]:
    """Point samples read every 100 ms +-40 % (a counter GPU's steady reads) with the exact 1 s
    trailing mean; after each read, the energy of the next 0-150 ms as ``recent`` predicts it
    and as the held sample would, less the truth."""
    p, e = square(period_s)
    rng = random.Random(seed)
    tm = TrailingMean(InstantSamples(4096))
    predicted, held = [], []
    t = 1.5
    while t < 40.0:
        tm.add(t, e(t) - e(t - 1.0), 1.0)
        tm.add_sample(t, p(t))
        if t > 10.0:
            b = t + rng.uniform(0.0, 0.15)
            truth = e(b) - e(t)
            predicted.append(tm.recent(t, b) - truth)
            held.append(p(t) * (b - t) - truth)
        t += 0.1 * rng.uniform(0.6, 1.4)
    return tm, predicted, held


def test_a_sample_of_a_load_faster_than_the_reads_gives_way_to_the_mean():
    # A 100 ms square read at ~10 Hz: a sample says little about the next 100 ms.
    tm, predicted, held = tail_errors(0.1)
    assert tm.persistence.held_s(0.0, 0.1) < 0.08       # of 0.1 s: much of it goes to the mean
    rms = lambda xs: (sum(x * x for x in xs) / len(xs)) ** 0.5      # noqa: E731
    assert rms(predicted) < 0.8 * rms(held)


def test_a_slow_load_keeps_its_sample():
    # A 2 s square read at ~10 Hz: the sample is the best guess for the next moments.
    tm, predicted, held = tail_errors(2.0)
    assert tm.persistence.held_s(0.0, 0.1) > 0.085
    rms = lambda xs: (sum(x * x for x in xs) / len(xs)) ** 0.5      # noqa: E731
    assert rms(predicted) < 1.1 * rms(held)


def test_a_steady_load_holds_its_sample():
    tm = TrailingMean(InstantSamples(64))
    for k in range(40):
        t = 1.0 + 0.1 * k
        tm.add(t, 400.0, 1.0)
        tm.add_sample(t, 400.0)
    assert tm.persistence.held_s(0.0, 0.2) == 0.2
    assert tm.recent(4.9, 5.0) == pytest.approx(40.0)
