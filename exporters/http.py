"""The HTTP(S) endpoint: ``/metrics`` and ``/healthz``, with TLS, mTLS and basic auth.

prometheus_client's ``start_http_server`` does TLS but no basic auth, so this is a small
threaded ``http.server`` that renders a registry in the text format (``TextRenderer``).
The TLS handshake runs on the connection's thread (never in the accept loop), and every
connection has a timeout, so a slow or hostile client cannot stall other scrapes.
"""
from __future__ import annotations

import errno
import gzip
import io
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from ..errors import UsageError
from .prometheus import CONTENT_TYPE, TextRenderer
from .prometheus import Health as ExporterHealth
from .webconfig import BasicAuth, WebConfig

log = logging.getLogger("wattmeter.http")

DEFAULT_PORT = 9445          # clashes with none of dcgm 9400, Kepler 9102, Scaphandre 8080, node 9100
DEFAULT_HOST = "127.0.0.1"
CONNECTION_TIMEOUT_S = 10.0      # whole-request deadline: a slow drip of bytes cannot hold a thread longer
MAX_CONNECTIONS = 64             # concurrent connections; more are closed at once and counted
MAX_BODY_BYTES = 64 * 1024       # a scrape has no body; a small one is read and dropped, a big one refused
ANY_HOST = ""                    # ``:PORT``: every interface, IPv6 and IPv4 where the kernel has both
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
LISTEN_FORMS = "PORT, HOST:PORT, :PORT (every interface, dual-stack), [::]:PORT or [IPv6]:PORT"

Health = Callable[[], "tuple[bool, str]"]
HTTP_ERROR_KINDS = ("read_timeout", "connection_limit", "body_too_large")


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    @property
    def url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def wildcard(self) -> bool:
        return self.host in (ANY_HOST, "0.0.0.0", "::")

    def __str__(self) -> str:
        return f"{self.url_host}:{self.port}"

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def parse_listen(value: str, flag: str = "--listen") -> ListenAddress:
    """``9445``, ``127.0.0.1:9445``, ``:9445`` (every interface, both families), ``[::]:9445``
    (the same), ``[::1]:9445``, ``host:9445``. ``0.0.0.0:9445`` is IPv4 only."""
    raw = str(value).strip()
    host, port_text = DEFAULT_HOST, raw
    if raw.startswith("["):
        m = re.fullmatch(r"\[([0-9A-Fa-f:.%a-z]+)\]:(\d+)", raw)
        if not m:
            raise UsageError(f"{flag} {value!r}: not a listen address; use {LISTEN_FORMS}")
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise UsageError(f"{flag} {value!r}: {host!r} is not an IPv6 address; use {LISTEN_FORMS}") from None
    elif ":" in raw:
        host, _, port_text = raw.rpartition(":")
        if ":" in host:      # a bare IPv6 address needs brackets, else its last group reads as the port
            raise UsageError(f"{flag} {value!r}: put an IPv6 address in brackets, e.g. [::]:9445; use {LISTEN_FORMS}")
        if host and not _HOSTNAME.fullmatch(host):
            raise UsageError(f"{flag} {value!r}: {host!r} is not a host name or address; use {LISTEN_FORMS}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{flag} {value!r}: not a listen address (port must be 0-65535); use {LISTEN_FORMS}")
    return ListenAddress(host, int(port_text))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True      # TIME_WAIT only; a live listener still fails with EADDRINUSE
    request_queue_size = 128        # many concurrent scrapers should queue, not be refused

    def __init__(self, address: ListenAddress, handler: type, ssl_context: ssl.SSLContext | None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        host = address.host
        if host == ANY_HOST:         # dual-stack where the kernel has IPv6, else IPv4 (ipv6.disable=1)
            host = "::" if socket.has_ipv6 and _ipv6_works() else "0.0.0.0"
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.counts: Counter[str] = Counter()     # refusals by kind, for wattmeter_sensor_errors_total{sensor="http"}
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__((host, address.port), handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # "[::]" and ":PORT" accept IPv4 too (mapped addresses), as Go's net.Listen does.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def count(self, kind: str) -> None:
        with self._active_lock:
            self.counts[kind] += 1

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            # The handshake waits for the handler thread (``_Handler.setup``).
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self._active >= self.max_connections
            if full:
                self.counts["connection_limit"] += 1
            else:
                self._active += 1
        if full:     # closed at once: a flood of idle connections cannot hold every thread
            log.debug("connection from %s refused: %d connections open", client_address, self.max_connections)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)


def _ipv6_works() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
        return True
    except OSError:
        return False


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each bounded by what is left of one deadline per request, so a
    client that drips a byte every few seconds is cut off like one that sends nothing."""

    def __init__(self, sock: socket.socket, budget_s: float, on_timeout: Callable[[], None]) -> None:
        self.sock, self.budget_s, self.on_timeout = sock, budget_s, on_timeout
        self.deadline = time.monotonic() + budget_s

    def restart(self) -> None:
        self.deadline = time.monotonic() + self.budget_s

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.on_timeout()
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buf)
        except TimeoutError:
            self.on_timeout()
            raise


class _Handler(BaseHTTPRequestHandler):
    server_version = "wattmeter"
    sys_version = ""                 # no Python version in the Server header
    timeout = CONNECTION_TIMEOUT_S
    protocol_version = "HTTP/1.1"
    # Set per server by MetricsServer (a subclass per instance, no module state).
    renderer: TextRenderer
    auth: BasicAuth | None = None
    health: Health | None = None
    extra_headers: dict[str, str] = {}
    allowed_sans: tuple[str, ...] = ()

    def setup(self) -> None:
        super().setup()
        self.rfile.close()      # the stdlib's reader: replaced by one with a whole-request deadline
        self._reader = _DeadlineReader(self.connection, self.timeout, lambda: self.server.count("read_timeout"))
        self.rfile = io.BufferedReader(self._reader)
        conn = self.connection
        if isinstance(conn, ssl.SSLSocket):
            try:
                conn.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", self.client_address, exc)
                self.close_connection = True
                raise
            if self.allowed_sans and not self._san_allowed(conn.getpeercert()):
                log.info("client certificate from %s has no allowed SAN", self.client_address)
                raise ConnectionAbortedError("client certificate SAN not allowed")

    def _san_allowed(self, cert: dict | None) -> bool:
        names = {v for _, v in (cert or {}).get("subjectAltName", ())}
        return any(s in names for s in self.allowed_sans)

    def handle_one_request(self) -> None:
        self._reader.restart()      # each request on a kept-alive connection gets the full deadline
        super().handle_one_request()

    def _drop_body(self) -> bool:
        """Read and drop a request body (a scrape has none), so it is never parsed as the next
        request. False (the reply sent, the connection closing) when it cannot be dropped safely."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send(411, b"Length Required: send a Content-Length, or no body\n", "text/plain; charset=utf-8",
                       {"Connection": "close"})
            return False
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return True
        if not length_text.strip().isdigit():
            self.close_connection = True
            self._send(400, b"Bad Request: invalid Content-Length\n", "text/plain; charset=utf-8", {"Connection": "close"})
            return False
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            self.server.count("body_too_large")
            self.close_connection = True
            self._send(413, b"Payload Too Large\n", "text/plain; charset=utf-8", {"Connection": "close"})
            return False
        while length > 0:
            chunk = self.rfile.read(min(length, 16384))
            if not chunk:
                self.close_connection = True
                return False
            length -= len(chunk)
        return True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s " + format, self.client_address[0], *args)

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**self.extra_headers, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        if not self._drop_body():
            return
        if self.auth is not None and not self.auth.check(self.headers.get("Authorization")):
            self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8",
                       {"WWW-Authenticate": 'Basic realm="wattmeter"'})
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path == "/healthz":
            ok, detail = self.health() if self.health else (True, "ok")
            self._send(200 if ok else 503, (detail + "\n").encode(), "text/plain; charset=utf-8")
        elif path == "/":
            body = b"<html><head><title>wattmeter</title></head><body><h1>wattmeter</h1>" \
                   b"<p><a href=\"/metrics\">/metrics</a> <a href=\"/healthz\">/healthz</a></p></body></html>\n"
            self._send(200, body, "text/html; charset=utf-8")
        else:
            self._send(404, b"Not Found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET

    def _metrics(self) -> None:
        body = self.renderer.render()     # text format 0.0.4, whatever the Accept header prefers
        headers = {}
        if "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024:
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        self._send(200, body, CONTENT_TYPE, headers)


class MetricsServer:
    """Serves a registry until ``stop()``. ``start()`` binds; a bad address is a UsageError."""

    def __init__(self, registry: CollectorRegistry, address: ListenAddress, web: WebConfig | None = None,
                 health: Health | None = None, flag: str = "--listen",
                 max_connections: int = MAX_CONNECTIONS, read_timeout_s: float = CONNECTION_TIMEOUT_S) -> None:
        self.address = address
        self.max_connections = max_connections
        self.web = web or WebConfig()
        self.flag = flag
        auth = BasicAuth(self.web.users) if self.web.users else None
        tls = self.web.tls
        self._handler = type("Handler", (_Handler,), {
            "renderer": TextRenderer(registry), "auth": auth, "health": staticmethod(health) if health else None,
            "extra_headers": dict(self.web.headers),
            "allowed_sans": tls.client_allowed_sans if tls else (), "timeout": read_timeout_s,
        })
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.address.port

    @property
    def url(self) -> str:
        host = self.address.url_host if not self.address.wildcard else "127.0.0.1"
        return f"{self.web.scheme}://{host}:{self.port}"

    @property
    def family(self) -> int:
        return self._server.address_family if self._server else socket.AF_UNSPEC

    def health(self) -> list["ExporterHealth"]:
        """Connections refused or cut off, by kind (read_timeout, connection_limit, body_too_large);
        every kind is exported from 0 so an alert sees the first one."""
        counts = dict(self._server.counts) if self._server else {}
        return [ExporterHealth("http", None, {k: counts.get(k, 0) for k in HTTP_ERROR_KINDS})]

    def start(self) -> "MetricsServer":
        try:
            self._server = _Server(self.address, self._handler, self.web.ssl_context, self.max_connections)
        except OSError as exc:
            raise UsageError(_bind_error(self.flag, self.address, exc)) from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="wattmeter-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)


def _bind_error(flag: str, address: ListenAddress, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"{flag} {address}: port {address.port} is already in use; stop the other process "
                f"or choose another port with {flag}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{flag} {address}: permission denied (ports below 1024 need privileges); choose a port above 1024"
    if exc.errno == errno.EAFNOSUPPORT:
        return f"{flag} {address}: this kernel has no IPv6; use :{address.port} or 0.0.0.0:{address.port}"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return f"{flag} {address}: {address.host} is not an address of this machine; use 127.0.0.1 or :{address.port}"
    return f"{flag} {address}: cannot listen ({exc.strerror or exc}); choose another address"
