"""Shaping energy between coarse points with instant-power samples.

A counter tells how much energy a span held; instant power tells how it was spread inside
the span. These pure functions place an edge inside a span on a power step, split a field's
refresh box at an edge, and integrate a run of samples (strictly or across holes).
"""
from __future__ import annotations

MIN_BOX_S, MAX_BOX_S = 0.005, 0.05   # a short-window power field's refresh box (H100: 20 ms)
HOLE_S = 0.3                         # a hole this wide between samples is filled...
HOLE_CONTEXT_S = 1.0                 # ...from the samples this close to it


def integrate_samples(pts: list[tuple[float, float]], a: float, b: float) -> float:
    """Energy from a to b from time-ordered (t, power_w) samples, tolerating holes: each value
    counts as the mean since the previous sample, a hole wider than HOLE_S (a lost GPU, a
    held-up reader) is filled with the mean of the samples within HOLE_CONTEXT_S of it (a
    bursty load's two neighbouring values say little about its level), and the ends are held
    out to a and b."""
    if not pts or b <= a:
        return 0.0
    energy, lo = 0.0, a
    ts_prev, w_prev = None, pts[0][1]
    for i, (t, w) in enumerate(pts):
        if t > lo:
            hi = min(t, b)
            if ts_prev is not None and t - ts_prev > HOLE_S:
                around = [v for tv, v in pts if ts_prev - HOLE_CONTEXT_S <= tv <= t + HOLE_CONTEXT_S]
                energy += (hi - lo) * sum(around) / len(around)
            else:
                energy += w * (hi - lo)
            lo = hi
        ts_prev, w_prev = t, w
        if t >= b:
            break
    if lo < b:
        energy += w_prev * (b - lo)
    return energy


def partial_box_correction(pts: list[tuple[float, float]], a: float, b: float) -> float:
    """What the step model changes at the two ends of ``shape_energy``'s sum.

    Each field value is the mean over one refresh box. An edge inside a box gets a share of
    that box: pro rata assumes the power was flat across it, which is exactly wrong where a
    kernel starts or stops inside the box (the usual case at a job's edges). Where both
    neighbouring boxes were read, the box is modelled as one step between their powers
    (``step_interpolate``), placed so the box's energy is kept."""
    gaps = [t1 - t0 for (t0, _), (t1, _) in zip(pts, pts[1:])]
    box = min(gaps, default=0.0)
    if not MIN_BOX_S <= box <= MAX_BOX_S or sum(abs(g - box) < 0.1 * box for g in gaps) < 2:
        return 0.0

    def step_share(k: int, x: float) -> float | None:
        """Energy of box k from its start to x (None: neighbours missing or not adjacent)."""
        if not 0 < k < len(pts) - 1:
            return None
        (t_lo, w_lo), (t_k, w_k), (t_hi, w_hi) = pts[k - 1], pts[k], pts[k + 1]
        if abs(t_k - t_lo - box) > 0.1 * box or abs(t_hi - t_k - box) > 0.1 * box:
            return None
        return step_interpolate(t_k - box, 0.0, t_k, w_k * box, x, w_lo, w_hi)

    fix = 0.0
    k = next((i for i, (t, _) in enumerate(pts) if t > a), None)
    m = next((i for i, (t, _) in enumerate(pts) if t >= b), None)
    if k is None or m is None or k == m:
        return 0.0          # both ends in one box: nothing to split
    t_k, w_k = pts[k]
    if a > t_k - box and (e := step_share(k, a)) is not None:
        fix += (w_k * box - e) - w_k * (t_k - a)
    t_m, w_m = pts[m]
    if b > t_m - box and (e := step_share(m, b)) is not None:
        fix += e - w_m * (b - (t_m - box))
    return fix


def step_interpolate(t0: float, e0: float, t1: float, e1: float, t: float,
                     low: float | None, high: float | None) -> float:
    """Cumulative energy at t inside the counter segment (t0, e0) -> (t1, e1).

    GPU power mostly moves in steps (kernels start and stop). When the segment's mean power
    lies strictly between the slopes of its neighbours, model it as one step from the
    previous slope to the next, placed so the segment's energy is exact; else interpolate
    linearly. For a job that starts or stops inside a refresh interval this puts the edge
    on the right side of the step, where a straight line splits the difference.
    """
    dt = t1 - t0
    if dt <= 0:
        return e1
    x = min(max(t - t0, 0.0), dt)
    de = e1 - e0
    linear = e0 + de * x / dt
    if low is None or high is None:
        return linear
    mean = de / dt
    lo_w, hi_w = min(low, high), max(low, high)
    if hi_w - lo_w < 0.05 * hi_w or not (lo_w < mean < hi_w):
        return linear
    s = (high * dt - de) / (high - low)          # step position from t0
    return e0 + (low * x if x <= s else low * s + high * (x - s))

