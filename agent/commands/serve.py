"""`wattmeter serve`: the node daemon / sidecar. Meters every visible GPU plus host CPU and RAM,
splits GPU energy among processes, containers and pods, and serves ``/metrics`` and ``/healthz``.

Its settings are one typed ``ServeSettings`` (``wattmeter.settings``); the meter and the carbon
feed come from the composition root (``wattmeter.compose``); this module adds the daemon's own
parts: attribution, tokens, the collector and the HTTP server. Scrapes read snapshots only;
every reader runs on the sampler.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections import Counter
from typing import Any, Callable

from .. import compose
from ..attribution import Attributor
from ..cgroups import CgroupResolver, PodDirectory, parse_cgroup
from ..config import flags_of
from ..exporters.http import DEFAULT_HOST, DEFAULT_PORT, MetricsServer
from ..exporters.prometheus import ExportSources, Health, build_registry
from ..health import Freshness
from ..podresources import with_pod_resources
from ..meter import Meter
from ..sensors.base import MigSensor, ProcessSensor
from ..settings import ServeSettings, carbon_settings
from .common import add_sensor_arguments, sensor_plan, settings_from_cwd
from .serve_tokens import add_token_arguments, check_gpu_map, start_tokens

log = logging.getLogger("wattmeter.serve")
CARBON_PERIOD_S = 15.0
TOKENS_PERIOD_S = 5.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the Prometheus exporter (node daemon or sidecar)",
                       description="Meter every visible GPU plus host CPU and RAM and serve Prometheus metrics "
                                   "on /metrics (and /healthz). Default address 127.0.0.1:9445; a non-loopback "
                                   "address must be given with --listen.")
    p.add_argument("--listen", default=None, metavar="ADDR",
                   help=f"PORT, HOST:PORT, :PORT (all interfaces) or [IPv6]:PORT "
                        f"(default {DEFAULT_HOST}:{DEFAULT_PORT}; env WATTMETER_LISTEN)")
    p.add_argument("--web-config", default=None, metavar="FILE",
                   help="exporter-toolkit web-config.yml: TLS, mTLS, basic auth (see docs/security.md)")
    p.add_argument("--pid-labels", action="store_true", default=None,
                   help="add a pid label to per-process series (off: PIDs churn and multiply series)")
    p.add_argument("--max-series", default=None, metavar="N",
                   help="cap on live per-process series (default 2000); refusals are counted")
    p.add_argument("--process-interval", default=None, metavar="S",
                   help="seconds between per-process GPU usage reads (default 1)")
    p.add_argument("--sidecar", action="store_true", default=None,
                   help="sidecar of one pod that owns its GPUs: GPU processes not visible in /proc are labelled "
                        "with this pod (POD_NAME, POD_NAMESPACE, POD_UID from the downward API; env WATTMETER_SIDECAR)")
    p.add_argument("--hostname", default=None, help="hostname label (default: this host's name; env NODE_NAME)")
    add_token_arguments(p)
    p.add_argument("--proc-root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pods-root", default=None, help=argparse.SUPPRESS)
    add_sensor_arguments(p)
    try:
        from ..carbon.config import add_carbon_arguments
    except ImportError:
        pass
    else:
        add_carbon_arguments(p)
    p.set_defaults(handler=serve_command)


class _Guarded:
    """A sampler task that cannot kill its reader thread; failures are counted and logged."""

    def __init__(self, name: str, fn: Callable[[float], None]) -> None:
        self.name, self.fn = name, fn
        self.errors: Counter[str] = Counter()

    def __call__(self, now: float) -> None:
        try:
            self.fn(now)
        except Exception as exc:  # the task belongs to another module; never let it stop the daemon
            self.errors["exception"] += 1
            log.warning("%s task failed: %s: %s", self.name, type(exc).__name__, exc)

    def health(self) -> list[Health]:
        return [Health(self.name, None, dict(self.errors))] if self.errors else []


def _healthz(fresh: Freshness, extra: list[Callable[[], str]]) -> Callable[[], tuple[bool, str]]:
    """/healthz: the sensors' freshness verdict, plus lines that are listed but never decide it
    (the token scraper)."""
    def check() -> tuple[bool, str]:
        ok, text = fresh.healthz()
        lines = [line() for line in extra]
        return ok, "\n".join([text, *lines]) if lines else text
    return check


def serve_command(args: argparse.Namespace) -> int:
    settings = settings_from_cwd()
    flags = flags_of(args)
    opts = ServeSettings.resolve(settings, flags, proc_root=args.proc_root, pods_root=args.pods_root)
    carbon = compose.carbon_accountant(carbon_settings(settings, args))
    plan = sensor_plan(args, settings, pid=None)   # host level: no process tree
    meter, _ = compose.cli_meter(plan)
    try:
        if opts.tokens is not None:
            check_gpu_map(opts.tokens, meter)
        return _serve(meter, opts, carbon)
    finally:
        meter.close()


def _serve(meter: Meter, opts: ServeSettings, carbon: Any) -> int:
    health: list = []
    fresh = Freshness(meter, meter.clock.now)     # per-device wattmeter_up and /healthz staleness
    sources = ExportSources(meter, opts.hostname, carbon=carbon, health=health,
                            pid_labels=opts.attribution.pid_labels, freshness=fresh.devices)
    psensors = [s for s in meter.sensors if isinstance(s, ProcessSensor)]
    if psensors:
        own_pod = parse_cgroup(_read(os.path.join(opts.proc_root, "self", "cgroup")))[2]
        resolver = CgroupResolver(opts.proc_root, PodDirectory(opts.pods_root, own_pod_uid=own_pod),
                                  sidecar=opts.sidecar)
        migs = [s for s in psensors if isinstance(s, MigSensor)]
        # Whole GPUs and MIG instances (both ID forms) -> pods through the kubelet pod-resources
        # API (no hostPID needed).
        lookup, read, warning = with_pod_resources(
            resolver.lookup, lambda now: [u for s in psensors for u in s.read_processes(now)],
            {k: s.device.labels.get("uuid", "") for k, s in meter.snapshot().items()}, os.environ,
            mig_uuids=(lambda: {u: at for s in migs for u, at in s.mig_uuids().items()}) if migs else None)
        if warning:
            sys.stderr.write(f"wattmeter: warning: {warning}\n")
        attributor = Attributor(read, lookup, opts.attribution, migs[0].mig_layout if migs else None)
        sources.attribution = attributor
        _task(meter, health, "processes", opts.process_interval_s,
              lambda now: attributor.tick(now, meter.snapshot()))
    if carbon is not None:
        _task(meter, health, "carbon", CARBON_PERIOD_S, compose.HostCarbonFeed(meter, carbon))
    health_lines: list[Callable[[], str]] = []
    tokens = None
    if opts.tokens is not None:
        # Binds the proxy (fails fast) and adds the scrape task before the sampler starts:
        # a task added to a running sampler never runs.
        tokens = start_tokens(opts.tokens, meter, carbon)
        sources.tokens = tokens.joiner
        health.append(tokens.health)
        health_lines.append(tokens.health_line)
        _task(meter, health, "tokens", TOKENS_PERIOD_S, tokens.joiner.tick)
    registry, _ = build_registry(sources)
    address, web = opts.address, opts.web
    try:
        server = MetricsServer(registry, address, web, health=_healthz(fresh, health_lines)).start()   # fails fast
    except BaseException:
        if tokens is not None:
            tokens.stop()
        raise
    health.append(server.health)     # refused / cut-off connections, counted from 0
    stop = threading.Event()
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        meter.start()
        for note in meter.notes:
            sys.stderr.write(f"wattmeter: {note}\n")
        if not address.loopback and not (web and (web.tls or web.users)):
            sys.stderr.write(f"wattmeter: warning: serving on {address} without TLS or auth; "
                             "see --web-config (docs/security.md)\n")
        if tokens is not None:
            sys.stderr.write(f"wattmeter: {tokens.describe}\n")
            if tokens.warning:
                sys.stderr.write(f"wattmeter: warning: {tokens.warning}\n")
        sys.stderr.write(f"wattmeter: serving {server.url}/metrics\n")
        sys.stderr.flush()
        while not stop.wait(1.0):    # short waits keep the main thread responsive to signals
            pass
    finally:
        server.stop()
        if tokens is not None:
            tokens.stop()
        meter.stop()
        for sig, handler in old.items():   # restored last: a second SIGTERM must not cut the clean-up short
            signal.signal(sig, handler)
    sys.stderr.write("wattmeter: stopped\n")
    return 0


def _task(meter: Meter, health: list, name: str, period_s: float, fn: Callable[[float], None]) -> None:
    guarded = _Guarded(name, fn)
    health.append(guarded.health)
    meter.sampler.add_task(name, period_s, guarded)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""
