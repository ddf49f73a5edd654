"""A small OpenAI-compatible server on 127.0.0.1 for proxy tests and the proxy benchmark.

POST /v1/completions and /v1/chat/completions answer with ``completion_tokens`` tokens (the
request's ``max_tokens``, default 16) after ``delay_s`` (or the request's ``x_delay_s``); with
``stream`` each token is an SSE
chunk, and a final usage-only chunk follows when ``stream_options.include_usage`` is set (as
vLLM and llama.cpp do). ``pad_bytes`` pads a non-streamed answer (benchmark: a 1 kB response).
"""
from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from typing import Any


class FakeOpenAI:
    def __init__(self, delay_s: float = 0.0, pad_bytes: int = 0, prompt_tokens: int = 7) -> None:
        self.delay_s, self.pad_bytes, self.prompt_tokens = delay_s, pad_bytes, prompt_tokens
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with outer.lock:
                    outer.bodies.append(body)
                n = int(body.get("max_tokens", 16))
                delay_s = float(body.get("x_delay_s", outer.delay_s))      # test-only: per-request pace
                usage = {"prompt_tokens": outer.prompt_tokens, "completion_tokens": n,
                         "total_tokens": outer.prompt_tokens + n}
                model = body.get("model", "tiny")
                if not body.get("stream"):
                    if delay_s:
                        time.sleep(delay_s)
                    doc = {"id": "cmpl-1", "object": "text_completion", "model": model,
                           "choices": [{"index": 0, "text": "x" * outer.pad_bytes, "finish_reason": "length"}],
                           "usage": usage}
                    self._send(200, doc)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(n):
                    if delay_s:
                        time.sleep(delay_s / n)
                    chunk = {"id": "cmpl-1", "model": model, "choices": [{"index": 0, "text": f"t{i}"}],
                             "usage": None}
                    self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._chunk(f"data: {json.dumps({'id': 'cmpl-1', 'model': model, 'choices': [], 'usage': usage})}\n\n"
                                .encode())
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

            def _send(self, status: int, doc: Any) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
