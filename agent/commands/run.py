"""`wattmeter run [options] -- CMD ...`: meter a command and write its record."""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import uuid

from ..decisions import DecisionWriter, add_run_arguments, before_run, run_summary, run_values
from ..config import Settings, labels as parse_labels, positive_float
from ..errors import UsageError
from ..exporters.records import RecordWriter, RunIdentity
from ..jobrun import JobRunner
from ..meter import Meter
from ..summary import render
from .common import add_sensor_arguments, discover_or_fail, sensor_plan, settings_from_cwd

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
    p.add_argument("--json", action="store_true", help="print the record as JSON on stdout")
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


def run_command(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command to run; put it after '--', e.g. wattmeter run -- python train.py")
    settings = settings_from_cwd()
    job = settings.get("job", args.job, os.path.basename(cmd[0]) or "job", str)
    try:
        labels = settings.get("labels", args.label, {}, parse_labels, flag_name="--label")
    except UsageError:
        raise
    records = settings.get("records", args.records, "wattmeter-records.jsonl", str)
    csv_path = settings.get("csv", args.csv, None, str)
    checkpoint_s = settings.get("checkpoint_interval", args.checkpoint_interval, 30.0, positive_float)
    grace_s = settings.get("kill_grace", args.kill_grace, 10.0, positive_float)
    try:
        writer = RecordWriter(records, csv_path)
    except OSError as exc:
        raise UsageError(f"records path {records if not csv_path else records + ' / ' + csv_path}: cannot write "
                         f"({exc}); pass --records with a writable file") from None
    carbon = _carbon(args, settings)
    writer = DecisionWriter(writer, run_values(args), args.value_file, args.progress_file)   # decisions
    before_run(args, settings.file)      # decisions: --wait-for-clean holds the job here
    plan = sensor_plan(args, settings, pid=os.getpid(), local_rank_gpu=True)
    found = discover_or_fail(plan)
    meter = Meter(found.sensors, notes=found.notes)
    ident = RunIdentity(run_id=uuid.uuid4().hex[:12], job=job, hostname=socket.gethostname(),
                        command=os.path.basename(cmd[0]), labels=labels,
                        context={k.lower(): os.environ[k] for k in CONTEXT_VARS if k in os.environ})
    if not args.quiet:
        for note in found.notes:
            sys.stderr.write(f"wattmeter: {note}\n")
    runner = JobRunner(meter, ident, writer, checkpoint_s=checkpoint_s, kill_grace_s=grace_s, carbon=carbon)
    exporter = _job_exporter(args, settings, meter, ident, carbon, writer.projection)
    if exporter is not None:
        runner.on_result.append(exporter.finish)   # the last push equals the record
        runner.on_tick.append(exporter.tick)
    try:
        outcome = runner.run(cmd)
    finally:
        if exporter is not None:
            exporter.close()
        meter.close()
    if outcome.message:
        sys.stderr.write(f"wattmeter: error: {outcome.message}\n")
    if args.json:
        sys.stdout.write(json.dumps(outcome.record) + "\n")
    if not args.quiet:
        sys.stderr.write(render(outcome.record) + "\n" + run_summary(outcome.record))
        sys.stderr.write(f"wattmeter: record appended to {records}\n")
    return outcome.exit_code


def _job_exporter(args, settings, meter, ident, carbon, projection=None):
    try:
        from ..exporters.jobexport import start_job_exporter
    except ImportError:
        return None
    return start_job_exporter(args, settings, meter, ident, carbon, projection)
