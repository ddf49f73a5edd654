"""``wattmeter report --prometheus URL --since 7d``: fleet figures from a Prometheus HTTP API.

Every figure is an instant query at ``at`` (default now) over the range ``since``:

- energy: ``increase(wattmeter_{gpu,cpu,ram}_energy_joules_total[S])``, grouped by any label
  (``host`` = ``hostname``; ``namespace`` and ``pod`` use the per-process GPU series);
- CO2e by scope: ``increase(wattmeter_emissions_grams_total[S])`` per instance. A host's row is
  exact; other groupings share an instance's grams out by their share of its energy (stated);
- J/token and tokens per kWh: generation tokens against the GPU energy of the instances serving them;
- idle: ``increase(wattmeter_gpu_idle_energy_joules_total[S])`` and idle time, the number of
  ``step``-long steps in which that counter grew (a subquery), so accuracy is one step per change;
- cost: ``--price-per-kwh`` or the price table row of the instance's zone;
- what-if zones: the fleet's IT kWh at each zone's table intensity (PUE 1, as the records report);
- waste: GPUs idle at least ``idle_threshold`` of the period, longest first, with the kWh, CO2e and
  cost that releasing them (all idle energy) or capping them to ``cap_w`` would have saved.
"""
from __future__ import annotations

import csv
import io
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import UsageError
from .prices import Price, table_price
from .tables import ZoneInfo

J_PER_KWH = 3.6e6
_MAX_BODY = 64 << 20
_PROCESS_KEYS = ("namespace", "pod", "container_id")


class PrometheusClient:
    """Instant queries over HTTP. Every failure is a one-line UsageError naming the URL."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--prometheus {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        """An instant query: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        return self._get("query", {"query": expr, "time": f"{at:.3f}"}, expr)

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        """A range query: ``[{"metric": {...}, "values": [[t, "v"], ...]}, ...]``."""
        return self._get("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                         "step": f"{step_s:g}"}, expr)

    def _get(self, endpoint: str, params: Mapping[str, str], expr: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{endpoint}?{query}", timeout=self.timeout_s) as resp:  # noqa: S310
                body = resp.read(_MAX_BODY)
        except urllib.error.HTTPError as exc:
            detail = ""
            try:
                detail = json.loads(exc.read(65536)).get("error", "")
            except (ValueError, AttributeError, OSError):
                pass
            raise UsageError(f"--prometheus {self.url}: HTTP {exc.code} for {expr!r}"
                             f"{': ' + detail if detail else ''}; is this a Prometheus server?") from None
        except urllib.error.URLError as exc:
            raise UsageError(f"--prometheus {self.url} does not answer ({exc.reason}); "
                             "check the URL and that Prometheus is running") from None
        except (OSError, socket.timeout) as exc:
            raise UsageError(f"--prometheus {self.url} does not answer ({exc}); "
                             "check the URL and that Prometheus is running") from None
        try:
            data = json.loads(body)
            if data.get("status") != "success":
                raise ValueError(data.get("error", "status not success"))
            return list(data["data"]["result"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"--prometheus {self.url}: not a Prometheus API answer ({exc}); "
                             "give the server's base URL, e.g. http://prometheus:9090") from None


def _prom_duration(seconds: float) -> str:
    return f"{max(1, int(round(seconds)))}s"


def _value(row: Mapping[str, Any]) -> float:
    try:
        return float(row["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return 0.0


@dataclass
class GroupRow:
    key: str
    energy_j: float = 0.0
    emissions_g: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    gpu_energy_j: float = 0.0          # of the instances serving the tokens (for J/token)

    @property
    def energy_kwh(self) -> float:
        return self.energy_j / J_PER_KWH

    @property
    def j_per_token(self) -> float | None:
        return self.gpu_energy_j / self.tokens if self.tokens else None

    @property
    def tokens_per_kwh(self) -> float | None:
        return self.tokens / (self.gpu_energy_j / J_PER_KWH) if self.tokens and self.gpu_energy_j else None


@dataclass
class GpuIdle:
    hostname: str
    gpu: str
    uuid: str
    model: str
    energy_j: float
    idle_j: float
    idle_s: float
    period_s: float
    g_per_kwh: float | None            # effective location g per IT kWh of its instance
    price: Price | None
    cap_w: float | None

    @property
    def idle_kwh(self) -> float:
        return self.idle_j / J_PER_KWH

    @property
    def idle_hours(self) -> float:
        return self.idle_s / 3600.0

    @property
    def idle_share(self) -> float:
        return self.idle_s / self.period_s if self.period_s > 0 else 0.0

    @property
    def idle_power_w(self) -> float | None:
        return self.idle_j / self.idle_s if self.idle_s > 0 else None

    @property
    def cap_saved_kwh(self) -> float | None:
        if self.cap_w is None or self.idle_power_w is None:
            return None
        return max(0.0, self.idle_power_w - self.cap_w) * self.idle_s / J_PER_KWH

    def grams(self, kwh: float | None) -> float | None:
        return None if kwh is None or self.g_per_kwh is None else kwh * self.g_per_kwh

    def cost(self, kwh: float | None) -> float | None:
        return None if kwh is None or self.price is None else self.price.cost(kwh)

    def as_dict(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "gpu": self.gpu, "uuid": self.uuid, "model": self.model,
                "energy_kwh": self.energy_j / J_PER_KWH, "idle_kwh": self.idle_kwh, "idle_hours": self.idle_hours,
                "idle_share": self.idle_share, "idle_power_w": self.idle_power_w,
                "idle_emissions_g": self.grams(self.idle_kwh), "idle_cost": self.cost(self.idle_kwh),
                "currency": self.price.currency if self.price else None,
                "cap_w": self.cap_w, "cap_saved_kwh": self.cap_saved_kwh,
                "cap_saved_g": self.grams(self.cap_saved_kwh), "cap_saved_cost": self.cost(self.cap_saved_kwh)}


@dataclass
class FleetReport:
    url: str
    at: float
    since_s: float
    group_by: str
    groups: list[GroupRow]
    gpus: list[GpuIdle]
    waste: list[GpuIdle]
    emissions_g: dict[str, float]
    what_if: list[tuple[ZoneInfo, float]]
    idle_threshold: float
    prorated: bool
    step_s: float = 60.0               # the idle-time resolution (--step); the plot's finest step

    @property
    def energy_j(self) -> float:
        return sum(g.energy_j for g in self.groups)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prometheus": self.url, "at_unix": self.at, "since_s": self.since_s, "group_by": self.group_by,
            "energy_kwh": self.energy_j / J_PER_KWH, "emissions_g": dict(self.emissions_g),
            "emissions_prorated_by_energy": self.prorated,
            "groups": [{"group": g.key, "energy_kwh": g.energy_kwh, "emissions_g": dict(g.emissions_g),
                        "tokens": g.tokens, "j_per_token": g.j_per_token, "tokens_per_kwh": g.tokens_per_kwh}
                       for g in self.groups],
            "gpus": [g.as_dict() for g in self.gpus],
            "idle_kwh": sum(g.idle_kwh for g in self.gpus), "idle_gpu_hours": sum(g.idle_hours for g in self.gpus),
            "idle_threshold": self.idle_threshold,
            "waste": [g.as_dict() for g in self.waste],
            "what_if": [{"zone": z.key, "g_per_kwh": z.g_per_kwh, "emissions_g": g} for z, g in self.what_if],
        }


def _group_label(group_by: str) -> str:
    return "hostname" if group_by in ("host", "hostname") else group_by


def build_fleet_report(client: PrometheusClient, since_s: float, group_by: str = "host", at: float | None = None,
                       step_s: float = 60.0, idle_threshold: float = 0.25, price: Price | None = None,
                       cap_w: float | None = None, what_if: Sequence[ZoneInfo] = ()) -> FleetReport:
    at = time.time() if at is None else at
    rng = _prom_duration(since_s)
    label = _group_label(group_by)
    q = lambda expr: client.query(expr, at)   # noqa: E731

    gpu = q(f"increase(wattmeter_gpu_energy_joules_total[{rng}])")
    cpu = q(f"increase(wattmeter_cpu_energy_joules_total[{rng}])")
    ram = q(f"increase(wattmeter_ram_energy_joules_total[{rng}])")
    emissions = q(f"sum by (instance, scope) (increase(wattmeter_emissions_grams_total[{rng}]))")
    tokens = q(f'sum by (instance, model) (increase(wattmeter_tokens_total{{kind="generation"}}[{rng}]))')
    zones = q(f"last_over_time(wattmeter_grid_intensity_grams_per_kwh[{rng}])")
    idle = q(f"increase(wattmeter_gpu_idle_energy_joules_total[{rng}])")
    step = _prom_duration(step_s)
    idle_steps = q(f"sum_over_time((rate(wattmeter_gpu_idle_energy_joules_total[{_prom_duration(3 * step_s)}]) "
                   f"> bool 0)[{rng}:{step}])")

    # Energy per instance (for sharing out grams) and the rows that carry the grouping label.
    per_instance: dict[str, float] = {}
    for row in gpu + cpu + ram:
        inst = row["metric"].get("instance", "")
        per_instance[inst] = per_instance.get(inst, 0.0) + _value(row)
    grams: dict[str, dict[str, float]] = {}
    for row in emissions:
        m = row["metric"]
        grams.setdefault(m.get("instance", ""), {})[m.get("scope", "location")] = _value(row)
    energy_rows = gpu + cpu + ram
    if label in _PROCESS_KEYS:
        energy_rows = q(f"increase(wattmeter_process_gpu_energy_joules_total[{rng}])")
    groups: dict[str, GroupRow] = {}
    for row in energy_rows:
        m = row["metric"]
        key = m.get(label) or "(none)"
        g = groups.setdefault(key, GroupRow(key))
        e = _value(row)
        g.energy_j += e
        inst_e = per_instance.get(m.get("instance", ""), 0.0)
        for scope, total in grams.get(m.get("instance", ""), {}).items():
            g.emissions_g[scope] = g.emissions_g.get(scope, 0.0) + (total * e / inst_e if inst_e > 0 else 0.0)
    gpu_by_instance: dict[str, float] = {}
    for row in gpu:
        inst = row["metric"].get("instance", "")
        gpu_by_instance[inst] = gpu_by_instance.get(inst, 0.0) + _value(row)
    if label == "model":
        # Tokens carry the served model; GPU rows carry the GPU model. Token groups are their own rows.
        for row in tokens:
            m = row["metric"]
            g = groups.setdefault(f"tokens:{m.get('model', '?')}", GroupRow(f"tokens:{m.get('model', '?')}"))
            g.tokens += _value(row)
            g.gpu_energy_j += gpu_by_instance.get(m.get("instance", ""), 0.0)
    else:
        host_of = {r["metric"].get("instance", ""): r["metric"].get("hostname", "") for r in gpu}
        for row in tokens:
            inst = row["metric"].get("instance", "")
            key = host_of.get(inst, "(none)") if label == "hostname" else "(all)"
            g = groups.setdefault(key, GroupRow(key))
            g.tokens += _value(row)
            g.gpu_energy_j += gpu_by_instance.get(inst, 0.0)

    # Idle per GPU.
    zone_of = {r["metric"].get("instance", ""): r["metric"].get("zone", "") for r in zones}
    idle_s_of = {(r["metric"].get("instance", ""), r["metric"].get("gpu", "")): _value(r) * step_s for r in idle_steps}
    energy_of = {(r["metric"].get("instance", ""), r["metric"].get("gpu", "")): (r["metric"], _value(r)) for r in gpu}
    gpus = []
    for row in idle:
        m = row["metric"]
        inst, index = m.get("instance", ""), m.get("gpu", "")
        labels, e = energy_of.get((inst, index), (m, 0.0))
        loc = grams.get(inst, {}).get("location")
        inst_kwh = per_instance.get(inst, 0.0) / J_PER_KWH
        gpus.append(GpuIdle(
            hostname=m.get("hostname", ""), gpu=index, uuid=m.get("uuid", ""), model=labels.get("model", ""),
            energy_j=e, idle_j=_value(row), idle_s=min(since_s, idle_s_of.get((inst, index), 0.0)), period_s=since_s,
            g_per_kwh=loc / inst_kwh if loc is not None and inst_kwh > 0 else None,
            price=price or (table_price(zone_of[inst]) if zone_of.get(inst) else None),
            cap_w=cap_w))
    gpus.sort(key=lambda g: (g.hostname, g.gpu))
    waste = sorted((g for g in gpus if g.idle_share >= idle_threshold and g.idle_s > 0),
                   key=lambda g: (-g.idle_s, -g.idle_j))
    total_grams: dict[str, float] = {}
    for by_scope in grams.values():
        for scope, v in by_scope.items():
            total_grams[scope] = total_grams.get(scope, 0.0) + v
    rows = sorted(groups.values(), key=lambda g: -g.energy_j)
    fleet_kwh = sum(g.energy_j for g in rows if not g.key.startswith("tokens:")) / J_PER_KWH
    return FleetReport(client.url, at, since_s, group_by, rows, gpus, waste, total_grams,
                       [(z, fleet_kwh * z.g_per_kwh) for z in what_if], idle_threshold,
                       prorated=label != "hostname", step_s=step_s)


# -- power over time (report --plot) ----------------------------------------------------------
PLOT_POINTS = 720                      # at most this many steps per series: a week at 14 min


@dataclass(frozen=True)
class PowerSeries:
    """One GPU's mean power per step over the report's period, from its energy counter."""

    hostname: str
    gpu: str
    model: str
    t_unix: tuple[float, ...]          # end of each step
    power_w: tuple[float, ...]

    @property
    def label(self) -> str:
        return f"{self.hostname}/{self.gpu}"


def fleet_power(client: PrometheusClient, since_s: float, at: float, step_s: float = 60.0,
                points: int = PLOT_POINTS) -> tuple[float, list[PowerSeries]]:
    """(the plot step, GPU power per host and GPU over ``[at - since_s, at]``).

    Power is ``rate()`` of the energy counter, not the power gauge: a counter's rate is the mean
    over the step, where a gauge read at scrape time aliases. The rate window is the plot step,
    but at least three ``--step`` (which is at least the scrape interval), so every point has two
    scrapes to difference; steps are as fine as ``--step`` and never more than ``points``."""
    plot_step = max(step_s, since_s / points)
    window = _prom_duration(max(plot_step, 3.0 * step_s))
    rows = client.query_range(f"rate(wattmeter_gpu_energy_joules_total[{window}])", at - since_s, at, plot_step)
    out = []
    for row in rows:
        m = row.get("metric") or {}
        pairs = []
        for point in row.get("values") or ():
            try:
                pairs.append((float(point[0]), float(point[1])))
            except (IndexError, TypeError, ValueError):
                continue     # a malformed point is one gap in a line, not a failed report
        if pairs:
            out.append(PowerSeries(m.get("hostname", m.get("instance", "?")), m.get("gpu", "?"), m.get("model", ""),
                                   tuple(t for t, _ in pairs), tuple(w for _, w in pairs)))
    out.sort(key=lambda s: (s.hostname, _gpu_order(s.gpu)))
    return plot_step, out


def _gpu_order(gpu: str) -> tuple[int, str]:
    return (int(gpu), "") if gpu.isdigit() else (1 << 30, gpu)


# -- rendering ------------------------------------------------------------------------------
def _f(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _tables(r: FleetReport) -> list[tuple[str, list[str], list[list[str]]]]:
    scopes = sorted(r.emissions_g) or ["location"]
    groups = [[g.key, _f(g.energy_kwh), *[_f(g.emissions_g.get(s), 2) for s in scopes], _f(g.j_per_token, 3),
               _f(g.tokens_per_kwh, 0)] for g in r.groups]
    cur = next((g.price.currency for g in r.gpus if g.price), "")
    idle = [[g.hostname, g.gpu, g.model, _f(g.energy_j / J_PER_KWH), _f(g.idle_kwh), _f(g.idle_hours),
             f"{g.idle_share:.1%}", _f(g.cost(g.idle_kwh), 4)] for g in r.gpus]
    waste = [[str(i), g.hostname, g.gpu, _f(g.idle_hours), f"{g.idle_share:.1%}", _f(g.idle_kwh),
              _f(g.grams(g.idle_kwh), 2), _f(g.cost(g.idle_kwh), 4), _f(g.cap_saved_kwh), _f(g.grams(g.cap_saved_kwh), 2)]
             for i, g in enumerate(r.waste, 1)]
    what_if = [[z.key, z.name, f"{z.g_per_kwh:g}", _f(g, 2)] for z, g in r.what_if]
    out = [(f"energy by {r.group_by}", [r.group_by, "kWh", *[f"g CO2e {s}" for s in scopes], "J/token", "tokens/kWh"],
            groups),
           ("idle by GPU", ["host", "gpu", "model", "kWh", "idle kWh", "idle h", "idle %", f"idle cost {cur}".strip()],
            idle),
           (f"waste: GPUs idle >= {r.idle_threshold:.0%} of the period, longest first",
            ["rank", "host", "gpu", "idle h", "idle %", "release saves kWh", "g CO2e", f"cost {cur}".strip(),
             "cap saves kWh", "cap g CO2e"], waste)]
    if what_if:
        out.append(("what-if zones (IT kWh at the zone's table intensity)", ["zone", "name", "g/kWh", "g CO2e"],
                    what_if))
    return out


def _header(r: FleetReport) -> str:
    text = (f"fleet report from {r.url}: {r.since_s / 3600:g} h to {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(r.at))}; "
            f"{r.energy_j / J_PER_KWH:,.4f} kWh")
    if r.emissions_g:
        text += "; " + ", ".join(f"{v:,.2f} g CO2e {k}" for k, v in sorted(r.emissions_g.items()))
    return text


def render_fleet(r: FleetReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(r.as_dict(), indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        for title, headers, rows in _tables(r):
            w.writerow(["section", *headers])
            for row in rows:
                w.writerow([title, *row])
        return buf.getvalue()
    if fmt not in ("table", "markdown"):
        raise UsageError(f"--format {fmt} is not available with --prometheus; use table, csv, json or markdown")
    lines = [_header(r), ""]
    for title, headers, rows in _tables(r):
        lines.append(f"## {title}" if fmt == "markdown" else f"{title}:")
        if fmt == "markdown":
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
            lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
            lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
            if not rows:
                lines.append("(none)")
        lines.append("")
    if r.prorated and r.emissions_g:
        lines.append(f"note: CO2e by {r.group_by} shares each host's grams out by energy")
    return "\n".join(lines).rstrip("\n") + "\n"
