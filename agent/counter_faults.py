"""Counter spans a counter cannot vouch for, bridged from instant power.

A span between two counter points normally holds the counter's difference. It does not when
the counter restarted (a driver reload, a GPU back from the bus: it holds only the energy since
the restart), or holds far less than instant power shows (a stall, a lost GPU). Such spans are
filled in from instant power, flagged approximate and counted; a stalled counter that later
catches up with one jump repays what was filled in, so nothing is counted twice.
"""
from __future__ import annotations

import math

from .history import DeviceHistory
from .model import Reading

STALL_SPAN_S = 1.0        # a counter span this long...
STALL_SHORTFALL = 0.8     # ...holding less than this share of what power says, is a stall
SUSPECT_SHORTFALL = 0.95  # (the share right after a bridged span)
BRIDGE_ERROR_S = 0.6      # (and by more than the power's range over this long: a bursty load)
STALL_MIN_J = 5.0         # (and short by at least this much: idle noise is not a stall)
NEIGHBOUR_S = 0.15        # samples this close outside a span shape its bridge too (10 Hz reads)
CATCH_UP_SHARE = 0.2      # a span holding this much more than power shows repays a stall...
OWED_TTL_S = 60.0         # ...within this long of it
RESET_MAX_W = 5000.0      # a counter below its last value holding more than this for the span
RESET_SLACK_J = 1000.0    # (plus this) did not restart: it stepped back


def flag_bridged(d: DeviceHistory, t0: float, t1: float) -> None:
    """Flag [t0, t1] approximate; a span not touching the last flagged one is a new event."""
    if not (d.approx_spans and d.approx_spans[-1][1] >= t0):
        d.bridges += 1
    d.approx_spans.append((t0, t1))


def counter_delta(d: DeviceHistory, r: Reading) -> tuple[float, float]:
    """(Energy since the previous counter point, the counter value later points count from).
    Where the counter cannot vouch for the span (it restarted, or holds far less than instant
    power shows: a stall, a lost GPU), the span is bridged from instant power, flagged
    approximate and counted."""
    value = r.energy_j
    assert value is not None
    if d.last_counter is None or d.last_t is None:
        return 0.0, value
    if value >= d.last_counter:
        delta = value - d.last_counter
        reset = False
    elif d.device.wrap_j:
        return value + d.device.wrap_j - d.last_counter, value   # wrapped past its range
    elif value > RESET_MAX_W * (r.t - d.last_t) + RESET_SLACK_J:
        # A little below the last value, and far above what a restarted counter could hold
        # by now: a step back, not a restart. Counted as one, the whole value (megajoules)
        # was added. The span holds nothing; counting on from the higher value, the reads
        # that follow make it up.
        return 0.0, d.last_counter
    else:
        # A counter that went down was reset (driver reload, GPU back from the bus): what it
        # holds now was burned since the reset, the rest of the span is unknown to it.
        d.resets += 1
        delta, reset = value, True
    span = r.t - d.last_t
    bridged = d.mean.between(d.last_t, r.t)      # on the trailing mean, where there is one
    if bridged is None:
        bridged = d.samples.bridge(d.last_t, r.t)
    if bridged is None and reset:
        bridged = (d.last_power or 0.0) * span     # no instant power: the last counter slope
    if bridged is None:
        return delta, value
    # Right after a bridged span the counter is still suspect (the stall may have ended
    # inside this span), however short the span, and held to a closer match.
    after_bridge = bool(d.approx_spans and d.approx_spans[-1][1] >= d.last_t)
    share = SUSPECT_SHORTFALL if after_bridge else STALL_SHORTFALL
    # The bridge itself is uncertain where the load is bursty: sparse instant samples of the
    # last half second can be off by the power's range over about that long. The neighbours
    # just outside the span count too: a step at its end is integrated from them (a clean
    # counter at 90 W, with the load stepping to 610 W right after, read as a stall).
    watts = [w for _, w in d.samples.between(d.last_t - NEIGHBOUR_S, r.t + NEIGHBOUR_S)]
    uncertainty_j = (max(watts) - min(watts)) * BRIDGE_ERROR_S if watts else 0.0
    # Instant power sampled at 10 Hz can alias with a periodic load and read high for seconds
    # with no spread at all (a 100 ms square read at one phase): it is believed over the counter
    # only where the counter also fell short of its own recent rate (a frozen counter does;
    # an honest one under aliased samples keeps its pace: +74 % on one 1.5 s job before).
    rate_j = d.last_power * span if d.last_power is not None else math.inf
    stalled = not reset and (span >= STALL_SPAN_S or after_bridge) and delta < share * bridged \
        and bridged - delta > max(STALL_MIN_J, uncertainty_j) and delta < share * rate_j
    if reset or stalled:
        flag_bridged(d, d.last_t, r.t)
        if stalled:
            # A stalled counter may later catch up with one jump: what power filled in now
            # is owed back from such a jump, so the energy is never counted twice.
            d.owed_j, d.owed_t = d.owed_j + bridged - delta, r.t
        return max(delta, bridged), value
    excess = delta - bridged
    if d.owed_j > 0 and r.t - d.owed_t <= OWED_TTL_S and excess > STALL_MIN_J \
            and excess > CATCH_UP_SHARE * bridged:
        take = min(excess, d.owed_j)        # the stalled counter caught up
        d.owed_j -= take
        d.approx_spans.append((d.last_t, r.t))
        return delta - take, value
    return delta, value
