"""Real Prometheus, Pushgateway and `wattmeter serve` processes for end-to-end tests.

Each server runs on 127.0.0.1 on a free port with its own temp directory; helpers poll with
deadlines (never fixed sleeps) so the tests hold on a loaded 2-core CI machine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

PROMETHEUS_NAMES = ("prometheus",)
PUSHGATEWAY_NAMES = ("prometheus-pushgateway", "pushgateway")
START_TIMEOUT_S = 60.0


def find_binary(names: Sequence[str]) -> str | None:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if path:
            return path
    return None


def require_binary(names: Sequence[str], package: str) -> str:
    path = find_binary(names)
    if path is None:
        pytest.skip(f"{names[0]} binary not found; install Debian's {package} package (the .ci/run path does)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, ValueError, KeyError, IndexError) as exc:   # not up yet
            last_exc, value = exc, None
        if value:
            return value
        time.sleep(interval_s)
    last = f" (last: {last_exc})" if last_exc else ""
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{last}")


class _Process:
    """A child process whose stderr is collected on a thread (so the pipe never fills)."""

    def __init__(self, argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self.proc = subprocess.Popen(self.argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self._reader.join(5.0)
        return self.proc.returncode


class Prometheus(_Process):
    def __init__(self, binary: str, workdir: Path, scrape_configs: list[dict]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                  "scrape_configs": scrape_configs}
        (workdir / "prometheus.yml").write_text(json.dumps(config))   # YAML is a superset of JSON
        super().__init__([binary, f"--config.file={workdir / 'prometheus.yml'}",
                          f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                          "--log.level=warn"], workdir)
        wait_until(lambda: http_get(f"{self.url}/-/ready")[0] == 200 or self._died(), START_TIMEOUT_S,
                   "Prometheus to be ready")
        self._died()

    def _died(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.output[-2000:]}")
        return False

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        status, body = http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {status} {body[:500]!r}")
        return data["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        if len(result) != 1:
            raise AssertionError(f"query {expr!r} returned {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def targets_up(self) -> bool:
        _, body = http_get(f"{self.url}/api/v1/targets")
        active = json.loads(body)["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)


class Pushgateway(_Process):
    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__([binary, f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], workdir)
        wait_until(lambda: http_get(f"{self.url}/-/ready")[0] == 200, START_TIMEOUT_S, "Pushgateway to be ready")

    def groups(self) -> list[dict]:
        _, body = http_get(f"{self.url}/api/v1/metrics")
        return json.loads(body)["data"]


_SERVING = re.compile(r"wattmeter: serving (https?://[^\s]+)/metrics")


class WattmeterServe(_Process):
    """``python -m wattmeter serve ... --listen 127.0.0.1:0``; the port is read from its stderr."""

    def __init__(self, args: Sequence[str], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        super().__init__([sys.executable, "-m", "wattmeter", "serve", "--listen", "127.0.0.1:0", *args], workdir, env)

        def serving() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"wattmeter serve exited with {self.proc.returncode}: {self.output}")
            m = _SERVING.search(self.output)
            return m.group(1) if m else None

        self.url = wait_until(serving, START_TIMEOUT_S, "wattmeter serve to listen")
        self.port = int(self.url.rsplit(":", 1)[1])


# A fleet host for the fleet-report tests (`serve --fake-nvml`): one busy H100 at 300 W with one
# process, one idle H100 at 90 W (its idle energy is known exactly).
FLEET_NODE_A = """
description = "node-a: one busy H100 at 300 W and one idle H100 at 90 W"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
[gpu.trace]
kind = "constant"
power_w = 300.0
[[gpu.process]]
pid = 101
sm_util = 60

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
[gpu.trace]
kind = "constant"
power_w = 90.0
"""
