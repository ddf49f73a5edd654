"""`serve --proxy-to URL`: an OpenAI-compatible pass-through that books each request's tokens.

Clients talk to the proxy as they would to the server. For POST /v1/completions and
/v1/chat/completions the proxy reads ``usage`` from the response (for a stream: its final usage
chunk, asked for with ``stream_options.include_usage`` when the client did not ask, and then
kept from that client), and books the tokens into the request's own ``RequestAccountant``
request. So per-request J/token is exact even for servers whose counters move only when a
request ends, and a request to a second ``--served-model-name`` alias counts under the name
the client used. Every other path is passed through untouched.

Binds 127.0.0.1 by default. Hop-by-hop headers are not forwarded. Per request the proxy does
little: a client's kept-alive connection keeps its thread (no thread per request), upstream
connections are kept alive with TCP_NODELAY and go back to a pool when a client leaves (a client
that opens a connection per request reuses them), an answer goes out in one write, and a
non-streamed answer's ``usage`` is read from its tail without parsing the whole body.
"""
from __future__ import annotations

import http.server
import itertools
import json
import logging
import socket
import threading
import time
import urllib.parse
from typing import Any

from .errors import UsageError
from .proxy_http import BadMessage, Upstream, UpstreamClosed, UpstreamResponse, read_headers
from .proxy_usage import UsageCounter, usage_from_body, usage_of
from .requests import GENERATION, PROMPT, RequestAccountant
from .tokens.scrape import split_http_url

log = logging.getLogger("wattmeter.proxy")
USAGE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length", "host",
                        "expect"})          # the proxy answers 100-continue itself
MAX_REQUEST_BYTES = 64 << 20
MAX_IDLE_UPSTREAM = 32    # kept-alive upstream connections waiting for the next client
PROGRESS_S = 0.2          # how often a stream's progress is booked into its request


def normalise_upstream(url: str) -> urllib.parse.SplitResult:
    """``127.0.0.1:8000`` or ``http://host:8000/`` -> a split URL; a bad one is a UsageError."""
    parts, problem = split_http_url(url)
    if problem == "blank":
        raise UsageError(f"--proxy-to {url!r} contains spaces or is empty; give e.g. http://127.0.0.1:8000")
    if problem is not None or parts is None:
        raise UsageError(f"--proxy-to {url!r}: give http(s)://HOST[:PORT] with a port in 1-65535")
    return parts


class OpenAIProxy:
    """The pass-through server. ``start()`` binds (fails fast), ``stop()`` closes."""

    def __init__(self, upstream: str, accountant: RequestAccountant | None, counter: UsageCounter | None = None,
                 host: str = "127.0.0.1", port: int = 0, default_model: str = "default",
                 timeout_s: float = 600.0) -> None:
        self.upstream = normalise_upstream(upstream)
        self.accountant = accountant
        self.counter = counter or UsageCounter()
        self.default_model = default_model
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._local = threading.local()
        self._idle: list[Upstream] = []                         # kept-alive upstream connections, LIFO
        self._idle_lock = threading.Lock()
        self._opened = itertools.count(1)
        self.connections_opened = 0                             # upstream connections made (reuse shows here)
        handler = type("ProxyHandler", (_Handler,), {"proxy": self})
        try:
            self._httpd = http.server.ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise UsageError(f"proxy cannot listen on {host}:{port}: {exc.strerror or exc}; "
                             f"pick another port with --proxy-listen") from None
        self._httpd.daemon_threads = True
        self._host = host
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._httpd.server_port}"

    def start(self) -> "OpenAIProxy":
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.2,), name="wattmeter-proxy",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def next_id(self) -> str:
        return f"proxy-{next(self._ids)}"

    def drop_upstream(self) -> None:
        """This thread's client left: its upstream connection goes back to the pool (if usable)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        if conn.sock is not None:
            with self._idle_lock:
                if len(self._idle) < MAX_IDLE_UPSTREAM:
                    self._idle.append(conn)
                    return
        conn.close()

    def _counted(self) -> None:
        self.connections_opened = next(self._opened)

    def connection(self, fresh: bool = False) -> Upstream:
        """This thread's kept-alive connection to the upstream: its own, else one from the pool,
        else a new one (``fresh``: close this thread's and open a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn
        if conn is not None:
            conn.close()
        conn = None
        if not fresh:
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
        if conn is None:           # connects on first use
            tls = self.upstream.scheme == "https"
            conn = Upstream(self.upstream.hostname or "127.0.0.1", self.upstream.port or (443 if tls else 80), tls,
                            self.timeout_s, self._counted)
        self._local.conn = conn
        return conn


class _Handler(http.server.BaseHTTPRequestHandler):
    proxy: OpenAIProxy
    protocol_version = "HTTP/1.1"          # keep-alive with the client too

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without NODELAY, Nagle and delayed ACKs add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.proxy.drop_upstream()      # one handler per client connection: its upstream goes too

    def log_message(self, *args: object) -> None:
        pass

    def parse_request(self) -> bool:
        """The request line and headers, parsed without the email package (http.server's own
        parse costs ~60 us a request). HTTP/1.0 and 1.1 only."""
        self.command = None        # type: ignore[assignment]
        self.request_version = self.default_request_version
        self.close_connection = True
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = line
        words = line.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.request_version = "HTTP/1.1"            # so the error goes out with a status line
            self.send_error(400, f"Bad request line {line[:80]!r}")
            return False
        self.command, self.path, self.request_version = words
        try:
            self.headers = read_headers(self.rfile)     # type: ignore[assignment]
        except BadMessage as exc:
            self.send_error(431 if "long" in str(exc) or "more than" in str(exc) else 400, str(exc))
            return False
        conn = (self.headers.get("Connection") or "").lower()
        self.close_connection = "close" in conn or (self.request_version == "HTTP/1.0" and "keep-alive" not in conn)
        if (self.headers.get("Expect") or "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            self.send_response_only(100)
            self.end_headers()
        return True

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def do_DELETE(self) -> None:
        self._forward()

    def _forward(self) -> None:
        try:
            body = self._body()
        except ValueError as exc:
            self._error(400, str(exc))
            self.close_connection = True
            return
        if body is None:
            self._error(413, "request body too large")
            self.close_connection = True
            return
        path = urllib.parse.urlsplit(self.path).path
        model, injected = None, False
        if self.command == "POST" and path in USAGE_PATHS and body:
            body, model, injected = self._ask_for_usage(body)
        if model is None or self.proxy.accountant is None:
            self._exchange(body, None, model, injected)
            return
        request_id = self.headers.get("X-Request-Id") or self.proxy.next_id()
        with self.proxy.accountant.request(request_id, model=model) as booking:
            self._exchange(body, booking, model, injected)

    def _body(self) -> bytes | None:
        """The request body, de-chunked (forwarded with a Content-Length); None when too large."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts, size = [], 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    n = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise ValueError("bad chunk size in the request body") from None
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass                    # trailers
                    return b"".join(parts)
                size += n
                if size > MAX_REQUEST_BYTES:
                    return None
                parts.append(self.rfile.read(n))
                self.rfile.readline(8)          # the CRLF after each chunk
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ValueError("bad Content-Length") from None
        if length < 0:
            raise ValueError("bad Content-Length")
        if length > MAX_REQUEST_BYTES:
            return None
        return self.rfile.read(length) if length else b""

    def _ask_for_usage(self, body: bytes) -> tuple[bytes, str | None, bool]:
        try:
            doc = json.loads(body)
        except ValueError:
            return body, None, False                    # not JSON: the upstream will say so
        if not isinstance(doc, dict):
            return body, None, False
        model = str(doc.get("model") or self.proxy.default_model)
        injected = False
        if doc.get("stream"):
            opts = doc.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage")):
                doc["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                body, injected = json.dumps(doc).encode(), True
        return body, model, injected

    def _upstream(self, body: bytes) -> UpstreamResponse:
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        target = self.proxy.upstream.path.rstrip("/") + self.path
        for attempt in (0, 1):
            conn = self.proxy.connection(fresh=attempt == 1)
            try:
                return conn.request(self.command, target, headers, body)
            except (UpstreamClosed, ConnectionResetError, BrokenPipeError):
                if attempt == 1:
                    raise                       # a kept-alive socket the upstream had closed: retry once, fresh
        raise AssertionError("unreachable")

    def _exchange(self, body: bytes, booking: Any, model: str | None, injected: bool) -> None:
        try:
            resp = self._upstream(body)
        except OSError as exc:                 # BadMessage included
            self.proxy.connection(fresh=True)
            self._error(502, f"upstream {self.proxy.upstream.geturl()} unreachable: {exc}")
            return
        ctype = resp.getheader("Content-Type", "")
        # Tokens are booked before the answer's last byte goes out: a client that has its answer
        # can read the figures.
        if "text/event-stream" in ctype:
            usage, booked = self._stream(resp, injected, booking)
            self._book(resp, model, booking, usage, booked)
            self._last_chunk()
        else:
            data = resp.read()
            usage = usage_from_body(data) if model is not None and "json" in ctype else None
            self._book(resp, model, booking, usage)
            self.wfile.write(self._head_bytes(resp, len(data)) + data)      # one write: head and body
        if resp.will_close:
            self.proxy.connection(fresh=True)

    def _book(self, resp: UpstreamResponse, model: str | None, booking: Any,
              usage: tuple[int, int] | None, booked: int = 0) -> None:
        if model is None:
            return
        if usage is None:
            if resp.status < 400:
                self.proxy.counter.no_usage()
            return
        prompt, gen = usage
        self.proxy.counter.observe(model, prompt, gen)
        if booking is not None:
            booking.add_tokens(prompt, PROMPT)
            # A chunk can carry several tokens: the usage is exact, the progress counted so far
            # was a lower bound.
            booking.add_tokens(max(0, gen - booked), GENERATION)

    def _head_bytes(self, resp: UpstreamResponse, length: int | None) -> bytes:
        """The status line and headers for the client (HTTP/1.1; hop-by-hop headers dropped)."""
        lines = [f"{self.protocol_version} {resp.status} {resp.reason}"]
        lines += [f"{k}: {v}" for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _stream(self, resp: UpstreamResponse, injected: bool,
                booking: Any) -> tuple[tuple[int, int] | None, int]:
        """Relay SSE events as they come (chunked), picking the usage out of the last one.

        While it streams, each content chunk counts as a generated token for the request
        (booked every PROGRESS_S), so its energy share follows its progress; the final usage
        corrects the count. Returns (usage, generation tokens already booked)."""
        self.wfile.write(self._head_bytes(resp, None))
        usage = None
        event: list[bytes] = []
        booked = pending = 0
        last = time.monotonic()
        try:
            while line := resp.readline():
                event.append(line)
                if line not in (b"\n", b"\r\n"):
                    continue
                keep = True
                for part in event:
                    if not part.startswith(b"data:") or part[5:].strip() == b"[DONE]":
                        continue
                    content = True
                    if b'"usage"' in part:
                        try:
                            doc = json.loads(part[5:])
                        except ValueError:
                            continue
                        content = bool(isinstance(doc, dict) and doc.get("choices"))
                        found = usage_of(doc)
                        if found is not None:
                            usage = found
                            # The usage-only chunk we asked for: the client did not, so keep it back.
                            keep = not (injected and not content)
                    pending += content
                if keep:
                    self._chunk(b"".join(event))
                event = []
                if booking is not None and pending and time.monotonic() - last >= PROGRESS_S:
                    booking.add_tokens(pending, GENERATION)
                    booked, pending, last = booked + pending, 0, time.monotonic()
            if event:
                self._chunk(b"".join(event))
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True            # the client left: what usage we saw still counts
            self.proxy.connection(fresh=True)       # the upstream answer was not read to its end
        return usage, booked

    def _last_chunk(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _error(self, status: int, message: str) -> None:
        data = json.dumps({"error": {"message": message, "type": "wattmeter_proxy"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
