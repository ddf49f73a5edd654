"""Metrics of one ``wattmeter run`` job: a scrape port while it runs, and/or Pushgateway pushes.

``agent/commands/run.py`` calls ``add_job_export_arguments`` and ``start_job_exporter``; the
returned exporter's ``tick()`` runs at every checkpoint and at the end, ``close()`` once after.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings, positive_float
from .http import MetricsServer, parse_listen
from ..model import Component
from .prometheus import ExportSources, Health, JobEnergy, build_registry, job_energy
from .pushgateway import Pusher, validate_gateway_url
from .webconfig import load_web_config


def add_job_export_arguments(p: argparse.ArgumentParser) -> None:
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


def _port(value: Any) -> int:
    text = str(value).strip()
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError("expected a port number 0-65535 (0 picks a free port)")
    return int(text)


@dataclass
class JobExporter:
    job: str = ""
    server: MetricsServer | None = None
    pusher: Pusher | None = None
    notes: list[str] = field(default_factory=list)
    final: list[JobEnergy] | None = None     # set by finish(): the job's window, as in its record

    def finish(self, result: Any) -> None:
        """Freeze the job series to the job's window result (so the last push equals the record,
        without the few hundred ms the meter runs on after the command exits)."""
        self.final = [JobEnergy(self.job, c.value, result.component_energy_j(c)) for c in Component
                      if any(d.component == c for d in result.devices)]

    def tick(self) -> None:
        """At a checkpoint and at the end: ask for a push now (never blocks the job)."""
        if self.pusher is not None:
            self.pusher.request()

    def close(self) -> None:
        """Final push (with retries; a failure is reported, never raised), then stop serving."""
        if self.pusher is not None:
            self.pusher.close()
        if self.server is not None:
            self.server.stop()


def start_job_exporter(args: argparse.Namespace, settings: Settings, meter: Any, ident: Any,
                       carbon: Any, projection: Any = None) -> JobExporter | None:
    """None when neither a port nor a gateway is asked for. Bad values are UsageErrors (exit 2)
    raised before the job starts; a gateway that is down later is only counted."""
    port = settings.get("metrics_port", getattr(args, "metrics_port", None), None, _port)
    gateway = settings.get("pushgateway", getattr(args, "pushgateway", None), None, str)
    if port is None and gateway is None:
        return None
    interval = settings.get("push_interval", getattr(args, "push_interval", None), 15.0, positive_float)
    host = settings.get("metrics_listen", getattr(args, "metrics_listen", None), "127.0.0.1", str)
    web_path = settings.get("web_config", getattr(args, "web_config", None), None, str)
    # Everything is checked before anything starts, so a bad flag never leaves a thread behind.
    if gateway is not None:
        validate_gateway_url(gateway)
    address = parse_listen(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "--metrics-listen") \
        if port is not None else None
    web = load_web_config(web_path) if web_path else None

    health: list = []
    out = JobExporter(job=ident.job)
    def jobs() -> list[JobEnergy]:
        return out.final if out.final is not None else job_energy(ident.job, meter.snapshot())

    sources = ExportSources(meter, ident.hostname, carbon=carbon, health=health, jobs=jobs,
                            projection=projection, job_name=ident.job)      # decisions: projected energy
    registry, _ = build_registry(sources)
    if address is not None:
        out.server = MetricsServer(registry, address, web, flag="--metrics-port").start()
        out.notes.append(f"serving the job's metrics at {out.server.url}/metrics")
    if gateway is not None:
        out.pusher = Pusher(gateway, ident.job, {"run_id": ident.run_id, "instance": ident.hostname}, registry,
                            interval_s=interval)
        health.append(out.pusher.health)
        out.pusher.start()
        out.notes.append(f"pushing the job's metrics to {out.pusher.url} every {interval:g} s "
                         f"(job={ident.job}, run_id={ident.run_id})")
    if not getattr(args, "quiet", False):
        for note in out.notes:
            sys.stderr.write(f"wattmeter: {note}\n")
    return out


__all__ = ["add_job_export_arguments", "start_job_exporter", "JobExporter", "Health"]
