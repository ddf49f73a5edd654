"""The system clock's wall time follows the wall clock as it is, steps included."""
from __future__ import annotations

import time

import pytest

from reliability_cases import case
from wattmeter import clock as clock_mod
from wattmeter.clock import SystemClock


@case("The wall clock steps (NTP syncs after the daemon started)", records="start and end times as the clock reads them",
      exit_code="-", energy="kept: field values stay dated by their true age",
      metrics="the wall-time offset is read at each call, never cached")
@pytest.mark.parametrize("step_s", [-0.5, 0.5, 30.0])
def test_wall_time_follows_a_step_of_the_wall_clock(monkeypatch, step_s):
    # NVML stamps field values with the wall clock. A daemon started at boot, before NTP synced
    # the clock, used the offset it saw at start for weeks: after a 0.5 s step back every field
    # value looked 0.5 s old and was dated that much early.
    c = SystemClock()
    now = c.now()
    assert c.wall(now) == pytest.approx(time.time(), abs=0.01)
    real = time.time
    monkeypatch.setattr(clock_mod.time, "time", lambda: real() + step_s)
    now = c.now()
    assert c.wall(now) == pytest.approx(real() + step_s, abs=0.01)
    assert c.wall(now - 2.0) == pytest.approx(real() + step_s - 2.0, abs=0.01)
