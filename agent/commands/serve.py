"""`wattmeter serve`: the node daemon / sidecar. Meters every visible GPU plus host CPU and RAM,
splits GPU energy among processes, containers and pods, and serves ``/metrics`` and ``/healthz``.

This is a composition root: it wires sensors -> meter -> attribution / carbon / tokens ->
collector -> HTTP server. Scrapes read snapshots only; every reader runs on the sampler.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from ..attribution import AttributionConfig, Attributor
from ..cgroups import CgroupResolver, PodDirectory, parse_cgroup
from ..config import Settings, positive_float, positive_int
from ..errors import UsageError
from ..exporters.http import DEFAULT_HOST, DEFAULT_PORT, ListenAddress, MetricsServer, parse_listen
from ..exporters.prometheus import ExportSources, Health, build_registry
from ..exporters.webconfig import WebConfig, load_web_config
from ..health import Freshness
from ..podresources import with_pod_resources
from ..meter import Meter
from ..model import Scope
from ..sensors.base import ProcessSensor
from .common import _bool, add_sensor_arguments, discover_or_fail, sensor_plan, settings_from_cwd

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
    p.add_argument("--server", default=None, metavar="KIND",
                   help="also scrape an inference server's token counters: "
                        "vllm|sglang|tgi|llamacpp|lmdeploy|triton|ray")
    p.add_argument("--server-url", default=None, metavar="URL", help="the server's /metrics URL (default per kind)")
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


class _CarbonFeed:
    """Gives the accountant each interval's host energy (GPU + CPU + RAM) with its wall times."""

    def __init__(self, meter: Meter, carbon: Any) -> None:
        self.meter, self.carbon = meter, carbon
        self._last: tuple[float, float] | None = None

    def __call__(self, now: float) -> None:
        snap = self.meter.snapshot()
        energy = sum(s.energy_j for s in snap.values() if s.device.scope == Scope.HOST)
        gpus = sum(1 for s in snap.values() if s.device.scope == Scope.HOST and s.device.component.value == "gpu")
        if self._last is not None:
            t0, e0 = self._last
            wall = self.meter.clock.wall
            self.carbon.add_energy(max(0.0, energy - e0), wall(t0), wall(now))
            if gpus:
                self.carbon.add_device_hours(gpus, max(0.0, now - t0) / 3600.0)
        self._last = (now, energy)


def _carbon(args: argparse.Namespace, settings: Settings) -> Any:
    try:
        from ..carbon.accounting import CarbonAccountant
        from ..carbon.config import CarbonConfig
    except ImportError:
        return None
    cfg = CarbonConfig.from_args(args, env=os.environ, file_config=settings.file)
    return CarbonAccountant(cfg, cfg.build_source())


def _tokens(args: argparse.Namespace, settings: Settings) -> tuple[Any, Any] | None:
    kind = settings.get("server", args.server, None, str)
    url = settings.get("server_url", args.server_url, None, str)
    if kind is None:
        if url is not None:
            raise UsageError("--server-url needs --server KIND (vllm, sglang, tgi, llamacpp, lmdeploy, triton, ray)")
        return None
    try:
        from ..tokens import TokenScraper, server_kind
    except ImportError:
        raise UsageError("--server: token scraping (wattmeter.tokens) is not in this build; drop --server") from None
    url = url or server_kind(kind).default_url
    return TokenScraper(kind, url), url


@dataclass
class ServeOptions:
    """Every setting of `serve`, parsed and checked before any thread or socket starts."""

    address: ListenAddress
    web: WebConfig | None
    attribution: AttributionConfig
    process_interval_s: float
    hostname: str
    proc_root: str = "/proc"
    pods_root: str = "/var/log/pods"
    sidecar: bool = False
    tokens: tuple[Any, str] | None = None      # (TokenScraper, url)
    carbon: Any = None                          # CarbonAccountant


def _options(args: argparse.Namespace, settings: Settings) -> ServeOptions:
    web_path = settings.get("web_config", args.web_config, None, str)
    return ServeOptions(
        address=parse_listen(settings.get("listen", args.listen, f"{DEFAULT_HOST}:{DEFAULT_PORT}", str)),
        web=load_web_config(web_path) if web_path else None,
        attribution=AttributionConfig(
            pid_labels=settings.get("pid_labels", args.pid_labels, False, _bool),
            max_series=settings.get("max_series", args.max_series, 2000, positive_int)),
        process_interval_s=settings.get("process_interval", args.process_interval, 1.0, positive_float),
        hostname=settings.get("hostname", args.hostname, os.environ.get("NODE_NAME") or socket.gethostname(), str),
        proc_root=args.proc_root or "/proc", pods_root=args.pods_root or "/var/log/pods",
        sidecar=settings.get("sidecar", args.sidecar, False, _bool),
        tokens=_tokens(args, settings), carbon=_carbon(args, settings))


def serve_command(args: argparse.Namespace) -> int:
    settings = settings_from_cwd()
    opts = _options(args, settings)
    found = discover_or_fail(sensor_plan(args, settings, pid=None))   # host level: no process tree
    meter = Meter(found.sensors, notes=found.notes)
    try:
        return _serve(meter, opts)
    finally:
        meter.close()


def _serve(meter: Meter, opts: ServeOptions) -> int:
    health: list = []
    fresh = Freshness(meter, meter.clock.now)     # per-device wattmeter_up and /healthz staleness
    sources = ExportSources(meter, opts.hostname, carbon=opts.carbon, health=health,
                            pid_labels=opts.attribution.pid_labels, freshness=fresh.devices)
    psensors = [s for s in meter.sensors if isinstance(s, ProcessSensor)]
    if psensors:
        own_pod = parse_cgroup(_read(os.path.join(opts.proc_root, "self", "cgroup")))[2]
        resolver = CgroupResolver(opts.proc_root, PodDirectory(opts.pods_root, own_pod_uid=own_pod),
                                  sidecar=opts.sidecar)
        layouts = [getattr(s, "mig_layout") for s in psensors if callable(getattr(s, "mig_layout", None))]
        # Whole GPUs and MIG instances -> pods through the kubelet pod-resources API (no hostPID needed).
        lookup, read, warning = with_pod_resources(
            resolver.lookup, lambda now: [u for s in psensors for u in s.read_processes(now)],
            {k: s.device.labels.get("uuid", "") for k, s in meter.snapshot().items()}, os.environ)
        if warning:
            sys.stderr.write(f"wattmeter: warning: {warning}\n")
        attributor = Attributor(read, lookup, opts.attribution, layouts[0] if layouts else None)
        sources.attribution = attributor
        _task(meter, health, "processes", opts.process_interval_s,
              lambda now: attributor.tick(now, meter.snapshot()))
    if opts.carbon is not None:
        _task(meter, health, "carbon", CARBON_PERIOD_S, _CarbonFeed(meter, opts.carbon))
    tokens = opts.tokens
    if tokens is not None:
        from ..tokens import TokenJoiner

        scraper = tokens[0]
        joiner = TokenJoiner(meter, scraper)
        sources.tokens = joiner
        health.append(lambda: [Health("tokens", scraper.up, dict(scraper.errors))])
        _task(meter, health, "tokens", TOKENS_PERIOD_S, joiner.tick)
    registry, _ = build_registry(sources)
    address, web = opts.address, opts.web
    server = MetricsServer(registry, address, web, health=fresh.healthz).start()   # binds: fails fast
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
            sys.stderr.write(f"wattmeter: scraping {tokens[0].server.name} token counters at {tokens[1]}\n")
        sys.stderr.write(f"wattmeter: serving {server.url}/metrics\n")
        sys.stderr.flush()
        while not stop.wait(1.0):    # short waits keep the main thread responsive to signals
            pass
    finally:
        server.stop()
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
