"""A scripted stand-in for Electricity Maps and the UK Carbon Intensity API, on 127.0.0.1.

Tests start it themselves; nothing leaves the machine. ``mode`` picks the behaviour:
``ok``, ``500``, ``garbage`` (not JSON), ``bad_shape`` (JSON without a number), ``slow``,
``no_forecast`` (a forecast endpoint that answers with no slots).

Forecasts: ``forecasts`` is a list of intensity lists, one per slot from ``forecast_start_unix``
(UK: 30 min slots, Electricity Maps: 1 h points). Each forecast request takes the next list and
the last one repeats, so tests can script forecasts that change between calls.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class FakeCarbonServer:
    def __init__(self) -> None:
        self.mode = "ok"
        self.intensity = 123.0
        self.uk_actual: float | None = None     # the UK API's "actual" is null until measured
        self.delay_s = 2.0
        self.requests: list[dict[str, Any]] = []
        self.forecasts: list[list[float]] = []
        self.forecast_start_unix = 1.7e9
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeCarbonServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_forecast(self) -> list[float]:
        values = self.forecasts[0] if self.forecasts else []
        if len(self.forecasts) > 1:
            self.forecasts.pop(0)
        return [] if self.mode == "no_forecast" else values

    @staticmethod
    def _iso(t: float) -> str:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%MZ")

    def _body(self, path: str) -> Any:
        parsed = urlparse(path)
        if parsed.path == "/v3/carbon-intensity/forecast":
            zone = parse_qs(parsed.query).get("zone", ["?"])[0]
            t0 = self.forecast_start_unix
            return {"zone": zone, "forecast": [
                {"carbonIntensity": g, "datetime": self._iso(t0 + 3600.0 * i).replace("Z", ":00.000Z")}
                for i, g in enumerate(self._next_forecast())], "updatedAt": self._iso(t0)}
        if parsed.path.startswith("/intensity/") and parsed.path.endswith("/fw48h"):
            t0 = self.forecast_start_unix
            return {"data": [{"from": self._iso(t0 + 1800.0 * i), "to": self._iso(t0 + 1800.0 * (i + 1)),
                              "intensity": {"forecast": g, "actual": None, "index": "moderate"}}
                             for i, g in enumerate(self._next_forecast())]}
        if parsed.path == "/v3/carbon-intensity/latest":
            zone = parse_qs(parsed.query).get("zone", ["?"])[0]
            return {"zone": zone, "carbonIntensity": self.intensity, "datetime": "2024-05-01T08:00:00.000Z",
                    "emissionFactorType": "lifecycle", "isEstimated": False}
        if parsed.path == "/intensity":
            return {"data": [{"from": "2024-05-01T08:00Z", "to": "2024-05-01T08:30Z",
                              "intensity": {"forecast": self.intensity, "actual": self.uk_actual,
                                            "index": "moderate"}}]}
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:   # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                fake.requests.append({"path": self.path, "headers": dict(self.headers)})
                if fake.mode == "slow":
                    time.sleep(fake.delay_s)
                if fake.mode == "500":
                    self._send(500, b'{"error": "internal"}')
                    return
                if fake.mode == "garbage":
                    self._send(200, b"<html>this is not json{")
                    return
                body = fake._body(self.path)
                if body is None:
                    self._send(404, b'{"error": "not found"}')
                    return
                if fake.mode == "bad_shape":
                    body = {"carbonIntensity": "high", "data": []}
                self._send(200, json.dumps(body).encode())

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client gave up (timeout tests)

        return Handler
