#!/usr/bin/env python3
"""Generate the Grafana dashboards and copy shared files into the Helm chart.

    python deploy/sync.py          # rewrite the generated files
    python deploy/sync.py --check  # exit 1 if any generated file is stale

Outputs:
  deploy/grafana/dashboards/wattmeter-fleet.json
  deploy/grafana/dashboards/wattmeter-inference.json
  deploy/helm/wattmeter/dashboards/*.json   (same bytes, for the chart's ConfigMap)
  deploy/helm/wattmeter/files/rules.yml     (copy of deploy/prometheus/rules.yml)
  deploy/kubernetes/prometheusrule.yaml     (the same rules as a Prometheus Operator PrometheusRule)
  deploy/helm/wattmeter/values.schema.json  (deploy/chart_schema.py; serve's flags from its parser)

The dashboards are code so that every panel uses the same datasource variable
(${DS_PROMETHEUS}), units and conventions, and so that tests/test_deploy.py can
check each PromQL expression against the metric names wattmeter exports.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

H = 'hostname=~"$hostname"'
EXPORTER_UP = 'up{job=~".*wattmeter.*"}'


class Layout:
    """Places panels on Grafana's 24-column grid, left to right, top to bottom."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({
            "type": "row", "id": self._id(), "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": [],
        })
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def add(self, panel: dict, w: int, h: int) -> None:
        _say_level(panel)
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


JOB_LEVEL = ("Level: job. Reads wattmeter_job_* series, which only `wattmeter run` exports "
             "(pushed or on its job port); they never repeat the node's GPU, CPU or RAM.")
HOST_LEVEL = ("Level: node. Reads the `wattmeter serve` daemon's host-level series; batch runs never "
              "export these names, so sums count each device once.")


def _say_level(panel: dict) -> None:
    """Every panel says which level it reads (issue 9: series that add up)."""
    exprs = " ".join(t.get("expr", "") for t in panel.get("targets", []))
    if "wattmeter_" not in exprs:
        return
    note = JOB_LEVEL if "wattmeter_job_" in exprs else HOST_LEVEL
    panel["description"] = (panel.get("description", "") + " " + note).strip()


def target(expr: str, legend: str = "__auto", *, ref: str = "A", instant: bool = False,
           interval: str | None = None, fmt: str = "time_series") -> dict:
    t = {
        "datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend,
        "range": not instant, "instant": instant, "format": fmt, "editorMode": "code",
    }
    if interval:
        t["interval"] = interval
    return t


def targets(*specs: tuple, **kw) -> list[dict]:
    return [target(expr, legend, ref=chr(ord("A") + i), **kw) for i, (expr, legend) in enumerate(specs)]


def thresholds(*steps: tuple) -> dict:
    return {"mode": "absolute",
            "steps": [{"color": c, "value": v} for v, c in steps]}


def timeseries(title: str, tgts: list[dict], unit: str, *, description: str = "",
               stack: bool = False, bars: bool = False, decimals: int | None = None,
               threshold: float | None = None, min_zero: bool = True) -> dict:
    custom = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 60 if bars else (25 if stack else 10),
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "axisSoftMin": 0 if min_zero else None,
        "thresholdsStyle": {"mode": "line+area" if threshold is not None else "off"},
    }
    if not min_zero:
        del custom["axisSoftMin"]
    defaults: dict = {"unit": unit, "custom": custom,
                      "color": {"mode": "palette-classic"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    if threshold is not None:
        defaults["thresholds"] = thresholds((None, "transparent"), (threshold, "red"))
    else:
        defaults["thresholds"] = thresholds((None, "green"))
    return {
        "type": "timeseries", "title": title, "description": description,
        "datasource": DS, "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                       "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, tgts: list[dict], unit: str, *, description: str = "",
         decimals: int | None = None, steps: tuple = ((None, "green"),),
         color_mode: str = "value") -> dict:
    defaults: dict = {"unit": unit, "thresholds": thresholds(*steps),
                      "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat", "title": title, "description": description,
        "datasource": DS, "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": color_mode, "graphMode": "area", "justifyMode": "auto",
            "orientation": "auto", "textMode": "auto", "wideLayout": True,
            "showPercentChange": False,
        },
    }


def bargauge(title: str, tgts: list[dict], unit: str, *, description: str = "",
             decimals: int | None = None) -> dict:
    defaults: dict = {"unit": unit, "min": 0, "thresholds": thresholds((None, "green")),
                      "color": {"mode": "continuous-GrYlRd"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "bargauge", "title": title, "description": description,
        "datasource": DS, "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal", "displayMode": "gradient",
            "showUnfilled": True, "valueMode": "color", "namePlacement": "auto",
            "sizing": "auto", "minVizHeight": 16, "maxVizHeight": 300,
        },
    }


def table(title: str, tgts: list[dict], *, description: str = "",
          exclude: tuple = ("Time", "Value", "__name__", "job")) -> dict:
    return {
        "type": "table", "title": title, "description": description,
        "datasource": DS, "targets": tgts,
        "fieldConfig": {"defaults": {"custom": {"align": "auto", "filterable": True}},
                        "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm",
                    "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
        "transformations": [
            {"id": "organize", "options": {"excludeByName": {k: True for k in exclude}}},
        ],
    }


def state_timeline(title: str, tgts: list[dict], *, description: str = "") -> dict:
    return {
        "type": "state-timeline", "title": title, "description": description,
        "datasource": DS, "targets": tgts,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": thresholds((None, "red"), (1, "green")),
                "mappings": [{"type": "value", "options": {
                    "0": {"text": "down", "color": "red", "index": 0},
                    "1": {"text": "up", "color": "green", "index": 1},
                }}],
                "custom": {"fillOpacity": 80, "lineWidth": 0},
            },
            "overrides": [],
        },
        "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8,
                    "alignValue": "left",
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
                    "tooltip": {"mode": "single", "sort": "none"}},
    }


def datasource_var() -> dict:
    return {
        "type": "datasource", "name": "DS_PROMETHEUS", "label": "Data source",
        "query": "prometheus", "regex": "", "hide": 0, "refresh": 1,
        "current": {}, "options": [], "includeAll": False, "multi": False,
    }


def query_var(name: str, label: str, query: str) -> dict:
    return {
        "type": "query", "name": name, "label": label, "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery",
                  "qryType": 1},
        "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "hide": 0, "regex": "", "skipUrlSync": False,
    }


def dashboard(uid: str, title: str, description: str, variables: list[dict],
              layout: Layout, tags: list[str]) -> dict:
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "uid": uid,
        "title": title,
        "description": description,
        "tags": tags,
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "1m",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "links": [{
            "type": "dashboards", "tags": ["wattmeter"], "asDropdown": True,
            "title": "wattmeter", "includeVars": True, "keepTime": True,
            "icon": "external link", "targetBlank": False, "tooltip": "", "url": "",
        }],
        "templating": {"list": [datasource_var(), *variables]},
        "panels": layout.panels,
    }


# ---------------------------------------------------------------------------
# Fleet dashboard
# ---------------------------------------------------------------------------

def fleet() -> dict:
    L = Layout()
    gpu = f"wattmeter_gpu_energy_joules_total{{{H}}}"
    idle = f"wattmeter_gpu_idle_energy_joules_total{{{H}}}"
    unattributed = f"wattmeter_gpu_unattributed_energy_joules_total{{{H}}}"
    proc = f"wattmeter_process_gpu_energy_joules_total{{{H}}}"
    cpu = f"wattmeter_cpu_energy_joules_total{{{H}}}"
    ram = f"wattmeter_ram_energy_joules_total{{{H}}}"
    ri = "[$__rate_interval]"

    L.row("Overview")
    L.add(stat("GPU power", targets((f"sum(rate({gpu}{ri}))", "GPU")), "watt",
               description="Power of the selected nodes' GPUs, from the NVML energy counters.",
               decimals=0), 4, 4)
    L.add(stat("GPU energy (range)", targets(
        (f"sum(increase({gpu}[$__range])) / 3.6e6", "GPU"), instant=True), "kwatth",
        description="GPU energy over the dashboard's time range.", decimals=2), 4, 4)
    L.add(stat("CPU + RAM energy (range)", targets(
        (f"((sum(increase({cpu}[$__range])) or vector(0)) + (sum(increase({ram}[$__range])) or vector(0))) / 3.6e6",
         "CPU+RAM"), instant=True), "kwatth",
        description="RAPL counters where readable, otherwise modelled (see source label).",
        decimals=2), 4, 4)
    L.add(stat("Idle share of GPU energy (range)", targets(
        (f"sum(increase({idle}[$__range])) / sum(increase({gpu}[$__range]))", "idle"),
        instant=True), "percentunit",
        description="Energy the GPUs drew while no process used them.",
        decimals=1, steps=((None, "green"), (0.2, "orange"), (0.5, "red"))), 4, 4)
    L.add(stat("Emissions (range, location-based)", targets(
        ('sum(increase(wattmeter_emissions_grams_total{scope="location"}[$__range])) / 1000',
         "kg CO2e"), instant=True), "masskg",
        description="kWh x PUE x grid intensity of the configured zone.", decimals=2), 4, 4)
    L.add(stat("Exporters up", targets(
        (f"sum({EXPORTER_UP}) / count({EXPORTER_UP})", "up")), "percentunit",
        decimals=0, steps=((None, "red"), (0.99, "orange"), (1, "green")),
        color_mode="background"), 4, 4)

    L.row("Power")
    L.add(timeseries("GPU power per node", targets(
        (f"sum by (hostname) (rate({gpu}{ri}))", "{{hostname}}")), "watt", stack=True,
        description="rate(wattmeter_gpu_energy_joules_total) summed per node. Stacked: the top line is the fleet total."),
        12, 9)
    L.add(timeseries("GPU power per GPU", targets(
        (f"sum by (hostname, gpu, model) (rate({gpu}{ri}))", "{{hostname}} GPU {{gpu}} ({{model}})")),
        "watt", description="From the energy counter (exact over the interval)."), 12, 9)
    L.add(timeseries("GPU power sensor (NVML gauge)", targets(
        (f"wattmeter_gpu_power_watts{{{H}}}", "{{hostname}} GPU {{gpu}}")), "watt",
        description="NVML's power reading at scrape time: a 1 s trailing average on Ampere and newer, "
                    "instantaneous on older GPUs. Prefer the counter-derived panels for energy."),
        12, 8)
    L.add(timeseries("CPU and RAM power per node", targets(
        (f"sum by (hostname) (rate({cpu}{ri}))", "{{hostname}} CPU"),
        (f"sum by (hostname) (rate({ram}{ri}))", "{{hostname}} RAM")), "watt",
        description="CPU from RAPL package (or psys) counters, else a utilisation model; RAM from the RAPL "
                    "dram domain, else modelled. See the source label."),
        12, 8)

    L.row("Energy")
    L.add(timeseries("GPU energy per hour", [target(
        f"sum by (hostname) (increase({gpu}[1h])) / 3.6e6", "{{hostname}}", interval="1h")],
        "kwatth", stack=True, bars=True, decimals=2,
        description="kWh per node per hour (increase over 1h / 3.6e6)."), 12, 9)
    L.add(bargauge("GPU energy per node (range)", targets(
        (f"sort_desc(sum by (hostname) (increase({gpu}[$__range])) / 3.6e6)", "{{hostname}}"),
        instant=True), "kwatth", decimals=2), 12, 9)

    L.row("Idle waste and attribution")
    L.add(timeseries("Where GPU energy goes", targets(
        (f"sum(rate({proc}{ri}))", "attributed to processes"),
        (f"sum(rate({idle}{ri}))", "idle"),
        (f"sum(rate({unattributed}{ri}))", "unattributed")), "watt", stack=True,
        description="Attributed + idle + unattributed = device total (conservation). "
                    "Unattributed is work wattmeter could not map to a process."), 12, 9)
    L.add(timeseries("Idle power per GPU", targets(
        (f"sum by (hostname, gpu) (rate({idle}{ri}))", "{{hostname}} GPU {{gpu}}")), "watt",
        threshold=100,
        description="Power drawn while the GPU had no work. The red band is the WattmeterGPUIdleWasteHigh threshold."),
        12, 9)
    L.add(bargauge("Top namespaces by GPU energy (range)", targets(
        (f'topk(10, sum by (namespace) (increase(wattmeter_process_gpu_energy_joules_total{{{H},namespace!=""}}[$__range]))) / 3.6e6',
         "{{namespace}}"), instant=True), "kwatth", decimals=3), 12, 9)
    L.add(bargauge("Top jobs by energy (range)", targets(
        ("topk(10, sum by (job, component) (max_over_time(wattmeter_job_energy_joules_total[$__range]))) / 3.6e6",
         "{{job}} {{component}}"), instant=True), "kwatth", decimals=3,
        description="Batch jobs (wattmeter run, usually via the Pushgateway). Each run is its own series "
                    "(run_id), and a finished run keeps its final totals in the gateway, so this sums every "
                    "run of each job name seen in the range."), 12, 9)
    L.add(timeseries("Running jobs power", targets(
        ("sum by (job, component) (wattmeter_job_power_watts)", "{{job}} {{component}}")), "watt",
        description="Power of the jobs running now. A run's final push drops this gauge, so a finished "
                    "run leaves the panel at the next scrape. A run's GPU power is the whole GPU's: "
                    "do not add it to the node panels."), 24, 8)

    L.row("Carbon and water")
    L.add(timeseries("Emissions rate", targets(
        ("sum by (scope) (rate(wattmeter_emissions_grams_total[$__rate_interval])) * 3600", "{{scope}}")),
        "massg", description="g CO2e per hour. location: grid average of the zone; market: after renewable "
                             "purchases; embodied: amortised manufacturing emissions."), 8, 8)
    L.add(timeseries("Grid carbon intensity", targets(
        ("avg by (zone, source) (wattmeter_grid_intensity_grams_per_kwh)", "{{zone}} ({{source}})")),
        "suffix: gCO2e/kWh", min_zero=True), 8, 8)
    L.add(stat("Emissions by scope (range)", targets(
        ("sum by (scope) (increase(wattmeter_emissions_grams_total[$__range])) / 1000", "{{scope}}"),
        instant=True), "masskg", decimals=2), 4, 8)
    L.add(stat("Water (range)", targets(
        ("sum(increase(wattmeter_water_litres_total[$__range]))", "litres"), instant=True), "litre",
        decimals=1, description="kWh x water usage effectiveness (WUE)."), 4, 8)

    L.row("Sensor health")
    L.add(state_timeline("Sensors", targets(
        ('wattmeter_up{device=""}', "{{instance}} {{sensor}}"))), 12, 8)
    L.add(state_timeline("Devices", targets(
        ('wattmeter_up{device!=""}', "{{instance}} {{sensor}} {{device}}")),
        description="One series per metered device: a lost GPU goes down here and stays down, "
                    "without flapping its sensor's series."), 12, 8)
    L.add(timeseries("Sensor errors per minute", targets(
        ("sum by (instance, sensor, error) (rate(wattmeter_sensor_errors_total[$__rate_interval])) * 60",
         "{{instance}} {{sensor}} {{error}}")), "short"), 12, 8)
    L.add(timeseries("Series dropped by the cardinality cap", targets(
        ("sum by (instance, metric) (increase(wattmeter_series_dropped_total[$__rate_interval]))",
         "{{instance}} {{metric}}")), "short",
        description="Non-zero means per-job/per-pod label values were folded away; totals stay correct."),
        12, 7)
    L.add(table("wattmeter versions", targets(
        ("wattmeter_build_info", ""), instant=True, fmt="table"),
        description="simulated=true means fake GPUs (--fake-gpus / --fake-nvml)."), 12, 7)

    return dashboard(
        "wattmeter-fleet", "wattmeter / Fleet energy",
        "GPU, CPU and RAM power and energy per node and GPU, idle waste, attribution, emissions and sensor health.",
        [query_var("hostname", "Node", "label_values(wattmeter_gpu_energy_joules_total, hostname)")],
        L, ["wattmeter", "energy", "gpu"])


# ---------------------------------------------------------------------------
# Inference dashboard
# ---------------------------------------------------------------------------

def inference() -> dict:
    L = Layout()
    M = 'model=~"$model"'
    NS = 'namespace=~"$namespace"'
    gen = f'wattmeter_tokens_total{{kind="generation",{M}}}'
    ri = "[$__rate_interval]"
    jpt = (f"sum by (model) (max by (instance, model) (wattmeter_energy_per_token_joules{{{M}}})"
           f" * on (instance, model) sum by (instance, model) (rate({gen}{ri})))"
           f" / (sum by (model) (rate({gen}{ri})) > 0)")
    proc = f'wattmeter_process_gpu_energy_joules_total{{{NS},pod!=""}}'

    L.row("Efficiency")
    L.add(stat("Energy per generated token", targets((jpt, "{{model}}")), "joule", decimals=3,
               description="GPU joules per generated token, per model: each wattmeter's J/token weighted by "
                           "its token rate (sum of energy / sum of tokens). ML.ENERGY reference: "
                           "Llama-3.1-8B on 1xH100 0.07-0.46 J/token."), 6, 5)
    L.add(stat("Wh per 1,000 generated tokens", targets((f"({jpt}) * 1000 / 3600", "{{model}}")),
               "watth", decimals=3), 6, 5)
    L.add(stat("Generated tokens/s", targets(
        (f"sum by (model) (rate({gen}{ri}))", "{{model}}")), "suffix: tok/s", decimals=0), 6, 5)
    L.add(stat("Prompt tokens/s", targets(
        (f'sum by (model) (rate(wattmeter_tokens_total{{kind="prompt",{M}}}{ri}))', "{{model}}")),
        "suffix: tok/s", decimals=0), 6, 5)
    L.add(timeseries("Energy per generated token", targets((jpt, "{{model}}")), "joule",
                     decimals=3), 12, 9)
    L.add(timeseries("Tokens per second", targets(
        (f"sum by (model, kind) (rate(wattmeter_tokens_total{{{M}}}{ri}))", "{{model}} {{kind}}")),
        "suffix: tok/s"), 12, 9)
    L.add(timeseries("Energy per token reported by each instance", targets(
        (f"wattmeter_energy_per_token_joules{{{M}}}", "{{model}} @ {{instance}}")), "joule",
        decimals=3, description="wattmeter_energy_per_token_joules as computed by each wattmeter "
                                "(sidecar) over its own window."), 24, 8)

    L.row("Power and energy per model")
    # J/token x tokens/s = W spent generating, per model. Built from the
    # sidecars' token series only, so it works whether or not the sidecars'
    # device series are kept (see deploy/kubernetes/sidecar-vllm.yaml).
    per_instance = (f"max by (instance, model) (wattmeter_energy_per_token_joules{{{M}}})"
                    f" * on (instance, model) sum by (instance, model) (rate({gen}{ri}))")
    L.add(timeseries("GPU power serving each model", targets(
        (f"sum by (model) ({per_instance})", "{{model}}")), "watt", stack=True,
        description="Energy per generated token x generated tokens/s, summed over every instance of the model."),
        12, 9)
    L.add(bargauge("GPU energy per model (range)", targets(
        (f"sort_desc(sum by (model) (max by (instance, model) (wattmeter_energy_per_token_joules{{{M}}})"
         f" * on (instance, model) sum by (instance, model) (increase({gen}[$__range]))) / 3600)", "{{model}}"),
        instant=True), "watth", decimals=1,
        description="Generated tokens over the range x each instance's current J/token (an approximation "
                    "when J/token changed during the range)."), 12, 9)

    L.row("Per-pod GPU energy")
    L.add(timeseries("GPU power per pod", targets(
        (f"sum by (namespace, pod) (rate({proc}{ri}))", "{{namespace}}/{{pod}}")), "watt", stack=True,
        description="Device energy split by SM share among the processes of each pod (never the full device "
                    "power copied onto every tenant)."), 12, 9)
    L.add(bargauge("GPU energy per pod (range)", targets(
        (f"topk(20, sum by (namespace, pod) (increase({proc}[$__range]))) / 3600", "{{namespace}}/{{pod}}"),
        instant=True), "watth", decimals=1), 12, 9)
    L.add(timeseries("MIG instances (estimated)", targets(
        (f'sum by (hostname, gpu, mig_instance) (rate(wattmeter_process_gpu_energy_joules_total{{{NS},mig_instance!=""}}{ri}))',
         "{{hostname}} GPU {{gpu}} MIG {{mig_instance}}")), "watt",
        description="NVML has no per-MIG-instance power: the parent GPU's energy is apportioned and labelled "
                    "estimated=\"true\"."), 12, 8)
    L.add(stat("Estimated share of attributed energy", targets(
        (f'(sum(rate(wattmeter_process_gpu_energy_joules_total{{{NS},estimated="true"}}[$__range])) or vector(0)) / '
         f"sum(rate(wattmeter_process_gpu_energy_joules_total{{{NS}}}[$__range]))", "estimated"),
        instant=True), "percentunit", decimals=1), 12, 8)

    return dashboard(
        "wattmeter-inference", "wattmeter / Inference energy",
        "Joules per token per model, token throughput, power of the serving GPUs and per-pod GPU energy.",
        [query_var("model", "Model", "label_values(wattmeter_tokens_total, model)"),
         query_var("namespace", "Namespace", "label_values(wattmeter_process_gpu_energy_joules_total, namespace)")],
        L, ["wattmeter", "energy", "inference", "llm"])


# ---------------------------------------------------------------------------

def render(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def outputs() -> dict[Path, str]:
    out: dict[Path, str] = {}
    for name, build in (("wattmeter-fleet.json", fleet), ("wattmeter-inference.json", inference)):
        text = render(build())
        out[DEPLOY / "grafana" / "dashboards" / name] = text
        out[DEPLOY / "helm" / "wattmeter" / "dashboards" / name] = text
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    out[DEPLOY / "helm" / "wattmeter" / "files" / "rules.yml"] = rules
    out[DEPLOY / "kubernetes" / "prometheusrule.yaml"] = prometheus_rule(rules)
    sys.path.insert(0, str(DEPLOY))
    import chart_schema

    flags = chart_schema.serve_flags()
    if flags is None:     # wattmeter not installed here: the checked-in schema is kept
        print("note: wattmeter is not importable; values.schema.json not regenerated", file=sys.stderr)
    else:
        out[DEPLOY / "helm" / "wattmeter" / "values.schema.json"] = render(chart_schema.schema(flags))
    return out


def prometheus_rule(rules: str) -> str:
    """Wrap rules.yml (a top-level `groups:` document) in a PrometheusRule."""
    body = "".join(("  " + line if line.strip() else line)
                   for line in rules.splitlines(keepends=True))
    return (
        "# GENERATED by deploy/sync.py from deploy/prometheus/rules.yml: edit that file instead.\n"
        "# Prometheus Operator picks this up when its ruleSelector matches these labels\n"
        "# (kube-prometheus-stack: add `release: <helm release name>`).\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: wattmeter\n"
        "  namespace: wattmeter\n"
        "  labels:\n"
        "    app.kubernetes.io/name: wattmeter\n"
        "spec:\n"
        + body
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        verb = "stale" if args.check else "wrote"
        print(f"{verb}: {path.relative_to(DEPLOY.parent)}")
    if args.check and stale:
        print("run: python deploy/sync.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
