"""`report --prometheus URL --plot OUT.png`: GPU power over the period and energy per group,
drawn from a real Prometheus scraping two `wattmeter serve` fake-GPU hosts; then bad input."""
from __future__ import annotations

import json
import socket
import statistics
import sys
import time
from pathlib import Path

import pytest

from wattmeter.cli import main

from e2e_servers import FLEET_NODE_A as HOST_A, PROMETHEUS_NAMES, Prometheus, WattmeterServe, require_binary, wait_until

WINDOW_S = 20
HOST_B = """
description = "node-b: a busy L4 at 60 W"
[[gpu]]
model = "NVIDIA L4"
[gpu.trace]
kind = "constant"
power_w = 60.0
[[gpu.process]]
pid = 201
sm_util = 50
"""


pytestmark = pytest.mark.usefixtures("isolated_env")   # conftest.py


@pytest.fixture
def figures(monkeypatch):
    """The figures report --plot saves, kept open for the test to read what was drawn."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    saved = []
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(self, *args, **kwargs):
        saved.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return saved


def _serve(tmp_path: Path, name: str, scenario: str, zone: str) -> WattmeterServe:
    (tmp_path / f"{name}.toml").write_text(scenario)
    (tmp_path / "proc").mkdir(exist_ok=True)
    return WattmeterServe(["--fake-nvml", str(tmp_path / f"{name}.toml"), "--cpu", "none", "--interval", "0.05",
                           "--hostname", name, "--zone", zone, "--proc-root", str(tmp_path / "proc"),
                           "--pods-root", str(tmp_path / "pods")], tmp_path / name)


@pytest.mark.e2e
def test_fleet_plot_from_real_prometheus(tmp_path: Path, capsys, figures) -> None:
    binary = require_binary(PROMETHEUS_NAMES, "prometheus")
    serves, prom = [], None
    try:
        serves.append(_serve(tmp_path, "node-a", HOST_A, "FR"))
        serves.append(_serve(tmp_path, "node-b", HOST_B, "US-CA"))
        prom = Prometheus(binary, tmp_path / "prom", [{"job_name": "wattmeter", "static_configs": [
            {"targets": [f"127.0.0.1:{s.port}" for s in serves]}]}])
        wait_until(prom.targets_up, 60, "both wattmeter targets to be up")
        at = time.time() + WINDOW_S + 4.0     # the whole window, and the 3 s rate window before it, scraped
        wait_until(lambda: time.time() > at + 2.0, 120, "the window to pass", interval_s=0.5)
        out_png = tmp_path / "fleet.png"
        code = main(["report", "--prometheus", prom.url, "--since", f"{WINDOW_S}s", "--at", f"{at:.3f}",
                     "--step", "1s", "--group-by", "host", "--format", "json", "--plot", str(out_png)])
        out = capsys.readouterr()
        assert code == 0, out.err
        report = json.loads(out.out)                     # the report itself is unchanged by --plot
        assert f"plot written to {out_png}" in out.err
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000
        assert len(figures) == 1
        ax_power, ax_energy = figures[0].axes
        # Power: one line per host and GPU, each at its scripted constant power. The energy
        # counter's rate over 3 s of 1 s scrapes is the mean power, so within 2 % of it.
        lines = {line.get_label().split()[0]: line for line in ax_power.get_lines()}
        assert sorted(lines) == ["node-a/0", "node-a/1", "node-b/0"]
        for label, watts in (("node-a/0", 300.0), ("node-a/1", 90.0), ("node-b/0", 60.0)):
            ys = list(lines[label].get_ydata())
            assert len(ys) >= WINDOW_S - 2, label                  # one point per 1 s step
            assert statistics.median(ys) == pytest.approx(watts, rel=0.02), label
            xs = list(lines[label].get_xdata())
            assert 0.0 <= min(xs) and max(xs) <= WINDOW_S        # seconds since the period start
        assert ax_power.get_xlabel().startswith("s since ")
        # Energy per group: the bars are the report's own host figures, GPU energy by hand inside them.
        groups = {g["group"]: g["energy_kwh"] for g in report["groups"]}
        labels = [t.get_text() for t in ax_energy.get_xticklabels()]
        energy_bars, idle_bars = ax_energy.containers
        drawn = {name: bar.get_height() for name, bar in zip(labels, energy_bars.patches)}
        assert drawn == pytest.approx(groups)
        assert drawn["node-a"] * 3.6e6 >= 390.0 * WINDOW_S * 0.99       # 300 + 90 W for 20 s, plus RAM
        assert drawn["node-b"] * 3.6e6 >= 60.0 * WINDOW_S * 0.99
        # Idle inside the host bars: node-a's GPU 1 at 90 W for the whole 20 s = 1,800 J; node-b none.
        idle = {name: bar.get_height() for name, bar in zip(labels, idle_bars.patches)}
        assert idle["node-a"] * 3.6e6 == pytest.approx(90.0 * WINDOW_S, rel=0.02)
        assert idle["node-b"] == pytest.approx(0.0, abs=1e-12)
    finally:
        if prom is not None:
            prom.stop()
        for s in serves:
            assert s.stop() == 0, s.output


# -- bad input: one line, exit 2, before any query ----------------------------------------------
def _silent_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_plot_folder_missing_fails_before_any_query(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    url = _silent_port()                 # nothing listens: a query would say "does not answer"
    rc = main(["report", "--prometheus", url, "--since", "1h", "--plot", str(tmp_path / "no" / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "folder" in err and "does not exist" in err


def test_plot_without_matplotlib_fails_before_any_query(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # the plot extra not installed
    rc = main(["report", "--prometheus", _silent_port(), "--since", "1h", "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install 'wattmeter[plot]'" in err
