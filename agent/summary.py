"""Human-readable run summaries, rendered from a ``WindowResult`` (plus a run's facts when there
is one), so ``run``, ``str(result)`` and the Python API print the same table."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .model import Component, Scope, WindowResult

if TYPE_CHECKING:  # pragma: no cover
    from .runsink import RunFacts


def _j(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 3.6e6:
        return f"{x / 3.6e6:.3f} kWh"
    if x >= 1e4:
        return f"{x / 1e3:.2f} kJ"
    return f"{x:.2f} J"


def render(result: WindowResult, facts: "RunFacts | None" = None, notes: list[str] | None = None) -> str:
    sim = "  [SIMULATED GPUs]" if result.simulated else ""
    approx = "  (approximate)" if result.approximate else ""
    outcome = f" {facts.status} (exit {facts.exit_code})" if facts is not None else ""
    name = facts.ident.job if facts is not None else result.name
    lines = [
        f"wattmeter: {name}{outcome} in {result.duration_s:.2f} s{sim}{approx}",
        f"  {'component':<10} {'job energy':>14} {'host energy':>14}  source",
    ]
    sources: dict[str, set[str]] = {}
    for d in result.devices:
        sources.setdefault(d.component.value, set()).add(d.source.value)
    for comp in Component:
        if comp.value not in sources:
            continue
        lines.append(f"  {comp.value:<10} {_j(result.component_energy_j(comp)):>14} "
                     f"{_j(result.component_energy_j(comp, Scope.HOST)):>14}  {','.join(sorted(sources[comp.value]))}")
    host_total = sum(result.component_energy_j(c, Scope.HOST) for c in Component)
    lines.append(f"  {'total':<10} {_j(result.total_energy_j):>14} {_j(host_total):>14}  "
                 f"({result.energy_kwh * 1000:.4f} Wh)")
    for d in result.devices:
        if d.component == Component.GPU:
            peak = d.peak_power_w
            lines.append(f"    gpu {d.labels.get('gpu', '?')} {d.labels.get('model', '')}: {_j(d.energy_j)}, "
                         f"avg {d.avg_power_w:.1f} W, peak {peak if peak is None else round(peak, 1)} W")
    prompt, gen = result.tokens.get("prompt", 0), result.tokens.get("generation", 0)
    if gen or prompt:
        n = gen or sum(result.tokens.values())
        jpt = result.total_energy_j / n if n else None
        lines.append(f"  tokens: {prompt} prompt, {gen} generation" + (f"; {jpt:.4f} J/token" if jpt else ""))
    carbon = facts.carbon if facts is not None else None
    if carbon:
        em = carbon.get("emissions_g") or {}
        scopes = ", ".join(f"{k} {v:.3f} g" for k, v in em.items())
        lines.append(f"  CO2e: {scopes} (zone {carbon.get('zone')}, {carbon.get('intensity_g_per_kwh')} g/kWh "
                     f"from {carbon.get('intensity_source')}, PUE {carbon.get('pue')})")
        if carbon.get("water_l") is not None:
            lines.append(f"  water: {carbon['water_l']:.3f} L")
    if facts is not None and facts.errors:
        lines.append("  sensor errors: " + ", ".join(f"{k}={v}" for k, v in facts.errors.items()))
    for note in notes or []:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
