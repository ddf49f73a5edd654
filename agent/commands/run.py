"""`wattmeter run [options] -- CMD ...`: meter a command and write its record."""
from __future__ import annotations

import argparse
import os
import socket
import time
import uuid

from ..decisions import DecisionWriter, add_run_arguments, before_run, run_summary, run_values
from ..config import Settings, labels as parse_labels, positive_float
from ..errors import UsageError
from ..exporters.records import RecordSink, append_line, check_writable, json_line, record_of
from ..jobrun import JobRunner, hold_signals
from ..meter import Meter
from ..runsink import RunIdentity
from ..summary import render
from .common import add_sensor_arguments, check_output_paths, discover_or_fail, sensor_plan, settings_from_cwd

CONTEXT_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_PROCID", "POD_NAME", "POD_NAMESPACE")


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
    try:
        from ..exporters.jobexport import add_job_export_arguments
    except ImportError:
        return
    add_job_export_arguments(p)


def _add_carbon_arguments(p: argparse.ArgumentParser) -> None:
    try:
        from ..carbon.config import add_carbon_arguments
    except ImportError:
        return
    add_carbon_arguments(p)


def _carbon(args: argparse.Namespace, settings: Settings):  # -> CarbonAccountant | None
    try:
        from ..carbon.accounting import CarbonAccountant
        from ..carbon.config import CarbonConfig
        from ..carbon.intensity import source_for
    except ImportError:
        return None
    cfg = CarbonConfig.from_args(args, env=os.environ, file_config=settings.file)
    cfg.validate()
    return CarbonAccountant(cfg, source_for(cfg))


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
    settings = settings_from_cwd()
    job = settings.get("job", args.job, os.path.basename(cmd[0]) or "job", str)
    labels = settings.get("labels", args.label, {}, parse_labels, flag_name="--label")
    records = settings.get("records", args.records, "wattmeter-records.jsonl", str)
    csv_path = settings.get("csv", args.csv, None, str)
    checkpoint_s = settings.get("checkpoint_interval", args.checkpoint_interval, 30.0, positive_float)
    grace_s = settings.get("kill_grace", args.kill_grace, 10.0, positive_float)
    json_to = args.json
    check_output_paths(("--records", records), ("--csv", csv_path))   # names the flag whose path is bad
    # decisions: --value is checked here (exit 2 before the job); value and projection fields are
    # added to every record through the sink's enrich hook, which can never cost the record.
    decisions = DecisionWriter(run_values(args), args.value_file, args.progress_file)
    try:
        sink = RecordSink(records, csv_path, enrich=decisions.extra_fields)
    except OSError as exc:
        raise UsageError(f"records path {records if not csv_path else records + ' / ' + csv_path}: cannot write "
                         f"({exc}); pass --records with a writable file") from None
    if json_to not in (None, "-"):
        try:
            check_writable(json_to)
        except OSError as exc:
            raise UsageError(f"--json {json_to}: cannot write ({exc}); pass a writable file, or '-' for stdout") \
                from None
    # decisions: --wait-for-clean holds the job here, before SIGINT is held, so Ctrl-C still ends
    # the wait at once (exit 130) instead of being kept for hours.
    before_run(args, settings.file)
    # From here on SIGINT is held for the job runner, in every thread started below (discovery,
    # exporters, sampler), so it can tell a terminal's Ctrl-C from a kill(1).
    hold_signals()
    carbon = _carbon(args, settings)
    plan = sensor_plan(args, settings, pid=os.getpid(), local_rank_gpu=True)
    found = discover_or_fail(plan)
    meter = Meter(found.sensors, notes=found.notes, interval_s=plan.interval_s)
    ident = RunIdentity(run_id=uuid.uuid4().hex[:12], job=job, hostname=socket.gethostname(),
                        command=os.path.basename(cmd[0]), labels=labels,
                        context={k.lower(): os.environ[k] for k in CONTEXT_VARS if k in os.environ})
    if not args.quiet:
        for note in found.notes:
            _say(2, f"wattmeter: {note}\n")
    # With --json -, stdout carries only the record: the child's stdout goes to stderr.
    runner = JobRunner(meter, ident, sink, checkpoint_s=checkpoint_s, kill_grace_s=grace_s, carbon=carbon,
                       child_stdout=2 if json_to == "-" else None, start_t=called_t)
    exporter = _job_exporter(args, settings, meter, ident, carbon, decisions.projection)
    if exporter is not None:
        runner.on_result.append(exporter.finish)   # the last push equals the record
        runner.on_tick.append(exporter.tick)
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
            _say(2, f"wattmeter: record appended to {records}\n")
    return outcome.exit_code


def _job_exporter(args, settings, meter, ident, carbon, projection=None):
    try:
        from ..exporters.jobexport import start_job_exporter
    except ImportError:
        return None
    return start_job_exporter(args, settings, meter, ident, carbon, projection)
