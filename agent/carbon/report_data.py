"""A :class:`~wattmeter.carbon.report.Report` as data: CSV, JSON and CodeCarbon CSV, written
straight from the stored rows (200k runs never become row objects or one string)."""
from __future__ import annotations

import csv
import itertools
import json
from json.encoder import encode_basestring_ascii
from typing import Any, Iterable, Iterator, Mapping, Protocol

from .accounting import J_PER_KWH
from .codecarbon_csv import CODECARBON_COLUMNS, CodeCarbonLines, csv_cell, csv_cells, float_reprs
from .report import COMPONENTS, SCOPES, Figures, Report
from .rowstore import SortedRows, sorted_rows


def batches(rows: Iterable[Any], size: int = 1000) -> Iterator[list[Any]]:
    """``rows`` a thousand at a time: the output is written in chunks of many lines, not one
    write per run."""
    it = iter(rows)
    while batch := list(itertools.islice(it, size)):
        yield batch


CSV_COLUMNS = [
    "level", "group", "run_id", "job", "host", "day", "start", "status", "checkpoint", "simulated", "labels", "zone",
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


class _Lines:
    """A file-like sink for csv.writer that hands each written line back to a generator."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def drain(self) -> str:
        out = "".join(self.parts)
        self.parts.clear()
        return out


class ExtraColumns(Protocol):
    """Columns another feature adds after a CSV format's own (decisions: value and cost).
    ``run`` sees every run, in report order, before ``group`` and ``total`` are asked; it gets
    the figures it reads, not a row object (200k runs are formatted straight from the stored
    fields), and answers a cell per column ("" where empty)."""

    columns: list[str]

    def run(self, run_id: str, group: str, zone: str | None, pue: float | None, energy_j: float, tokens: int,
            location_g: float | None) -> list[Any]: ...

    def group(self, key: str) -> Mapping[str, Any]: ...

    def total(self) -> Mapping[str, Any]: ...


# One job row of render_csv, CSV_COLUMNS in order, as csv.writer writes it: level "job", an empty
# group, runs 1; floats by %r (the csv module writes repr); text and optional cells come formatted.
_CSV_JOB = "job,,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,1,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%d,%d,%d,%d,%s,%s,%s,%s,%s"


def render_csv(report: Report, more: ExtraColumns | None = None) -> Iterator[str]:
    wi = report.what_if
    extra = [f"whatif_{z.key}_g" for z in wi.zones] if wi else []
    columns = CSV_COLUMNS + extra + (more.columns if more else [])
    buf = _Lines()
    csv.writer(buf, lineterminator="\n").writerow(columns)
    yield buf.drain()
    rows = sorted_rows(report.rows)
    keys = rows.group_keys(report.group_by) if more else itertools.repeat("")
    shared: dict[Any, str] = {}      # the cell of a value many rows share (job, host, zone, labels...)
    known = shared.get
    reprs = float_reprs

    def cell(value: Any) -> str:
        text = ";".join(f"{k}={v}" for k, v in value) if isinstance(value, tuple) else value   # labels
        got = shared[value] = "" if value is None else csv_cell(text)
        return got

    # the job rows straight from the stored fields (NaN stands for None: an empty cell)
    for batch in batches(zip(rows.fields(), keys)):
        lines = []
        for (fl, it, ob), key in batch:
            dur, gpu, cpu, ram, total, loc, mkt, emb, water, gpu_h, inten, pue, _end, _kwh, _share = fl
            tokens, prompt, gen, gpus, flags = it
            run_id, job, host, day, start, status, labels, zone, source, _models, _end_text = ob
            line = _CSV_JOB % (
                csv_cell(run_id), known(job) or cell(job), known(host) or cell(host), known(day) or cell(day),
                csv_cell(start), known(status) or cell(status), "True" if flags & 1 else "False",
                "True" if flags & 2 else "False", known(labels) or cell(labels), known(zone) or cell(zone),
                repr(inten) if inten == inten else "", known(source) or cell(source),
                repr(pue) if pue == pue else "", *reprs([dur, gpu, cpu, ram, total, total / J_PER_KWH]),
                repr(loc) if loc == loc else "", repr(mkt) if mkt == mkt else "", repr(emb) if emb == emb else "",
                repr(water) if water == water else "", prompt, gen, tokens, gpus, repr(gpu_h),
                repr(total / tokens) if tokens else "", repr(total / 3600.0 / tokens * 1000.0) if tokens else "",
                repr(loc / gpu_h) if loc == loc and gpu_h else "",
                repr(loc / tokens * 1000.0) if loc == loc and tokens else "")
            if wi:
                line += "," + csv_cells([wi.per_run[run_id][z.key] for z in wi.zones])
            if more:
                line += "," + csv_cells(more.run(run_id, key, zone, pue if pue == pue else None, total, tokens,
                                                 loc if loc == loc else None))
            lines.append(line)
        yield "\n".join(lines) + "\n"
    sums = csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore")
    for key, f in report.groups:
        sums.writerow({"level": f"group:{report.group_by}", "group": key, **_figure_fields(f),
                       **(more.group(key) if more else {})})
    total_row = {"level": "total", **_figure_fields(report.total)}
    if wi:
        total_row.update({f"whatif_{z.key}_g": wi.totals[z.key] for z in wi.zones})
    if more:
        total_row.update(more.total())
    sums.writerow(total_row)
    yield buf.drain()


def _json_text(value: Any, cache: dict[Any, str]) -> str:
    """``json.dumps`` of a value shared by many rows (job, host, zone, label set), once per value."""
    got = cache.get(value)
    if got is None:
        got = cache[value] = json.dumps(dict(value) if isinstance(value, tuple) and value and
                                        isinstance(value[0], tuple) else
                                        list(value) if isinstance(value, tuple) else value)
    return got


# One job of render_json: json.dumps(JobRow.as_dict()) with its separators and key order.
_JOB_JSON = ('{"run_id": %s, "job": %s, "host": %s, "day": %s, "start": %s, "status": %s, "checkpoint": %s, '
             '"simulated": %s, "zone": %s, "intensity_g_per_kwh": %s, "intensity_source": %s, "pue": %s, '
             '"tokens_prompt": %d, "tokens_generation": %d, "gpu_count": %d, "labels": %s, "gpu_models": %s, '
             '"runs": 1, "duration_s": %s, "energy_j": {"gpu": %s, "cpu": %s, "ram": %s, "total": %s}, '
             '"energy_kwh": %s, "emissions_g": %s, "water_l": %s, "tokens": %d, "gpu_hours": %s, '
             '"j_per_token": %s, "wh_per_1k_tokens": %s, "g_per_gpu_hour": %s, "g_per_1k_tokens": %s, '
             '"runs_without_carbon": %d}')


def _json_jobs(rows: SortedRows) -> Iterator[str]:
    """Each job of the JSON document, formatted straight from the stored fields: the same text
    as ``json.dumps(row.as_dict())`` (a dict and an encoder pass per run cost a third of a 200k-run
    JSON report). Floats are ``repr``, as the json module writes finite ones; a run with an
    infinite figure (possible only in absurd records) goes through ``json.dumps``."""
    shared: dict[Any, str] = {}
    known = shared.get          # the cached text of a value shared by many rows (never empty)
    dumps = json.dumps
    text_of = encode_basestring_ascii      # what json.dumps does with a str, without its checks
    reprs = float_reprs
    for fields in rows.fields():
        fl, it, ob = fields
        dur, gpu, cpu, ram, total, loc, mkt, emb, water, gpu_h, inten, pue, _end, _kwh, _share = fl
        tokens, prompt, gen, gpus, flags = it
        run_id, job, host, day, start, status, labels, zone, source, models, _end_text = ob
        d, g, c, r, t, kwh, h = reprs([dur, gpu, cpu, ram, total, total / J_PER_KWH, gpu_h])
        if mkt != mkt and emb != emb:
            em = '{"location": %r}' % loc if loc == loc else "{}"
        else:
            em = dumps({s: v for s, v in (("location", loc), ("market", mkt), ("embodied", emb)) if v == v})
        text = _JOB_JSON % (
            text_of(run_id), known(job) or _json_text(job, shared), known(host) or _json_text(host, shared),
            known(day) or _json_text(day, shared), text_of(start), known(status) or _json_text(status, shared),
            "true" if flags & 1 else "false", "true" if flags & 2 else "false",
            known(zone) or _json_text(zone, shared), repr(inten) if inten == inten else "null",
            known(source) or _json_text(source, shared), repr(pue) if pue == pue else "null", prompt, gen, gpus,
            known(labels) or _json_text(labels, shared) if labels else "{}",
            known(models) or _json_text(models, shared) if models else "[]",
            d, g, c, r, t, kwh, em, repr(water) if water == water else "null", tokens,
            h, repr(total / tokens) if tokens else "null",
            repr(total / 3600.0 / tokens * 1000.0) if tokens else "null",
            repr(loc / gpu_h) if loc == loc and gpu_h else "null",
            repr(loc / tokens * 1000.0) if loc == loc and tokens else "null", 1 if flags & 4 else 0)
        if "inf" in text:       # 'inf' is no JSON: the json module writes Infinity
            from .rowstore import decode

            text = dumps(decode(*fields).as_dict())
        yield text


def render_json(report: Report) -> Iterator[str]:
    """The document of ``report.as_dict()``, written a thousand jobs at a time: one compact job
    object per line (an indented 200k-job document took 5 s more), the rest indented."""
    head = report.as_dict(jobs=False)
    yield '{\n  "simulated_runs": ' + json.dumps(head.pop("simulated_runs")) + ',\n  "jobs": ['
    first = True
    for batch in batches(_json_jobs(sorted_rows(report.rows))):
        yield ("" if first else ",") + "\n    " + ",\n    ".join(batch)
        first = False
    yield "\n  ]" if report.rows else "]"
    for key, value in head.items():
        yield ",\n  " + json.dumps(key) + ": " + json.dumps(value, indent=2).replace("\n", "\n  ")
    yield "\n}\n"


def render_codecarbon(report: Report, more: ExtraColumns | None = None) -> Iterator[str]:
    """CodeCarbon's columns first, in its order, then ``more`` (trailing: its readers still parse)."""
    buf = _Lines()
    csv.writer(buf, lineterminator="\n").writerow(CODECARBON_COLUMNS + (more.columns if more else []))
    yield buf.drain()
    rows = sorted_rows(report.rows)
    keys = rows.group_keys(report.group_by) if more else itertools.repeat("")
    line = CodeCarbonLines()     # codecarbon_row, from the stored fields, as csv.writer writes it
    for batch in batches(zip(rows.fields(), keys)):
        if more:
            lines = []
            for (fl, it, ob), key in batch:
                loc, pue = fl[5], fl[11]
                lines.append(line(fl, it, ob) + "," + csv_cells(more.run(
                    ob[0], key, ob[7], pue if pue == pue else None, fl[4], it[0], loc if loc == loc else None)))
        else:
            lines = [line(fl, it, ob) for (fl, it, ob), _ in batch]
        yield "\n".join(lines) + "\n"
