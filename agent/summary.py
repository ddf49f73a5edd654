"""Human-readable run summaries."""
from __future__ import annotations

from typing import Any, Mapping


def _j(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 3.6e6:
        return f"{x / 3.6e6:.3f} kWh"
    if x >= 1e4:
        return f"{x / 1e3:.2f} kJ"
    return f"{x:.2f} J"


def render(record: Mapping[str, Any], notes: list[str] | None = None) -> str:
    e, h = record["energy_j"], record["host_energy_j"]
    sim = "  [SIMULATED GPUs]" if record.get("simulated") else ""
    approx = "  (approximate)" if record.get("approximate") else ""
    lines = [
        f"wattmeter: {record['job']} {record['status']} (exit {record['exit_code']}) "
        f"in {record['duration_s']:.2f} s{sim}{approx}",
        f"  {'component':<10} {'job energy':>14} {'host energy':>14}  source",
    ]
    sources: dict[str, set[str]] = {}
    for d in record["devices"]:
        sources.setdefault(d["component"], set()).add(d["source"])
    for comp in ("gpu", "cpu", "ram"):
        if comp not in sources:
            continue
        lines.append(f"  {comp:<10} {_j(e[comp]):>14} {_j(h[comp]):>14}  {','.join(sorted(sources[comp]))}")
    lines.append(f"  {'total':<10} {_j(e['total']):>14} {_j(h['total']):>14}  "
                 f"({record['energy_kwh'] * 1000:.4f} Wh)")
    for d in record["devices"]:
        if d["component"] == "gpu":
            lab = d["labels"]
            peak = d.get("peak_power_w")
            lines.append(f"    gpu {lab.get('gpu', '?')} {lab.get('model', '')}: {_j(d['energy_j'])}, "
                         f"avg {d['avg_power_w']:.1f} W, peak {peak if peak is None else round(peak, 1)} W")
    toks = record.get("tokens") or {}
    if toks.get("generation") or toks.get("prompt"):
        jpt = record.get("joules_per_token")
        lines.append(f"  tokens: {toks.get('prompt', 0)} prompt, {toks.get('generation', 0)} generation; "
                     f"{jpt:.4f} J/token" if jpt else "")
    carbon = record.get("carbon")
    if carbon:
        em = carbon.get("emissions_g") or {}
        scopes = ", ".join(f"{k} {v:.3f} g" for k, v in em.items())
        lines.append(f"  CO2e: {scopes} (zone {carbon.get('zone')}, {carbon.get('intensity_g_per_kwh')} g/kWh "
                     f"from {carbon.get('intensity_source')}, PUE {carbon.get('pue')})")
        if carbon.get("water_l") is not None:
            lines.append(f"  water: {carbon['water_l']:.3f} L")
    if record.get("errors"):
        lines.append("  sensor errors: " + ", ".join(f"{k}={v}" for k, v in record["errors"].items()))
    for note in notes or []:
        lines.append(f"  note: {note}")
    return "\n".join(line for line in lines if line)
