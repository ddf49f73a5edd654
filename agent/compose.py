"""The composition root: the one place that builds the meter, the record sinks, the job metrics
export and the carbon feed from the typed settings (``wattmeter.settings``, ``SensorSettings``,
``CarbonConfig``), for `run`, `serve` and the Python API alike. Commands parse and print; they
wire nothing themselves.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .config import Settings, checked_fake_request
from .model import Component, Scope, WindowResult
from .runsink import RunFacts, RunIdentity

if TYPE_CHECKING:  # pragma: no cover
    from .carbon.accounting import CarbonAccountant, CarbonResult
    from .carbon.config import CarbonConfig
    from .clock import Clock
    from .commands.common import CliSensorPlan
    from .discovery import Discovered
    from .exporters.jobexport import JobExporter
    from .exporters.records import RecordSink
    from .meter import Meter
    from .sensors.base import Sensor
    from .settings import ApiSettings, ExportSettings, RecordSettings

# Scheduler / launcher variables that say where a run ran; copied into each record's context.
CONTEXT_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_PROCID", "POD_NAME", "POD_NAMESPACE")


# -- the meter -------------------------------------------------------------------------------
def discover_sensors(*, pid: int | None, fake_gpus: int | None = None, scenario: str | os.PathLike[str] | None = None,
                     clock: "Clock | None" = None) -> tuple[list["Sensor"], list[str]]:
    """The Python API's sensors: this machine's, or ``fake_gpus``/``scenario`` simulated GPUs
    (checked like --fake-gpus / --fake-nvml)."""
    from .discovery import SensorPlan, discover

    n, path = checked_fake_request(fake_gpus, None if scenario is None else os.fspath(scenario))
    found = discover(SensorPlan(pid=pid, fake_gpus=n, clock=clock, fake_scenario=path))
    return found.sensors, found.notes


def cli_meter(plan: "CliSensorPlan") -> tuple["Meter", "Discovered"]:
    """`run`'s and `serve`'s meter: the planned sensors (an impossible --gpus fails here, exit 2)."""
    from .commands.common import discover_or_fail
    from .meter import Meter

    found = discover_or_fail(plan)
    return Meter(found.sensors, notes=found.notes, interval_s=plan.interval_s), found


def default_meter() -> "Meter":
    """The process-wide default meter (``wattmeter.get_meter()``): this process tree's share of
    CPU and RAM and every GPU it sees, started; closed at exit."""
    import atexit

    from .meter import Meter

    meter = Meter(pid=os.getpid()).start()
    atexit.register(meter.close)
    return meter


# -- carbon ----------------------------------------------------------------------------------
def carbon_accountant(config: "CarbonConfig | None") -> "CarbonAccountant | None":
    """The accountant `run` feeds interval by interval (None in a build without carbon)."""
    if config is None:
        return None
    from .carbon.accounting import CarbonAccountant

    return CarbonAccountant(config, config.build_source())


class HostCarbonFeed:
    """`serve`'s carbon feed: a sampler task giving the accountant each interval's host energy
    (GPU + CPU + RAM) with its wall times."""

    def __init__(self, meter: "Meter", carbon: "CarbonAccountant") -> None:
        self.meter, self.carbon = meter, carbon
        self._last: tuple[float, float] | None = None

    def __call__(self, now: float) -> None:
        snap = self.meter.snapshot()
        energy = sum(s.energy_j for s in snap.values() if s.device.scope == Scope.HOST)
        gpus = sum(1 for s in snap.values() if s.device.scope == Scope.HOST and s.device.component == Component.GPU)
        if self._last is not None:
            t0, e0 = self._last
            wall = self.meter.clock.wall
            self.carbon.add_energy(max(0.0, energy - e0), wall(t0), wall(now))
            if gpus:
                self.carbon.add_device_hours(gpus, max(0.0, now - t0) / 3600.0)
        self._last = (now, energy)


# -- records and the job export ------------------------------------------------------------------
def run_identity(job: str, command: str, labels: Mapping[str, str],
                 env: Mapping[str, str] | None = None) -> RunIdentity:
    import socket
    import uuid

    env = os.environ if env is None else env
    return RunIdentity(run_id=uuid.uuid4().hex[:12], job=job, hostname=socket.gethostname(), command=command,
                       labels=dict(labels), context={k.lower(): env[k] for k in CONTEXT_VARS if k in env})


def record_sink(records: "RecordSettings", settings: Settings,
                enrich: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None) -> "RecordSink":
    """The JSONL (and CSV) sink of ``records``; a path that cannot be opened names its flag."""
    from .exporters.records import RecordSink

    try:
        return RecordSink(records.records, records.csv, enrich=enrich)
    except OSError as exc:
        paths = " / ".join(p for p in (records.records, records.csv) if p)
        raise settings.error(f"records path {paths}: cannot write ({exc}); pass {settings.option('records')} "
                             f"with a writable file") from None


def job_exporter(export: "ExportSettings", meter: "Meter", ident: RunIdentity, carbon: Any = None,
                 projection: Callable[[], Any] | None = None) -> "JobExporter | None":
    """A run's scrape port and/or Pushgateway pushes (None when neither is asked for)."""
    if not export.wanted:
        return None
    from .exporters.jobexport import JobExportOptions, start_job_exporter

    return start_job_exporter(JobExportOptions(address=export.address, web=export.web,
                                               pushgateway=export.pushgateway,
                                               push_interval_s=export.push_interval_s),
                              meter, ident, carbon, projection)


# -- the Python API's records ------------------------------------------------------------------
@dataclass
class WindowRecorder:
    """The Python API's ``records=``/``zone=``/``pue=``: each window's record, the same one `run`
    writes (``exporters.records.RecordSink``), with its carbon from the same accountant.

    Writing never raises into the caller's code: a record that cannot be written is saved to the
    fallback file (``$XDG_STATE_HOME/wattmeter/``) and a ``RuntimeWarning`` says where.
    """

    settings: "ApiSettings"
    sink: "RecordSink | None" = None

    def __post_init__(self) -> None:
        self._source: Any = None                    # the carbon intensity source, built once
        self._lock = threading.Lock()

    @classmethod
    def build(cls, settings: "ApiSettings") -> "WindowRecorder":
        sink = None
        if settings.records is not None:
            from .exporters.records import RecordSink

            try:
                sink = RecordSink(settings.records.records, settings.records.csv)
            except OSError as exc:
                api = Settings(env={}, api=True)
                raise api.error(f"records={settings.records.records!r}: cannot write ({exc}); "
                                f"pass records= with a writable file") from None
        return cls(settings, sink)

    def carbon_of(self, result: WindowResult) -> "CarbonResult | None":
        """The carbon of ``result`` with these settings' zone and PUE (None in a build without carbon)."""
        config = self.settings.carbon
        if config is None:
            return None
        from .carbon.accounting import CarbonAccountant

        with self._lock:
            if self._source is None:
                self._source = config.build_source()
        acct = CarbonAccountant(config, self._source)
        acct.add_energy(result.total_energy_j, result.start_wall, result.end_wall)
        gpus = sum(1 for d in result.devices if d.component == Component.GPU)
        if gpus:
            acct.add_device_hours(gpus, result.duration_s / 3600.0)
        return acct.snapshot()

    def write(self, result: WindowResult, labels: Mapping[str, str] | None = None, failed: bool = False) -> None:
        """Append ``result``'s record (status ``completed``, or ``failed`` when the block raised)."""
        if self.sink is None:
            return
        rec = self.settings.records
        assert rec is not None
        ident = run_identity(rec.job or result.name, os.path.basename(sys.argv[0] if sys.argv else "") or "python",
                             {**rec.labels, **(labels or {})})
        carbon = self.carbon_of(result)
        self.sink.write(result, RunFacts(ident, "failed" if failed else "completed", None,
                                         carbon=None if carbon is None else carbon.to_record()))
        if self.sink.pending:
            closed = self.sink.close()     # the fallback file, now: a Python program may never exit cleanly
            warnings.warn(f"wattmeter: {closed.warning}", RuntimeWarning, stacklevel=3)


def window_recorder(*, records: Any = None, csv: Any = None, zone: str | None = None, cloud: str | None = None,
                    pue: float | None = None, always: bool = False) -> WindowRecorder | None:
    """A recorder for the API's keyword arguments; None when none is given and not ``always``
    (nothing to write, and no config file is read)."""
    if not always and all(v is None for v in (records, csv, zone, cloud, pue)):
        return None
    from .settings import ApiSettings

    return WindowRecorder.build(ApiSettings.resolve(records=records, csv=csv, zone=zone, cloud=cloud, pue=pue))


__all__ = ["CONTEXT_VARS", "HostCarbonFeed", "WindowRecorder", "carbon_accountant", "cli_meter", "default_meter",
           "discover_sensors", "job_exporter", "record_sink", "run_identity", "window_recorder"]
