"""CLI glue for the decision features, so the commands that own the flags need one-line hooks.

- ``estimate``: ``--start-window`` (best start from a forecast) and ``--price-per-kwh`` (cost);
- ``run``: ``--value``, ``--value-file``, ``--progress-file``, ``--wait-for-clean``;
- records written by ``run`` get ``value`` and ``projection`` fields from
  :meth:`DecisionWriter.extra_fields`, the ``enrich`` hook of ``RecordSink`` (each checkpoint and
  the final record; a failure there never costs the record).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

from .clock import Clock, SystemClock
from .errors import UsageError
from .projection import (POLL_MIN_S, ProgressError, ProgressFile, ProgressTracker, energy_so_far_j,
                         parse_progress_text, render_projection)
from .value import parse_value_flag, parse_value_text, value_fields


# -- estimate --------------------------------------------------------------------------------
def add_estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start-window", metavar="DURATION", default=None,
                   help="name the start within this window (e.g. 24h) that minimises CO2e, from the "
                        "--carbon-provider's forecast (ukgrid or electricitymaps)")
    p.add_argument("--price-per-kwh", metavar="PRICE", default=None,
                   help="energy price, e.g. 0.12 or 0.25EUR (default: the zone's row in carbon/data/prices.json)")


def estimate_extras(args: argparse.Namespace, config: Any, est: Any, err: TextIO | None = None,
                    now_unix: float | None = None) -> tuple[dict[str, Any], str]:
    """(fields for --json, lines for the text output) of cost and start window."""
    import time

    from .carbon.forecast import forecast_source_for, parse_duration, plan_or_now, render_plan
    from .carbon.prices import render_cost, resolve_price

    err = err or sys.stderr
    fields: dict[str, Any] = {}
    text = ""
    window_s = parse_duration(args.start_window, "--start-window") if args.start_window else None
    price = resolve_price(args.price_per_kwh, est.zone.key)
    r = est.result
    if price is not None:
        facility_kwh = r.energy_kwh * r.pue
        fields["cost"] = {**price.as_dict(), "energy_kwh": facility_kwh, "cost": price.cost(facility_kwh)}
        text += f"cost:     {render_cost(price, facility_kwh)}\n"
    if window_s is not None:
        source = forecast_source_for(config)
        plan = plan_or_now(source, time.time() if now_unix is None else now_unix, window_s, est.hours * 3600.0,
                           r.energy_kwh, r.pue, err)
        if plan is None:
            fields["start_plan"] = None
            text += "start:    now (no forecast reachable)\n"
        else:
            fields["start_plan"] = plan.as_dict()
            text += render_plan(plan)
    return fields, text


# -- run -------------------------------------------------------------------------------------
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decisions", "value, progress and when to start (see docs/decisions.md)")
    g.add_argument("--value", action="append", default=None, metavar="UNIT=N",
                   help="value this run delivers, e.g. samples=50000 (repeatable); tokens count automatically")
    g.add_argument("--value-file", default=None, metavar="PATH",
                   help="a file the job writes with its value: JSON {\"samples\": 1000} or lines UNIT=N")
    g.add_argument("--progress-file", default=None, metavar="PATH",
                   help="a file the job writes with its progress (0.42 or 420/1000); records then carry a "
                        "projection to completion (the file is checked every 0.25 s)")
    g.add_argument("--wait-for-clean", default=None, metavar="MAX_DELAY",
                   help="hold the job until the cleanest start within MAX_DELAY (e.g. 6h) by the "
                        "--carbon-provider's forecast; never later")
    g.add_argument("--expected-duration", default="1h", metavar="DURATION",
                   help="how long the job runs, for --wait-for-clean (default 1h)")


def run_values(args: argparse.Namespace) -> dict[str, float]:
    """``--value`` flags, checked before the job starts (a bad one is exit 2)."""
    out: dict[str, float] = {}
    for spec in args.value or ():
        unit, n = parse_value_flag(spec)
        out[unit] = out.get(unit, 0.0) + n
    return out


def before_run(args: argparse.Namespace, file_config: Mapping[str, Any], err: TextIO | None = None,
               clock: Clock | None = None) -> None:
    """Hold the job for ``--wait-for-clean``. No provider reachable: one line, start now."""
    if not args.wait_for_clean:
        return
    from .carbon.config import CarbonConfig
    from .carbon.forecast import forecast_source_for, parse_duration, wait_for_clean

    max_delay_s = parse_duration(args.wait_for_clean, "--wait-for-clean")
    duration_s = parse_duration(args.expected_duration, "--expected-duration")
    config = CarbonConfig.from_args(args, env=os.environ, file_config=file_config)
    config.validate()                    # a bad carbon flag fails now, not after hours of waiting
    clock = clock or SystemClock()
    err = err or sys.stderr
    source = forecast_source_for(config, clock.now)
    wait_for_clean(source, clock, max_delay_s, duration_s, config.effective_pue(), err=err, tty=err.isatty())


class DecisionWriter:
    """Adds ``value`` and ``projection`` to each record ``run`` writes: pass ``extra_fields`` as
    ``RecordSink(..., enrich=...)``.

    The value file is read at each record. The progress file is followed by :meth:`poll`: each
    record polls it, and so does the meter's sampler every quarter second once :meth:`follow`
    is called, so the projection (records and ``/metrics``) follows the file within a second
    rather than a checkpoint interval. A bad value or progress is a warning, never a failed run
    (the child's exit code wins and the record is still written)."""

    def __init__(self, values: Mapping[str, float] | None = None, value_file: str | None = None,
                 progress_file: str | None = None, err: TextIO | None = None,
                 energy_now: Callable[[], float] | None = None) -> None:
        self.values = dict(values or {})
        self.value_file = value_file
        self.progress_file = progress_file
        self.err = err or sys.stderr
        self.energy_now = energy_now         # energy metered so far, for polls between records
        self.tracker = ProgressTracker()
        self._lock = threading.Lock()        # the tracker is read by /metrics scrapes on other threads
        self._poll_lock = threading.Lock()   # polls come from the sampler and the record writer
        self._progress = ProgressFile(progress_file) if progress_file else None
        self._fraction: float | None = None  # the latest progress read from the file
        self._warned: set[str] = set()

    def projection(self) -> Any:
        """The latest projection to completion, or None (safe from any thread)."""
        with self._lock:
            return self.tracker.projection()

    def follow(self, meter: Any, period_s: float = POLL_MIN_S / 2) -> None:
        """Poll the progress file from ``meter``'s sampler every ``period_s`` (on its own thread),
        each new progress paired with the energy metered so far as ``meter.progress()`` pairs it.
        ``run`` calls this once, after building the meter; without a progress file it does nothing."""
        if self._progress is None:
            return
        clock = meter.clock
        self.energy_now = lambda: energy_so_far_j(meter.snapshot())
        meter.sampler.add_task("progress-file", period_s, lambda now: self.poll(clock.wall(now)))

    def poll(self, now: float, energy_j: float | None = None, force: bool = False) -> bool:
        """Follow the progress file: a ``stat``, and a read only when it changed, at most every
        POLL_MIN_S by ``now`` (Unix seconds; ``force`` skips that wait). New progress is added
        at ``now`` with ``energy_j``, else with ``energy_now()`` (called only then). True when a
        sample was added. Never raises for the file's sake: a bad file is a warning."""
        if self._progress is None or (energy_j is None and self.energy_now is None):
            return False
        origin = f"progress file {self.progress_file}"
        with self._poll_lock:
            try:
                text = self._progress.read_if_changed(now, force)
            except (OSError, UnicodeDecodeError) as exc:
                self._warn(f"cannot read {self.progress_file}: {exc}")
                return False
            if text is None or not text.strip():
                return False
            try:
                fraction = parse_progress_text(text, origin)
            except ProgressError as exc:
                self._warn(str(exc))
                return False
            energy = self.energy_now() if energy_j is None else energy_j     # type: ignore[misc]
            with self._lock:
                warning = self.tracker.add(now, fraction, float(energy), origin)
                self._fraction = fraction
        if warning:
            self._warn(warning)
        return True

    def _warn(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            self.err.write(f"wattmeter: warning: {text}\n")

    def _read(self, path: str) -> str | None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            self._warn(f"cannot read {path}: {exc}")
            return None

    def extra_fields(self, record: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(self.values)
        if self.value_file:
            text = self._read(self.value_file)
            if text is not None:
                try:
                    for unit, n in parse_value_text(text, f"value file {self.value_file}").items():
                        values[unit] = values.get(unit, 0.0) + n
                except UsageError as exc:
                    self._warn(str(exc))
        out = value_fields(record, values)
        if self.progress_file:
            energy = (record.get("energy_j") or {}).get("total")
            if isinstance(energy, (int, float)):
                now = float(record.get("end_unix") or 0.0)
                # the final record always looks at the file: a job's last "1.0" is not left behind
                if not self.poll(now, float(energy), force=not record.get("checkpoint")):
                    self._stalled(now, float(energy))
            projection = self.projection()
            if projection is not None:
                carbon = record.get("carbon") or {}
                g = carbon.get("intensity_avg_g_per_kwh", carbon.get("intensity_g_per_kwh"))
                out["projection"] = projection.as_record(g, float(carbon.get("pue", 1.0)) if carbon else 1.0)
        return out

    def _stalled(self, now: float, energy_j: float) -> None:
        """No new progress at this record: the time and energy spent since still count."""
        with self._lock:
            if self._fraction is not None:
                self.tracker.add(now, self._fraction, energy_j)


def run_summary(record: Mapping[str, Any]) -> str:
    """Extra summary lines for ``run``: value per kWh and the last projection."""
    from .value import record_value

    lines = []
    amounts = record_value(record)
    for unit, per in (record.get("value_per_kwh") or {}).items():
        per_kg = (record.get("value_per_kg_co2e") or {}).get(unit)
        tail = f", {per_kg:,.1f} per kg CO2e" if per_kg else ""
        lines.append(f"value:    {amounts.get(unit, 0.0):,.6g} {unit}: {per:,.1f} per kWh{tail}")
    p = record.get("projection")
    if p:
        lines.append(f"progress: {p['fraction']:.1%}; projected {p['projected_kwh']:,.4f} kWh "
                     f"({p['projected_energy_j_low'] / 3.6e6:,.4f}-{p['projected_energy_j_high'] / 3.6e6:,.4f})")
    return "".join(line + "\n" for line in lines)


__all__ = ["add_estimate_arguments", "estimate_extras", "add_run_arguments", "run_values", "before_run",
           "DecisionWriter", "run_summary", "render_projection", "add_report_arguments", "fleet_report",
           "fleet_plot",
           "RecordValues", "records_decisions", "decision_columns", "decision_chunks"]


# -- report ----------------------------------------------------------------------------------
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decisions", "value, cost and fleet reports from Prometheus (see docs/decisions.md)")
    g.add_argument("--price-per-kwh", metavar="PRICE", default=None,
                   help="energy price for cost columns, e.g. 0.12 or 0.25EUR (default: the zone's row in "
                        "carbon/data/prices.json, where it has one)")
    g.add_argument("--prometheus", metavar="URL", default=None,
                   help="report the fleet from this Prometheus server instead of RECORDS")
    g.add_argument("--since", metavar="DURATION", default="7d", help="with --prometheus: the period (default 7d)")
    g.add_argument("--at", metavar="UNIX", type=float, default=None,
                   help="with --prometheus: end of the period as Unix time (default now)")
    g.add_argument("--step", metavar="DURATION", default="60s",
                   help="with --prometheus: resolution of idle time (default 60s; at least the scrape interval)")
    g.add_argument("--idle-threshold", metavar="FRACTION", type=float, default=0.25,
                   help="with --prometheus: list GPUs idle at least this share of the period as waste (default 0.25)")
    g.add_argument("--cap-watts", metavar="W", type=float, default=None,
                   help="with --prometheus: also show what capping idle GPUs to W watts would have saved")


def fleet_report(args: argparse.Namespace, group_by: str, zones: list) -> Any:
    """``report --prometheus``: the :class:`~wattmeter.carbon.fleet.FleetReport`. Every flag
    (and the --plot target) is checked before the first query."""
    from .carbon.fleet import PrometheusClient, build_fleet_report
    from .carbon.forecast import parse_duration
    from .carbon.prices import parse_price

    if not args.prometheus:
        raise UsageError("no RECORDS given; pass JSONL files written by 'wattmeter run', or --prometheus URL")
    if args.records:
        raise UsageError("give RECORDS or --prometheus URL, not both")
    since_s = parse_duration(args.since, "--since")
    step_s = parse_duration(args.step, "--step")
    if not 0.0 <= args.idle_threshold <= 1.0:
        raise UsageError(f"--idle-threshold {args.idle_threshold:g} is outside [0, 1]; give a share such as 0.25")
    if args.cap_watts is not None and not args.cap_watts > 0:
        raise UsageError(f"--cap-watts {args.cap_watts:g} must be above 0, e.g. 100")
    price = parse_price(args.price_per_kwh) if args.price_per_kwh else None
    if args.plot:
        from .carbon.plot import check_plot_target

        check_plot_target(args.plot)
    client = PrometheusClient(args.prometheus)
    return build_fleet_report(client, since_s, "host" if group_by == "job" else group_by, args.at, step_s,
                              args.idle_threshold, price, args.cap_watts, zones)


def fleet_plot(report: Any, path: str) -> Path:
    """``report --prometheus --plot``: GPU power over the report's period and energy per group,
    queried from the same server at the report's resolution."""
    from .carbon.fleet import PrometheusClient, fleet_power
    from .carbon.plot import plot_fleet

    plot_step_s, series = fleet_power(PrometheusClient(report.url), report.since_s, report.at, report.step_s)
    return plot_fleet(report, plot_step_s, series, path)


class RecordValues:
    """A ``make=`` for ``load_records`` that passes each record to ``inner`` (the report's
    RowMaker) and keeps only the ``value`` field of runs that have one: the streaming report never
    holds whole records (docs/performance.md), and value is the one decision input its rows lack.
    A later line of the same run replaces the earlier one, as in the report."""

    def __init__(self, inner: Any) -> None:
        from .carbon.prices import price_zones

        self.inner = inner
        self.by_run: dict[str, dict[str, Any]] = {}
        self.any_figure = False          # a run with value, tokens or a priced zone was seen
        self._priced = set(price_zones())

    def __call__(self, record: Mapping[str, Any]) -> Any:
        # Parsed JSON: objects are dicts (isinstance(x, dict) is ~10x cheaper than the Mapping
        # ABC check, per record of 200k).
        value, run_id = record.get("value"), str(record.get("run_id"))
        if isinstance(value, dict) and value:
            self.by_run[run_id] = dict(value)
            self.any_figure = True
        else:
            self.by_run.pop(run_id, None)
        if not self.any_figure:
            tokens, carbon = record.get("tokens"), record.get("carbon")
            self.any_figure = (isinstance(tokens, dict) and any(tokens.values())) or \
                (isinstance(carbon, dict) and carbon.get("zone") in self._priced)
        return self.inner(record)

    def units(self) -> list[str]:
        """The value units of the runs seen, in name order (tokens are not among them: they are
        counted in the rows)."""
        return sorted({str(u) for v in self.by_run.values() for u, n in v.items()
                       if isinstance(n, (int, float)) and not isinstance(n, bool)})

    def value_of(self, run_id: str) -> dict[str, Any] | None:
        """The ``value`` field of a run's last record, or None."""
        return self.by_run.get(str(run_id))

    def record(self, row: Any) -> dict[str, Any]:
        """The fields of a report row's run that the decision figures read, as a record dict."""
        f = row.figures
        gen, total = row.tokens_generation, f.tokens
        out: dict[str, Any] = {"job": row.job, "end_unix": row.end_unix, "energy_j": {"total": f.energy[3]},
                               "tokens": {"generation": gen} if gen else ({"all": total} if total else {})}
        if not f.runs_without_carbon:
            out["carbon"] = {"zone": row.zone, "pue": row.pue, "emissions_g": dict(f.emissions)}
        value = self.by_run.get(str(row.run_id))
        if value:
            out["value"] = value
        return out


def records_decisions(records: Iterable[Mapping[str, Any]], price: Any = None) -> dict[str, Any]:
    """Per job: value per kWh and per kg CO2e, the comparison with the previous run, and cost
    (``price`` from --price-per-kwh, else each record's zone row in the price table). One pass;
    per job only its sums and its last two runs with value are kept."""
    from .carbon.prices import table_price
    from .value import compare_runs, record_kg_co2e, record_kwh, record_value

    jobs: dict[str, dict[str, Any]] = {}
    last_two: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        job = str(r.get("job", "?"))
        j = jobs.setdefault(job, {"job": job, "energy_kwh": 0.0, "kg_co2e": 0.0, "value": {}, "cost": None,
                                  "currency": None})
        kwh = record_kwh(r)
        j["energy_kwh"] += kwh
        j["kg_co2e"] += record_kg_co2e(r) or 0.0
        value = record_value(r)
        for unit, n in value.items():
            j["value"][unit] = j["value"].get(unit, 0.0) + n
        carbon = r.get("carbon") or {}
        p = price or table_price(str(carbon.get("zone", "")))
        if p is not None and (j["currency"] in (None, p.currency)):
            j["cost"] = (j["cost"] or 0.0) + p.cost(kwh * float(carbon.get("pue", 1.0) or 1.0))
            j["currency"] = p.currency
        if value:                      # the two latest by end time (ties: the later line is later)
            runs = last_two.setdefault(job, [])
            runs.append(r)
            runs.sort(key=lambda x: x.get("end_unix") or 0.0)
            del runs[:-2]
    for job, j in jobs.items():
        j["value_per_kwh"] = {u: n / j["energy_kwh"] for u, n in j["value"].items()} if j["energy_kwh"] else {}
        j["value_per_kg_co2e"] = {u: n / j["kg_co2e"] for u, n in j["value"].items()} if j["kg_co2e"] else {}
        j["comparison"] = compare_runs(last_two.get(job, []))
    return {"jobs": list(jobs.values())}


def decision_columns(report: Any, values: RecordValues, price: Any = None) -> Any:
    """The value and cost columns the csv and codecarbon formats add after their own (the same
    figures that table, Markdown and JSON show in their "value and cost" section)."""
    from .carbon.report_columns import DecisionColumns

    units = values.units()
    if report.total.tokens and "tokens" not in units:
        units.append("tokens")            # tokens count as value automatically
    return DecisionColumns(units, values.value_of, report.group_by, price)


def decision_chunks(chunks: Iterable[str], fmt: str, rows: Iterable[Any], values: RecordValues,
                    price: Any = None) -> Iterator[str]:
    """The streamed records report with the decision figures added: a ``decisions`` key in json,
    a "value and cost" section after table and markdown; csv and codecarbon carry them as columns
    (:func:`decision_columns`, passed to their renderer) and pass through here."""
    if fmt in ("csv", "codecarbon") or (fmt != "json" and price is None and not values.any_figure):
        yield from chunks              # nothing to add: no second pass over 200k rows
        return
    d = records_decisions((values.record(row) for row in rows), price)
    if fmt == "json":
        closing = "\n}\n"
        for chunk in chunks:
            if chunk == closing:       # render_json ends the document with this chunk
                yield ",\n  \"decisions\": " + json.dumps(d, indent=2).replace("\n", "\n  ")
            yield chunk
        return
    yield from chunks
    rows_out = [j for j in d["jobs"] if j["value"] or j["cost"] is not None]
    if not rows_out:
        return
    lines = ["", "## value and cost" if fmt == "markdown" else "value and cost:"]
    for j in rows_out:
        parts = [f"{u}: {n:,.6g} ({j['value_per_kwh'].get(u, 0):,.1f}/kWh"
                 + (f", {j['value_per_kg_co2e'][u]:,.1f}/kg CO2e" if u in j["value_per_kg_co2e"] else "") + ")"
                 for u, n in j["value"].items()]
        if j["cost"] is not None:
            parts.append(f"cost {j['cost']:,.4f} {j['currency']}")
        lines.append(("- " if fmt == "markdown" else "  ") + f"{j['job']}: " + "; ".join(parts))
        if j["comparison"]:
            lines.append(("- " if fmt == "markdown" else "  ") + j["comparison"])
    yield "\n".join(lines) + "\n"
