"""One settings model, one composition root: typed settings per group built once from the one
engine, wiring only in wattmeter.compose, and exporters that know neither argparse nor the
settings."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from wattmeter import compose
from wattmeter.config import Settings, flags_of
from wattmeter.errors import ConfigError, UsageError
from wattmeter.settings import ExportSettings, RecordSettings

ROOT = Path(__file__).resolve().parents[1]
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_") and k != "CUDA_VISIBLE_DEVICES"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved against the package layout)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = "wattmeter.exporters" if path.parent.name == "exporters" else "wattmeter.commands" \
        if path.parent.name == "commands" else "wattmeter"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "exporters").glob("*.py")), ids=lambda p: p.name)
def test_exporters_import_neither_argparse_nor_the_settings(path):
    bad = {m for m in _imports(path) if m == "argparse" or m.startswith(("wattmeter.config", "wattmeter.settings",
                                                                          "wattmeter.commands"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def _calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}


@pytest.mark.parametrize("name", ["commands/run.py", "commands/serve.py", "jobrun.py", "meter.py"])
def test_only_the_composition_root_builds_sinks_meters_and_carbon(name):
    wiring = {"RecordSink", "CarbonAccountant", "start_job_exporter", "discover", "discover_or_fail", "build_source",
              "source_for"}
    assert not (_calls(ROOT / "agent" / name) & wiring), name
    assert wiring - {"discover_or_fail", "source_for"} <= _calls(ROOT / "agent" / "compose.py")


def test_record_settings_resolve_once_with_precedence_and_checks(tmp_path):
    settings = Settings(env={"WATTMETER_RECORDS": str(tmp_path / "env.jsonl"), "WATTMETER_KILL_GRACE": "3"},
                        file_config={"csv": str(tmp_path / "f.csv"), "labels": {"team": "nlp"}})
    got = RecordSettings.resolve(settings, {"job": "train", "records": None, "checkpoint_interval": "5"},
                                 default_job="python3")
    assert got == RecordSettings(records=str(tmp_path / "env.jsonl"), csv=str(tmp_path / "f.csv"), job="train",
                                 labels={"team": "nlp"}, checkpoint_interval_s=5.0, kill_grace_s=3.0)
    assert settings.origins["records"] == "env WATTMETER_RECORDS" and settings.origins["job"] == "flag --job"
    with pytest.raises(ConfigError) as err:
        RecordSettings.resolve(Settings(env={}), {"kill_grace": "-1"})
    assert str(err.value) == "--kill-grace '-1': must be > 0 (e.g. 0.1)"


def test_export_settings_check_port_gateway_and_address_before_anything_starts():
    empty = ExportSettings.resolve(Settings(env={}), {})
    assert not empty.wanted and compose.job_exporter(empty, None, None) is None   # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        ExportSettings.resolve(Settings(env={"WATTMETER_METRICS_PORT": "70000"}), {})
    assert str(err.value) == "WATTMETER_METRICS_PORT '70000': expected a port number 0-65535 (0 picks a free port)"
    with pytest.raises(UsageError, match=r"^--pushgateway 'ftp://gw:9091': scheme 'ftp' is not supported"):
        ExportSettings.resolve(Settings(env={}), {"pushgateway": "ftp://gw:9091"})
    # port 0 (any free port) is as good in a config file as on the command line
    ok = ExportSettings.resolve(Settings(env={}, file_config={"metrics_port": 0}), {})
    assert ok.address is not None and ok.address.port == 0 and ok.push_interval_s == 15.0


def test_the_job_exporter_the_root_builds_serves_the_jobs_series():
    from scripted import ScriptedSensor, constant

    from wattmeter.clock import VirtualClock
    from wattmeter.meter import Meter

    clock = VirtualClock(start=0.0)
    meter = Meter([ScriptedSensor(*constant(100.0))], clock=clock)
    for _ in range(5):
        meter.poll()
        clock.advance(0.1)
    export = ExportSettings.resolve(Settings(env={}), {"metrics_port": "0"})
    ident = compose.run_identity("train", "python3", {"team": "nlp"}, env={"RANK": "3"})
    assert ident.context == {"rank": "3"} and len(ident.run_id) == 12
    exporter = compose.job_exporter(export, meter, ident)
    assert exporter is not None and exporter.server is not None
    try:
        assert exporter.server.url.startswith("http://127.0.0.1:")
        assert exporter.notes == [f"serving the job's metrics at {exporter.server.url}/metrics"]
        body = urllib.request.urlopen(exporter.server.url + "/metrics", timeout=10).read().decode()
        assert 'wattmeter_job_energy_joules_total{job="train",component="gpu",hostname=' in body
    finally:
        exporter.close()


def test_flags_of_maps_every_key_to_its_flag():
    import argparse

    ns = argparse.Namespace(label=["team=a"], records="r.jsonl", metrics_port="9", unrelated=1)
    flags = flags_of(ns)
    assert flags["labels"] == ["team=a"] and flags["records"] == "r.jsonl" and flags["metrics_port"] == "9"
    assert flags["zone"] is None and "unrelated" not in flags


def test_run_refuses_a_bad_export_setting_before_the_child_runs(tmp_path):
    marker = tmp_path / "ran"
    proc = subprocess.run([sys.executable, "-m", "wattmeter", "run", "--records", str(tmp_path / "r.jsonl"),
                           "--pushgateway", "ftp://gw:9091", "--", sys.executable, "-c",
                           f"open({str(marker)!r}, 'w')"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=CLEAN)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("wattmeter: error: --pushgateway 'ftp://gw:9091': scheme 'ftp' is not supported")
    assert not marker.exists() and not (tmp_path / "r.jsonl").exists()


def test_run_writes_the_record_through_the_root(tmp_path):
    rec = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, "-m", "wattmeter", "run", "--fake-gpus", "1", "--records", str(rec),
                           "--label", "team=nlp", "--job", "j", "--zone", "FR", "--quiet", "--", sys.executable,
                           "-c", "pass"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**CLEAN, "RANK": "0"})
    assert proc.returncode == 0, proc.stderr
    record = json.loads(rec.read_text().splitlines()[-1])
    assert (record["job"], record["labels"], record["context"]) == ("j", {"team": "nlp"}, {"rank": "0"})
    assert record["carbon"]["zone"] == "FR" and record["status"] == "completed"
