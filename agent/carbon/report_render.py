"""Render a :class:`~wattmeter.carbon.report.Report` as a text table or Markdown, and pick the renderer
of each format (CSV, JSON and CodeCarbon CSV live in ``report_data``)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from .accounting import J_PER_KWH
from .report import SCOPES, Figures, JobRow, Report
from .report_data import ExtraColumns, batches, render_codecarbon, render_csv, render_json
from .rowstore import SortedRows, sorted_rows

FORMATS = ("table", "csv", "json", "markdown", "codecarbon")


_NEXT_DECADE = {3: "1.000", 4: "0.1000", 5: "0.01000", 6: "0.001000"}   # a decimal count's round-up


def _f(value: float | None, digits: int = 3) -> str:
    """Three significant figures, whatever the size: 0.00123, 1.23, 123, 12,300 (``digits`` is kept
    for callers; every report number has three)."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    a = abs(value)
    if 1.0 <= a < 999.5:     # the common case, without the general path's parse and log
        if a < 10.0:
            text = "%.2f" % value
            if not text.endswith("10.00"):     # 9.996 rounds up into the next decade
                return text
            return "%.1f" % value
        if a < 100.0:
            text = "%.1f" % value
            if not text.endswith("100.0"):
                return text
        return "%.0f" % value
    if 1e-4 <= a < 1.0:      # 0.000123 .. 0.999 (kWh and grams of short runs): decimals by magnitude
        places = 3 if a >= 0.1 else 4 if a >= 0.01 else 5 if a >= 0.001 else 6
        text = "%.*f" % (places, value)
        if not text.endswith(_NEXT_DECADE[places]):    # 0.09996 rounds up to 0.1000: the general path
            return text
    rounded = float("%.3g" % value)   # the rounding, then the digits it left (99.96 -> 100, not 100.0)
    places = 2 - math.floor(math.log10(abs(rounded)))
    if places <= 0:
        return f"{rounded:,.0f}"
    return "%.*f" % (places, rounded)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{_f(seconds)}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def _scopes_used(report: Report) -> list[str]:
    return [s for s in SCOPES if s in report.total.emissions_g]


def _figure_cells(f: Figures, scopes: Sequence[str], water: bool) -> list[str]:
    cells = [_duration(f.duration_s)]
    cells += [_f(j / 3600.0) for j in f.energy[:3]]
    cells.append(_f(f.energy_kwh, 3))
    em = dict(f.emissions)
    cells += [_f(em.get(s)) for s in scopes]
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
    status = f"{row.status} (checkpoint)" if row.checkpoint else row.status
    return f"{status} SIMULATED" if row.simulated else status


def _job_cells(rows: SortedRows, scopes: Sequence[str], water: bool) -> Iterator[list[str]]:
    """The Jobs section's cells, run by run, straight from the stored fields: the same cells as
    ``[job, run_id, host, day, _status(row), zone or "-"] + _figure_cells(row.figures, ...)``
    without building a row object per run (NaN stands for None in the stored floats)."""
    f = _f
    at = [5 + SCOPES.index(s) for s in scopes]      # location, market, embodied are floats 5-7
    statuses: dict[tuple[str, int], str] = {}
    for fl, it, ob in rows.fields():
        dur, gpu, cpu, ram, total, loc, _mkt, _emb, water_l, gpu_h, _i, _p, _e, _k, _s = fl
        tokens, _prompt, _gen, _gpus, flags = it
        run_id, job, host, day, _start, status, _labels, zone, _source, _models, _end = ob
        key = (status, flags & 3)
        shown = statuses.get(key)
        if shown is None:
            shown = f"{status} (checkpoint)" if flags & 1 else status
            shown = statuses[key] = f"{shown} SIMULATED" if flags & 2 else shown
        cells = [job, run_id, host, day, shown, zone or "-", _duration(dur), f(gpu / 3600.0), f(cpu / 3600.0),
                 f(ram / 3600.0), f(total / J_PER_KWH)]
        for k in at:
            v = fl[k]
            cells.append(f(v) if v == v else "-")
        if water:
            cells.append(f(water_l) if water_l == water_l else "-")
        if tokens:
            cells += (f"{tokens:,}", f(total / tokens), f(total / 3600.0 / tokens * 1000.0))
        else:
            cells += ("-", "-", "-")
        if loc == loc:
            cells += (f(loc / gpu_h) if gpu_h else "-", f(loc / tokens * 1000.0) if tokens else "-")
        else:
            cells += ("-", "-")
        yield cells


@dataclass
class _Section:
    title: str
    headers: list[str]
    rows: Iterable[list[str]]          # per-run sections are generators: never all in memory
    n_text: int                        # leading left-aligned text columns
    widths: list[int] | None = None    # precomputed for streamed sections


def _job_widths(heads: list[str], texts: Sequence[Sequence[str]], bounds: Sequence[Sequence[str]]) -> list[int]:
    # NB: texts are the leading columns' values for every run (cheap strings already held by the rows)
    """Column widths for a streamed per-run section without formatting every cell twice: text
    columns from a cheap max over the rows; figure columns from the group and total cells (sums
    bound each run's value), and at least 8 characters (three significant figures below 1 need
    up to 7: 0.00123). A wider cell pushes its line out rather than being cut."""
    widths = [len(h) for h in heads]
    for i, col in enumerate(texts):
        widths[i] = max(widths[i], max((len(c) for c in col), default=0))
    for cells in bounds:        # figure cells only, aligned with the columns after the text ones
        for j, cell in enumerate(cells):
            widths[len(texts) + j] = max(widths[len(texts) + j], len(cell), 8)
    return widths


def _column(rows: Sequence[JobRow], name: str) -> list[str]:
    # SortedRows reads a column without building rows; a plain sequence of JobRows is read per row
    col = rows.column(name) if isinstance(rows, SortedRows) else [getattr(r, name) for r in rows]
    return ["-" if v is None else v for v in set(col)]    # only the widths matter here


def _status_bound(report: Report) -> list[str]:
    """Status strings wide enough for any row, from the distinct statuses (no pass over 200k rows)."""
    statuses = set(_column(report.rows, "status"))
    return [f"{s} (checkpoint) SIMULATED" for s in statuses]


def _sections(report: Report) -> list[_Section]:
    """The jobs, the grouped totals and the what-if table."""
    scopes = _scopes_used(report)
    water = report.total.water_l is not None
    rows = report.rows
    heads = ["JOB", "RUN", "HOST", "DAY", "STATUS", "ZONE"] + _figure_headers(scopes, water)
    groups = [[key, str(f.runs)] + _figure_cells(f, scopes, water) for key, f in report.groups]
    groups.append(["TOTAL", str(report.total.runs)] + _figure_cells(report.total, scopes, water))
    texts = [_column(rows, "job"), _column(rows, "run_id"), _column(rows, "host"), _column(rows, "day"),
             [_status(r) for r in rows] if len(rows) < 1000 else _status_bound(report), _column(rows, "zone")]
    jobs = _job_cells(sorted_rows(rows), scopes, water)
    out = [_Section("Jobs", heads, jobs, 6, _job_widths(heads, texts, [g[2:] for g in groups]))]
    out.append(_Section(f"Totals by {report.group_by}", [report.group_by.upper(), "RUNS"]
                        + _figure_headers(scopes, water), groups, 1))
    wi = report.what_if
    if wi is not None:
        heads = ["JOB", "RUN", "ZONE", "g CO2e actual"] + [f"g in {z.key}" for z in wi.zones]
        total = ["TOTAL", "", "", _f(report.total.emissions_g.get("location"))] + [_f(wi.totals[z.key]) for z in wi.zones]
        per_run = ([r.job, r.run_id, r.zone or "-", _f(r.figures.emissions_g.get("location"))]
                   + [_f(wi.per_run[r.run_id][z.key]) for z in wi.zones] for r in rows)
        widths = _job_widths(heads, texts[:2] + [texts[5]], [total[3:]])
        names = ", ".join(f"{z.key} {z.g_per_kwh:g} g/kWh ({z.source_label})" for z in wi.zones)
        out.append(_Section(f"What if (location-based; {names})", heads,
                            itertools.chain(per_run, [total]), 3, widths))
    return out


def _header_line(report: Report) -> str:
    files = ", ".join(report.paths)
    bits = [f"{report.lines} lines"]
    if report.superseded:
        bits.append(f"{report.superseded} checkpoint lines superseded")
    if report.skipped:
        bits.append(f"{len(report.skipped)} malformed lines skipped")
    line = f"wattmeter report: {len(report.rows)} runs from {files} ({', '.join(bits)})"
    if report.simulated_runs:
        line += f"\n{SIMULATED_NOTE.format(n=report.simulated_runs)}"
    return line


SIMULATED_NOTE = ("SIMULATED: {n} run(s) metered fake GPUs (fake NVML); their GPU figures are not measurements "
                  "(marked SIMULATED)")


def _footnotes(report: Report) -> list[str]:
    notes = []
    if report.total.runs_without_carbon:
        notes.append(f"{report.total.runs_without_carbon} run(s) carry no carbon figures: their emissions show '-'")
    if report.checkpoint_runs:
        notes.append("(checkpoint): only checkpoint lines exist, so the run is still going or was killed")
    notes.append("g CO2e location = kWh x PUE x grid intensity; market and embodied are separate scopes")
    notes.append("figures are rounded to three significant figures; units are in the column headings")
    return notes


def _text_table(section: _Section) -> Iterator[str]:
    rows = section.rows
    widths = section.widths
    if widths is None:
        rows = list(rows)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(section.headers)]
    n_text = section.n_text

    # one format string for the whole section: formatting 200k lines cell by cell was a third of the time
    fmt = "  ".join(f"{{:{'<' if i < n_text else '>'}{w}}}" for i, w in enumerate(widths)).format

    yield fmt(*section.headers).rstrip() + "\n"
    for batch in batches(rows):
        yield "\n".join([fmt(*r).rstrip() for r in batch]) + "\n"


def render_table(report: Report) -> Iterator[str]:
    yield _header_line(report) + "\n"
    for section in _sections(report):
        yield f"\n{section.title}\n"
        yield from _text_table(section)
    yield "\n" + "\n".join(_footnotes(report)) + "\n"


def render_markdown(report: Report) -> Iterator[str]:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    yield f"# {_header_line(report)}\n"
    for sec in _sections(report):
        heads = sec.headers
        yield (f"\n## {sec.title}\n\n| " + " | ".join(heads) + " |\n|"
               + "|".join("---" if i < sec.n_text else "---:" for i in range(len(heads))) + "|\n")
        lines = []
        for batch in batches(sec.rows):
            lines.clear()
            for r in batch:
                line = " | ".join(r)
                if line.count("|") != len(r) - 1:      # a cell holds a "|": escape cell by cell
                    line = " | ".join([esc(c) for c in r])
                lines.append(line)
            yield "| " + " |\n| ".join(lines) + " |\n"
    yield "\n" + "\n".join(f"- {n}" for n in _footnotes(report)) + "\n"


RENDERERS: dict[str, Callable[[Report], Iterator[str]]] = {
    "table": render_table, "csv": render_csv, "json": render_json,
    "markdown": render_markdown, "codecarbon": render_codecarbon,
}


def render_chunks(report: Report, fmt: str, more: ExtraColumns | None = None) -> Iterator[str]:
    """The report in pieces, for writing as it is made (200k runs never sit in one string).
    ``more`` adds columns to the csv and codecarbon formats (the others show them as a section)."""
    if fmt == "csv":
        return render_csv(report, more)
    if fmt == "codecarbon":
        return render_codecarbon(report, more)
    return RENDERERS[fmt](report)


def render(report: Report, fmt: str) -> str:
    return "".join(RENDERERS[fmt](report))
