"""`wattmeter run [options] -- CMD ...`: meter a command and write its record."""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Mapping

from .. import compose
from ..decisions import DecisionWriter, add_run_arguments, before_run, run_summary, run_values
from ..config import flags_of
from ..errors import UsageError
from ..exporters.records import append_line, check_writable, json_line, record_of
from ..jobrun import JobRunner, hold_signals
from ..settings import ExportSettings, RecordSettings, carbon_settings
from ..summary import render
from .common import add_sensor_arguments, sensor_plan, settings_from_cwd


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a command and meter its energy",
                       description="Run CMD, meter the GPUs it can see and its process tree's CPU/RAM, "
                                   "and append a record. Exits with CMD's exit code.")
    p.add_argument("--job", default=None, help="job name (default: the command's name; env WATTMETER_JOB)")
    p.add_argument("--label", action="append", default=None, metavar="KEY=VALUE",
                   help="metadata carried into every record (repeatable), e.g. --label team=research")
    p.add_argument("--records", default=None, metavar="PATH",
                   help="JSONL file to append to (default ./wattmeter-records.jsonl; env WATTMETER_RECORDS)")
    p.add_argument("--csv", default=None, metavar="PATH", help="also append a CSV row")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="also write the final record as one JSON line to FILE; '-' (or no FILE) means "
                        "stdout, written once CMD is done, and CMD's own stdout then goes to stderr, so "
                        "`wattmeter run --json - -- CMD | jq` sees only the record")
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    p.add_argument("--checkpoint-interval", default=None, metavar="S",
                   help="seconds between checkpoint records (default 30)")
    p.add_argument("--kill-grace", default=None, metavar="S",
                   help="after forwarding SIGTERM, seconds before the child is killed (default 10)")
    _add_export_arguments(p)
    add_sensor_arguments(p)
    _add_carbon_arguments(p)
    add_run_arguments(p)          # decisions: --value, --value-file, --progress-file, --wait-for-clean
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command to run")
    p.set_defaults(handler=run_command)


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics export")
    g.add_argument("--metrics-port", default=None, metavar="P",
                   help="serve the job's Prometheus metrics on this port while it runs (env WATTMETER_METRICS_PORT)")
    g.add_argument("--metrics-listen", default=None, metavar="HOST",
                   help="address for --metrics-port (default 127.0.0.1; a non-loopback address must be given here)")
    g.add_argument("--web-config", default=None, metavar="FILE",
                   help="TLS / basic-auth web-config.yml for --metrics-port (exporter-toolkit format)")
    g.add_argument("--pushgateway", default=None, metavar="URL",
                   help="push the job's metrics to this Pushgateway periodically and at the end "
                        "(grouping key: job, run_id, instance; env WATTMETER_PUSHGATEWAY)")
    g.add_argument("--push-interval", default=None, metavar="S", help="seconds between pushes (default 15)")


def _add_carbon_arguments(p: argparse.ArgumentParser) -> None:
    try:
        from ..carbon.config import add_carbon_arguments
    except ImportError:
        return
    add_carbon_arguments(p)


def _say(fd: int, text: str) -> bool:
    """Write to stdout/stderr without ever raising: a reader that has gone (a closed CI log pipe)
    must not change the exit code, which is the child's."""
    data = memoryview(text.encode("utf-8", "replace"))
    try:
        while data:
            data = data[os.write(fd, data):]
        return True
    except OSError:
        return False


def run_command(args: argparse.Namespace) -> int:
    called_t = time.monotonic()     # the job's energy counts from here, sensor discovery included
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command to run; put it after '--', e.g. wattmeter run -- python train.py")
    # Every setting is resolved and checked here, once, before the job waits or starts: a bad
    # value is one line and exit 2, and the child never runs.
    settings = settings_from_cwd()
    flags = flags_of(args)
    records = RecordSettings.resolve(settings, flags, default_job=os.path.basename(cmd[0]) or "job")
    json_to = args.json
    # decisions: --value is checked here (exit 2 before the job); value and projection fields are
    # added to every record through the sink's enrich hook, which can never cost the record.
    decisions = DecisionWriter(run_values(args), args.value_file, args.progress_file)
    late: list = []                 # the discovery, once made: GPUs that came late are in the record

    def enrich(record: Mapping[str, Any]) -> Mapping[str, Any]:
        extra = dict(decisions.extra_fields(record))
        if late:
            found, wall = late[0]
            extra.update(found.record_fields(wall))
        return extra
    sink = compose.record_sink(records, settings, enrich=enrich)
    if json_to not in (None, "-"):
        try:
            check_writable(json_to)
        except OSError as exc:
            raise UsageError(f"--json {json_to}: cannot write ({exc}); pass a writable file, or '-' for stdout") \
                from None
    export = ExportSettings.resolve(settings, flags)
    carbon_config = carbon_settings(settings, args)
    plan = sensor_plan(args, settings, pid=os.getpid(), local_rank_gpu=True)
    # decisions: --wait-for-clean holds the job here, before SIGINT is held, so Ctrl-C still ends
    # the wait at once (exit 130) instead of being kept for hours.
    before_run(args, settings.file)
    # From here on SIGINT is held for the job runner, in every thread started below (discovery,
    # exporters, sampler), so it can tell a terminal's Ctrl-C from a kill(1).
    hold_signals()
    carbon = compose.carbon_accountant(carbon_config)
    meter, found = compose.cli_meter(plan)
    late.append((found, meter.clock.wall))
    decisions.follow(meter)          # the projection follows --progress-file between checkpoints
    assert records.job is not None
    ident = compose.run_identity(records.job, os.path.basename(cmd[0]), records.labels)
    if not args.quiet:
        for note in found.notes:
            _say(2, f"wattmeter: {note}\n")
    # With --json -, stdout carries only the record: the child's stdout goes to stderr.
    runner = JobRunner(meter, ident, sink, checkpoint_s=records.checkpoint_interval_s,
                       kill_grace_s=records.kill_grace_s, carbon=carbon,
                       child_stdout=2 if json_to == "-" else None, start_t=called_t)
    exporter = compose.job_exporter(export, meter, ident, carbon, decisions.projection)
    if exporter is not None:
        runner.on_result.append(exporter.finish)   # the last push equals the record
        runner.on_tick.append(exporter.tick)
        if not args.quiet:
            for note in exporter.notes:
                _say(2, f"wattmeter: {note}\n")
    try:
        outcome = runner.run(cmd)
    except Exception as exc:   # noqa: BLE001 - after the child ran, its exit code still wins
        if runner.child_exit_code is None:
            raise
        _say(2, f"wattmeter: error: the job ended (exit {runner.child_exit_code}) but its record failed: "
                f"{type(exc).__name__}: {exc}\n")
        return runner.child_exit_code
    finally:
        try:
            if exporter is not None:
                exporter.close()
        except Exception as exc:   # noqa: BLE001
            _say(2, f"wattmeter: warning: exporter: {type(exc).__name__}: {exc}\n")
        meter.close()
    if outcome.message:
        _say(2, f"wattmeter: error: {outcome.message}\n")
    for problem in outcome.hook_errors:
        _say(2, f"wattmeter: warning: {problem}\n")
    if sink.enrich_error:
        _say(2, f"wattmeter: warning: extra record fields failed ({sink.enrich_error}); the record was kept\n")
    if outcome.sink.warning:
        _say(2, f"wattmeter: warning: {outcome.sink.warning}\n")
    # The final record as the sink wrote it (with the decision fields), else rebuilt from the result.
    final = sink.last_record if sink.last_record is not None and not sink.last_record.get("checkpoint") \
        else record_of(outcome.result, outcome.facts)
    if json_to is not None:
        line = json_line(final)
        if json_to == "-":
            if not _say(1, line):
                _say(2, "wattmeter: warning: --json: stdout is closed; the record is in the records file\n")
        else:
            try:
                append_line(json_to, line)
            except OSError as exc:
                _say(2, f"wattmeter: warning: --json {json_to}: {exc.strerror or exc}; "
                        f"the record is in the records file\n")
    if not args.quiet:
        _say(2, render(outcome.result, outcome.facts) + "\n" + run_summary(final))
        if not outcome.sink.pending:
            _say(2, f"wattmeter: record appended to {records.records}\n")
    return outcome.exit_code

