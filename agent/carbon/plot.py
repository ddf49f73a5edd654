"""``wattmeter report --plot out.png``: power over time per GPU, and energy per job or group.

Needs the ``plot`` extra (matplotlib); uses the Agg backend so it works without a display.
From records, power comes from each record's downsampled ``timeline`` (docs/records.md); from
``--prometheus``, from the GPU energy counters' rate over the report's period (fleet.fleet_power).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import UsageError
from .report import COMPONENTS, Report

if TYPE_CHECKING:
    from .fleet import FleetReport, PowerSeries

_COLOURS = {"gpu": "#2a7ab0", "cpu": "#e08a1e", "ram": "#7a9a3a"}


def gpu_series(record: Mapping[str, Any]) -> list[tuple[str, list[float], list[float]]]:
    """(device key, seconds since the run started, watts) for each GPU in a record's timeline."""
    timeline = record.get("timeline") or {}
    t_s = timeline.get("t_s") or []
    gpu_keys = {d.get("key") for d in record.get("devices") or () if isinstance(d, Mapping)
                and d.get("component") == "gpu"}
    out = []
    for key, watts in sorted((timeline.get("power_w") or {}).items()):
        if (key in gpu_keys or (not gpu_keys and str(key).startswith("gpu"))) and len(watts) == len(t_s):
            out.append((str(key), [float(t) for t in t_s], [float(w) for w in watts]))
    return out


def check_plot_target(path: str | Path) -> Path:
    """Fail fast, before any report is printed: matplotlib present and the folder exists."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'wattmeter[plot]'") from None
    out = Path(path)
    if not out.parent.exists():
        raise UsageError(f"--plot {path}: folder '{out.parent}' does not exist")
    return out


def plot_report(report: Report, path: str | Path, records: Mapping[str, Mapping[str, Any]]) -> Path:
    """``records`` maps run_id to the full record (the report rows keep no timelines)."""
    out = check_plot_target(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_power, ax_energy) = plt.subplots(2, 1, figsize=(11, 8), constrained_layout=True)
    lines = 0
    for row in report.rows:
        for key, times, watts in gpu_series(records.get(row.run_id, {})):
            hours = [t / 3600.0 for t in times]   # runs overlaid from their own start: comparable shapes
            ax_power.plot(hours, watts, linewidth=1, label=f"{row.job} {row.run_id[:6]} {key}")
            lines += 1
    sim = report.simulated_runs
    ax_power.set_title("GPU power over time (downsampled timelines)"
                       + (f"\nSIMULATED: {sim} of {len(report.rows)} run(s) metered fake GPUs, not measurements"
                          if sim else ""), color="#b00020" if sim else "black")
    ax_power.set_ylabel("W")
    ax_power.set_xlabel("hours since the run started")
    if 0 < lines <= 16:
        ax_power.legend(fontsize="x-small", ncol=2)
    elif lines == 0:
        ax_power.text(0.5, 0.5, "no GPU timelines in these records", ha="center", transform=ax_power.transAxes)
    names = [f"{r.job}\n{r.run_id[:6]}{' (sim)' if r.simulated else ''}" for r in report.rows]
    bottom = [0.0] * len(report.rows)
    for comp in COMPONENTS:
        values = [r.figures.energy_j.get(comp, 0.0) / 3.6e6 for r in report.rows]
        ax_energy.bar(names, values, bottom=bottom, label=comp, color=_COLOURS[comp])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax_energy.set_title("Energy per job" + (" (sim): simulated GPUs" if sim else ""))
    ax_energy.set_ylabel("kWh")
    ax_energy.legend()
    ax_energy.tick_params(axis="x", labelsize="x-small")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _time_unit(span_s: float) -> tuple[str, float]:
    """The axis unit for a period: seconds up to 2 min, minutes up to 2 h, hours up to 2 days, else days."""
    for name, seconds, upto in (("s", 1.0, 120.0), ("min", 60.0, 7200.0), ("h", 3600.0, 172800.0)):
        if span_s <= upto:
            return name, seconds
    return "days", 86400.0


def plot_fleet(report: "FleetReport", plot_step_s: float, series: Sequence["PowerSeries"], path: str | Path) -> Path:
    """The fleet from Prometheus: each GPU's mean power per step over the period, and the
    energy per group, with the GPUs' idle energy inside each host's bar when grouped by host."""
    from .fleet import J_PER_KWH

    out = check_plot_target(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = report.at - report.since_s
    unit, per = _time_unit(report.since_s)
    when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(start))
    fig, (ax_power, ax_energy) = plt.subplots(2, 1, figsize=(11, 8), constrained_layout=True)
    for s in series:
        ax_power.plot([(t - start) / per for t in s.t_unix], list(s.power_w), linewidth=1,
                      label=f"{s.label} {s.model}".strip())
    ax_power.set_title(f"GPU power from {report.url} (mean per {plot_step_s:g} s step, from the energy counters)")
    ax_power.set_ylabel("W")
    ax_power.set_xlabel(f"{unit} since {when}")
    ax_power.set_xlim(0, report.since_s / per)
    ax_power.set_ylim(bottom=0)           # idle watts read against zero, not against the busiest GPU
    if 0 < len(series) <= 16:
        ax_power.legend(fontsize="x-small", ncol=2)
    elif not series:
        ax_power.text(0.5, 0.5, "no GPU energy series in this period", ha="center", transform=ax_power.transAxes)
    groups = [g for g in report.groups if not g.key.startswith("tokens:")]   # token rows carry no energy
    names = [g.key for g in groups]
    ax_energy.bar(names, [g.energy_kwh for g in groups], color=_COLOURS["gpu"], label="energy")
    if report.group_by in ("host", "hostname"):
        idle: dict[str, float] = {}
        for gpu in report.gpus:
            idle[gpu.hostname] = idle.get(gpu.hostname, 0.0) + gpu.idle_j / J_PER_KWH
        ax_energy.bar(names, [idle.get(n, 0.0) for n in names], color="none", edgecolor="#b00020",
                      hatch="//", label="of which GPU idle")
    ax_energy.set_title(f"Energy by {report.group_by} over {report.since_s / per:.3g} {unit}")
    ax_energy.set_ylabel("kWh")
    if groups:
        ax_energy.legend()
    else:
        ax_energy.text(0.5, 0.5, "no energy in this period", ha="center", transform=ax_energy.transAxes)
    ax_energy.tick_params(axis="x", labelsize="x-small")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__: Sequence[str] = ("plot_report", "plot_fleet", "gpu_series", "check_plot_target")
