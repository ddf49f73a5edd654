"""Properties of the one estimator E(t) over random loads and read patterns (issue 11)."""
from __future__ import annotations

import math

from hypothesis import example, given, settings, strategies as st

from wattmeter.ledger import Ledger
from wattmeter.model import Component, Device, Reading, Source

COUNTER = Device("gpu0", Component.GPU, Source.COUNTER)
SAMPLED = Device("gpu1", Component.GPU, Source.SAMPLED)

segments = st.lists(st.tuples(st.floats(0.05, 1.5), st.floats(0.0, 800.0)), min_size=1, max_size=10)


def trace(segs):
    edges = [0.0]
    for d, _ in segs:
        edges.append(edges[-1] + d)

    def power(t):
        for (d, p), a in zip(segs, edges):
            if t < a + d:
                return p
        return 0.0          # after the trace, as its energy (instant power agrees with the counter)

    def energy(t):
        e = 0.0
        for (d, p), a in zip(segs, edges):
            if t <= a:
                break
            e += p * min(d, t - a)
        return e
    return edges[-1], power, energy


def fed_ledger(segs, step, counter_step, resets):
    """A counter device read every ``counter_step`` with instant power every ``step`` (like a
    GPU), and a power-sampled device, fed in time order; the counter restarts at ``resets``."""
    total, power, energy = trace(segs)
    ledger = Ledger([COUNTER, SAMPLED])
    t, next_counter, k = 0.0, 0.0, 0
    while t <= total + 1.0:
        while k < len(resets) and resets[k] <= t:
            k += 1
        base = energy(resets[k - 1]) if k else -1e6
        batch = [Reading("gpu0", t, power_w=power(t)), Reading("gpu1", t, power_w=power(t))]
        if t >= next_counter:
            batch.append(Reading("gpu0", t, energy_j=energy(t) - base))
            next_counter = t + counter_step
        ledger.record(batch)
        t += step
    return ledger, total


reset_times = st.lists(st.floats(0.2, 6.0), max_size=2).map(sorted)


@settings(max_examples=60, deadline=None)
@given(segments, st.floats(0.02, 0.2), st.floats(0.1, 4.0), reset_times, st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8))
# Found by Hypothesis: a counter span with no instant energy before its measured tail fell back
# to a step over the whole span, so E stepped back by 0.125 J where the tail began.
@example([(0.75, 0.0), (0.5, 1.0)], 0.03125, 1.0, [], [0.153, 0.155])
def test_energy_is_monotonic_and_never_negative(segs, step, counter_step, resets, fracs):
    ledger, total = fed_ledger(segs, step, counter_step, resets)
    for key in ("gpu0", "gpu1"):
        times = sorted(f * (total + 2.0) for f in fracs)
        values = [ledger.energy_at(key, t) for t in times]
        assert all(v is not None for v in values)
        assert all(b >= a - 1e-6 for a, b in zip(values, values[1:]))
        snaps = [ledger.snapshot(t)[key].energy_j for t in times]
        assert all(v >= 0 for v in snaps)
        assert all(b >= a - 1e-6 for a, b in zip(snaps, snaps[1:]))


@settings(max_examples=60, deadline=None)
@given(segments, st.floats(0.02, 0.2), st.floats(0.1, 4.0), reset_times, st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6))
def test_window_energies_add_up_to_the_device_energy(segs, step, counter_step, resets, fracs):
    # Conservation: back-to-back windows over [a, z] sum to E(z) - E(a).
    ledger, total = fed_ledger(segs, step, counter_step, resets)
    times = sorted(f * total for f in fracs)
    marks = [ledger.mark(t) for t in times]
    for m in marks:
        ledger.force_resolve(m)
    for key in ("gpu0", "gpu1"):
        parts = [b.energy_j[key] - a.energy_j[key] for a, b in zip(marks, marks[1:])]
        assert all(p >= -1e-6 for p in parts)
        whole = marks[-1].energy_j[key] - marks[0].energy_j[key]
        assert math.isclose(sum(parts), whole, rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(whole, ledger.energy_at(key, times[-1]) - ledger.energy_at(key, times[0]),
                            rel_tol=1e-9, abs_tol=1e-6)


@settings(max_examples=60, deadline=None)
@given(segments, st.floats(0.02, 0.2), st.floats(0.1, 4.0), st.floats(0.0, 1.0))
def test_snapshot_equals_the_window_value_at_the_same_instant(segs, step, counter_step, frac):
    # Once the history covers t, a snapshot taken at t and a window edge at t read the same E(t).
    ledger, total = fed_ledger(segs, step, counter_step, [])
    t = frac * total
    m = ledger.mark(t)
    ledger.force_resolve(m)
    for key in ("gpu0", "gpu1"):
        assert math.isclose(ledger.values_at(t)[key], m.energy_j[key], rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(ledger.snapshot(t)[key].energy_j, m.energy_j[key], rel_tol=1e-9, abs_tol=1e-6)


@settings(max_examples=60, deadline=None)
@given(segments, st.floats(0.02, 0.2), st.floats(0.1, 4.0), reset_times, st.floats(0.0, 0.5), st.floats(0.5, 1.0),
       st.floats(0.05, 2.0))
@example([(0.75, 0.0), (0.5, 1.0)], 0.03125, 1.0, [], 0.25, 1.0, 0.5)
def test_power_timeline_integrates_to_the_energy(segs, step, counter_step, resets, fa, fb, step_s):
    ledger, total = fed_ledger(segs, step, counter_step, resets)
    a, b = fa * total, fb * total
    for key in ("gpu0", "gpu1"):
        line = ledger.power_timeline(key, a, b, step_s)
        integral = sum((t1 - t0) * w for t0, t1, w in line)
        expect = ledger.energy_at(key, b) - ledger.energy_at(key, a)
        assert math.isclose(integral, expect, rel_tol=0.005, abs_tol=1e-6)
        # Peak power lies between the average and the largest value read.
        if b > a and expect > 0:
            peak = ledger.peak_power_w(key, a, b)
            assert expect / (b - a) - 1e-6 <= peak <= 800.0 + 1e-6 or peak <= expect / (b - a) + 1e-6


def _edge_kernel_by_loop(samples, t, half):
    """The trailing mean's edge kernel summed over the samples one by one (the way it was
    computed before the running integrals): the reference the fast form must equal."""
    w = 2.0 * half
    pts = samples.between(t - half, t + half + 1.0) or samples.between(t - half - 1.0, t + half + 1.0)
    if not pts:
        return 0.0

    def prim(x):
        if x <= 0.0:
            return -(half * (x + half) + 0.5 * (x * x - half * half)) / w
        return -(half * half * 0.5) / w + (half * x - 0.5 * x * x) / w
    total, lo, prev_t = 0.0, -half, None
    for ts, v in pts:
        hi = min(ts - t, half)
        start = lo if prev_t is None else max(lo, prev_t - t)
        if hi > start:
            total += v * (prim(hi) - prim(start))
            lo = hi
        prev_t = ts
        if ts - t >= half:
            break
    if lo < half:
        total += pts[-1][1] * (prim(half) - prim(lo))
    return total


@settings(max_examples=80, deadline=None)
@given(st.floats(0.0, 3e5), st.lists(st.tuples(st.sampled_from([0.002, 0.02, 0.1, 0.3, 1.2, 2.5]),
                                              st.floats(0.0, 1000.0)), min_size=1, max_size=400),
       st.sampled_from([8, 64, 512]), st.lists(st.floats(-0.1, 1.1), min_size=1, max_size=8))
def test_the_edge_kernel_from_running_integrals_equals_the_sum_over_samples(t0, steps, keep, fracs):
    # Gaps of up to 2.5 s (a sample past t + half + 1 s says nothing of the power at t), a
    # ring that drops old samples, and clock values large enough to need the integrals' rebase.
    from wattmeter.shaping import InstantSamples
    s, t = InstantSamples(keep), t0
    for dt, w in steps:
        t += dt
        s.add(t, w)
    first, last = s.pts[0][0], s.pts[-1][0]
    for f in fracs:
        q = first - 2.0 + f * (last - first + 4.0)
        assert math.isclose(s.edge_kernel(q, 0.5), _edge_kernel_by_loop(s, q, 0.5), abs_tol=1e-6)
