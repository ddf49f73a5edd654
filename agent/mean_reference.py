"""Switching a GPU with no energy counter onto its trailing-mean reference.

The reference itself (E(t) = base + integral of the mean up to t + w/2, less an edge kernel
shaped by instant power) lives in ``trailing_mean.TrailingMean``. This module moves a device
onto it at an anchor instant the means cover, without a jump in E.
"""
from __future__ import annotations

from .history import DeviceHistory

MEAN_STALE_S = 2.5        # a trailing mean this old no longer carries a power-only GPU


def anchor_on_means(d: DeviceHistory) -> bool:
    """Put a device on its trailing-mean reference at an anchor instant the means cover: E up
    to the anchor stays as integrated from instant power, newer points are dropped (the caller
    re-derives them from the means), so E stays continuous. False: not possible yet."""
    half = 0.5 * d.mean.window_s
    first, newest = d.mean.first_t + half, d.mean.newest_t - half
    if newest < first:
        return False
    keep = d.n
    while keep > d.oldest() and d.point(keep - 1)[0] > newest:
        keep -= 1
    anchor = max(first, d.point(keep - 1)[0]) if keep > d.oldest() else first
    if d.last_t is None:
        e_anchor = 0.0
    elif anchor <= d.last_t:
        found = d.value_at(anchor)
        e_anchor = found[0] if found is not None else d.total_j
    else:
        e_anchor = d.total_j + (d.last_power or 0.0) * (anchor - d.last_t)
    raw = d.mean.energy(anchor)
    if raw is None:
        return False
    while keep > d.oldest() and d.point(keep - 1)[0] > anchor:
        keep -= 1
    d.cur_count = max(0, d.cur_count - (d.n - keep))
    d.n = keep
    if keep > d.oldest() and d.point(keep - 1)[0] == anchor:
        d.total_j, d.last_t, d.last_power = e_anchor, anchor, d.point(keep - 1)[2]
    else:
        power = d.point(keep - 1)[2] if keep > d.oldest() else 0.0
        d.total_j, d.last_t, d.last_power = e_anchor, anchor, power
        d.push(anchor, e_anchor, power)
    d.mean_base = e_anchor - raw
    d.mean_active = True
    d.mean_from_t = anchor
    return True
