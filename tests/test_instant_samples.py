"""``InstantSamples.bridge`` takes its sum from the running integrals where no hole needs
filling, and from ``integrate_samples`` (which fills holes) otherwise. Both must give what
``integrate_samples`` gives over the samples within reach of the span: the definition."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from wattmeter.shaping import BRIDGE_REACH_S, HOLE_S, InstantSamples, integrate_samples


def reference(s: InstantSamples, a: float, b: float) -> float | None:
    pts = s.between(a - BRIDGE_REACH_S, b + BRIDGE_REACH_S)
    if not pts or pts[0][0] > a + BRIDGE_REACH_S or pts[-1][0] < b - BRIDGE_REACH_S:
        return None
    return integrate_samples(pts, a, b)


gaps = st.one_of(st.just(0.02), st.just(0.1), st.floats(0.001, 0.2), st.floats(0.2, 1.5))


@settings(max_examples=300, deadline=None)
@given(start=st.floats(0.0, 2000.0), steps=st.lists(st.tuples(gaps, st.floats(0.0, 900.0)), min_size=1, max_size=120),
       spans=st.lists(st.tuples(st.floats(-0.1, 1.1), st.floats(-0.2, 6.0)), min_size=1, max_size=12))
def test_bridge_equals_the_sum_over_the_samples_within_reach(start, steps, spans):
    s = InstantSamples(512)
    t = start
    for gap, w in steps:
        t += gap
        s.add(t, w)
    t0, t1 = s.pts[0][0], s.pts[-1][0]
    for where, length in spans:
        a = t0 - 2.0 + where * (t1 - t0 + 4.0)
        b = a + length
        got, want = s.bridge(a, b), reference(s, a, b)
        assert (got is None) == (want is None)
        if want is not None:
            assert abs(got - want) <= 1e-9 * max(1.0, abs(want))


def test_a_hole_is_filled_from_the_samples_around_it():
    s = InstantSamples(64)
    for t, w in ((0.0, 100.0), (0.1, 100.0), (0.2, 300.0), (0.2 + 2 * HOLE_S, 500.0), (0.3 + 2 * HOLE_S, 500.0)):
        s.add(t, w)
    a, b = 0.2, 0.2 + 2 * HOLE_S
    # The hole is filled with the mean of the samples within a second of it, not the 500 W after it.
    assert s.bridge(a, b) == reference(s, a, b) == (b - a) * (100 + 100 + 300 + 500 + 500) / 5
