"""Render a :class:`~wattmeter.carbon.report.Report` as table, CSV, JSON, Markdown or CodeCarbon CSV."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Callable, Sequence

from .codecarbon_csv import codecarbon_rows, CODECARBON_COLUMNS
from .report import COMPONENTS, SCOPES, Figures, JobRow, Report

FORMATS = ("table", "csv", "json", "markdown", "codecarbon")


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 10000:
        return f"{value:,.0f}"
    if 0 < abs(value) < 1:   # small jobs: keep three significant digits, never "0.0"
        digits = min(8, max(digits, 2 - math.floor(math.log10(abs(value)))))
    return f"{value:,.{digits}f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def _scopes_used(report: Report) -> list[str]:
    return [s for s in SCOPES if s in report.total.emissions_g]


def _figure_cells(f: Figures, scopes: Sequence[str], water: bool) -> list[str]:
    cells = [_duration(f.duration_s)]
    cells += [_f(f.energy_j.get(c, 0.0) / 3600.0) for c in COMPONENTS]
    cells.append(_f(f.energy_kwh, 3))
    cells += [_f(f.emissions_g.get(s)) for s in scopes]
    if water:
        cells.append(_f(f.water_l, 2))
    cells += [f"{f.tokens:,}" if f.tokens else "-", _f(f.j_per_token, 3), _f(f.wh_per_1k_tokens, 3),
              _f(f.g_per_gpu_hour), _f(f.g_per_1k_tokens, 3)]
    return cells


def _figure_headers(scopes: Sequence[str], water: bool) -> list[str]:
    heads = ["DURATION", "GPU Wh", "CPU Wh", "RAM Wh", "kWh"] + [f"g CO2e {s}" for s in scopes]
    if water:
        heads.append("WATER L")
    return heads + ["TOKENS", "J/TOKEN", "Wh/1k TOK", "g/GPU-h", "g/1k TOK"]


def _status(row: JobRow) -> str:
    return f"{row.status} (checkpoint)" if row.checkpoint else row.status


def _sections(report: Report) -> list[tuple[str, list[str], list[list[str]], int]]:
    """(title, headers, rows, leading text columns) for the jobs, the grouped totals and the what-if table."""
    scopes = _scopes_used(report)
    water = report.total.water_l is not None
    jobs = [[r.job, r.run_id, r.host, r.day, _status(r), r.zone or "-"] + _figure_cells(r.figures, scopes, water)
            for r in report.rows]
    out = [("Jobs", ["JOB", "RUN", "HOST", "DAY", "STATUS", "ZONE"] + _figure_headers(scopes, water), jobs, 6)]
    groups = [[key, str(f.runs)] + _figure_cells(f, scopes, water) for key, f in report.groups]
    groups.append(["TOTAL", str(report.total.runs)] + _figure_cells(report.total, scopes, water))
    out.append((f"Totals by {report.group_by}", [report.group_by.upper(), "RUNS"] + _figure_headers(scopes, water),
                groups, 1))
    wi = report.what_if
    if wi is not None:
        heads = ["JOB", "RUN", "ZONE", "g CO2e actual"] + [f"g in {z.key}" for z in wi.zones]
        rows = [[r.job, r.run_id, r.zone or "-", _f(r.figures.emissions_g.get("location"))]
                + [_f(wi.per_run[r.run_id][z.key]) for z in wi.zones] for r in report.rows]
        rows.append(["TOTAL", "", "", _f(report.total.emissions_g.get("location"))]
                    + [_f(wi.totals[z.key]) for z in wi.zones])
        names = ", ".join(f"{z.key} {z.g_per_kwh:g} g/kWh ({z.source_label})" for z in wi.zones)
        out.append((f"What if (location-based; {names})", heads, rows, 3))
    return out


def _header_line(report: Report) -> str:
    files = ", ".join(report.paths)
    bits = [f"{report.lines} lines"]
    if report.superseded:
        bits.append(f"{report.superseded} checkpoint lines superseded")
    if report.skipped:
        bits.append(f"{len(report.skipped)} malformed lines skipped")
    return f"wattmeter report: {len(report.rows)} runs from {files} ({', '.join(bits)})"


def _footnotes(report: Report) -> list[str]:
    notes = []
    if report.total.runs_without_carbon:
        notes.append(f"{report.total.runs_without_carbon} run(s) carry no carbon figures: their emissions show '-'")
    if any(r.checkpoint for r in report.rows):
        notes.append("(checkpoint): only checkpoint lines exist, so the run is still going or was killed")
    notes.append("g CO2e location = kWh x PUE x grid intensity; market and embodied are separate scopes")
    return notes


def _text_table(headers: list[str], rows: list[list[str]], n_text: int) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < n_text else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def render_table(report: Report) -> str:
    parts = [_header_line(report)]
    for title, heads, rows, n_text in _sections(report):
        parts += ["", title, _text_table(heads, rows, n_text)]
    parts += [""] + _footnotes(report)
    return "\n".join(parts) + "\n"


def render_markdown(report: Report) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    parts = [f"# {_header_line(report)}"]
    for title, heads, rows, n_text in _sections(report):
        parts += ["", f"## {title}", "", "| " + " | ".join(heads) + " |",
                  "|" + "|".join("---" if i < n_text else "---:" for i in range(len(heads))) + "|"]
        parts += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    parts += [""] + [f"- {n}" for n in _footnotes(report)]
    return "\n".join(parts) + "\n"


CSV_COLUMNS = [
    "level", "group", "run_id", "job", "host", "day", "start", "status", "checkpoint", "labels", "zone",
    "intensity_g_per_kwh", "intensity_source", "pue", "runs", "duration_s", "energy_gpu_j", "energy_cpu_j",
    "energy_ram_j", "energy_total_j", "energy_kwh", "emissions_location_g", "emissions_market_g",
    "emissions_embodied_g", "water_l", "tokens_prompt", "tokens_generation", "tokens", "gpu_count",
    "gpu_hours", "j_per_token", "wh_per_1k_tokens", "g_per_gpu_hour", "g_per_1k_tokens",
]


def _figure_fields(f: Figures) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": f.runs, "duration_s": f.duration_s, "energy_kwh": f.energy_kwh,
                           "water_l": f.water_l, "tokens": f.tokens, "gpu_hours": f.gpu_hours,
                           "j_per_token": f.j_per_token, "wh_per_1k_tokens": f.wh_per_1k_tokens,
                           "g_per_gpu_hour": f.g_per_gpu_hour, "g_per_1k_tokens": f.g_per_1k_tokens}
    out.update({f"energy_{c}_j": f.energy_j.get(c) for c in (*COMPONENTS, "total")})
    out.update({f"emissions_{s}_g": f.emissions_g.get(s) for s in SCOPES})
    return out


def render_csv(report: Report) -> str:
    wi = report.what_if
    extra = [f"whatif_{z.key}_g" for z in wi.zones] if wi else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS + extra, lineterminator="\n")
    writer.writeheader()
    for r in report.rows:
        row = {"level": "job", "run_id": r.run_id, "job": r.job, "host": r.host, "day": r.day, "start": r.start,
               "status": r.status, "checkpoint": r.checkpoint, "zone": r.zone,
               "labels": ";".join(f"{k}={v}" for k, v in sorted(r.labels.items())),
               "intensity_g_per_kwh": r.intensity_g_per_kwh, "intensity_source": r.intensity_source,
               "pue": r.pue, "tokens_prompt": r.tokens_prompt, "tokens_generation": r.tokens_generation,
               "gpu_count": r.gpu_count, **_figure_fields(r.figures)}
        if wi:
            row.update({f"whatif_{z.key}_g": wi.per_run[r.run_id][z.key] for z in wi.zones})
        writer.writerow(row)
    for key, f in report.groups:
        writer.writerow({"level": f"group:{report.group_by}", "group": key, **_figure_fields(f)})
    total = {"level": "total", **_figure_fields(report.total)}
    if wi:
        total.update({f"whatif_{z.key}_g": wi.totals[z.key] for z in wi.zones})
    writer.writerow(total)
    return buf.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, sort_keys=False) + "\n"


def render_codecarbon(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CODECARBON_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(codecarbon_rows(r.record for r in report.rows))
    return buf.getvalue()


RENDERERS: dict[str, Callable[[Report], str]] = {
    "table": render_table, "csv": render_csv, "json": render_json,
    "markdown": render_markdown, "codecarbon": render_codecarbon,
}


def render(report: Report, fmt: str) -> str:
    return RENDERERS[fmt](report)
