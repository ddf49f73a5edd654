"""A scripted stand-in for Electricity Maps and the UK Carbon Intensity API, on 127.0.0.1.

Tests start it themselves; nothing leaves the machine. ``mode`` picks the behaviour:
``ok``, ``500``, ``garbage`` (not JSON), ``bad_shape`` (JSON without a number), ``slow``.
"""
from __future__ import annotations

import json
import threading
import time
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

    def _body(self, path: str) -> Any:
        parsed = urlparse(path)
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
