"""The proxy's lean HTTP/1.1 pieces: header parsing without the ``email`` package (which
``http.server`` and ``http.client`` use, at ~60 us a message), and a kept-alive upstream client
that sends a request's head and body in one write and reads its answer from one buffered reader
per connection. Only what an OpenAI-style pass-through needs: Content-Length, chunked and
close-delimited bodies, 1xx interim answers skipped."""
from __future__ import annotations

import socket
import ssl
from typing import BinaryIO, Callable, Iterator

MAX_LINE = 65536
MAX_HEADERS = 100
NO_BODY = frozenset({204, 304})


class UpstreamClosed(ConnectionResetError):
    """The upstream closed a kept-alive connection before answering (retry on a fresh one)."""


class BadMessage(OSError):
    """A malformed HTTP message."""


class Headers:
    """Header fields in order, looked up case-insensitively (the first of repeated fields)."""

    def __init__(self, fields: list[tuple[str, str]] | None = None) -> None:
        self._fields = fields or []

    def get(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        for k, v in self._fields:
            if k.lower() == low:
                return v
        return default

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def read_headers(fp: BinaryIO) -> Headers:
    """Header lines up to the blank line. Raises BadMessage on an over-long or malformed one."""
    fields: list[tuple[str, str]] = []
    while True:
        raw = fp.readline(MAX_LINE + 1)
        if len(raw) > MAX_LINE:
            raise BadMessage("header line too long")
        if raw in (b"\r\n", b"\n", b""):
            return Headers(fields)
        if len(fields) >= MAX_HEADERS:
            raise BadMessage(f"more than {MAX_HEADERS} headers")
        name, sep, value = raw.decode("iso-8859-1").partition(":")
        if not sep or not name or name != name.strip():
            raise BadMessage(f"bad header line {raw[:80]!r}")
        fields.append((name, value.strip()))


class UpstreamResponse:
    """One answer: status, headers, and its body through ``read()`` or ``readline()``."""

    def __init__(self, fp: BinaryIO, status: int, reason: str, version: str, headers: Headers) -> None:
        self._fp = fp
        self.status, self.reason, self.headers = status, reason, headers
        te = (headers.get("Transfer-Encoding") or "").lower()
        self._chunked = "chunked" in te
        length = headers.get("Content-Length")
        self._length: int | None = None
        if status in NO_BODY or 100 <= status < 200:
            self._length = 0
        elif not self._chunked and length is not None:
            try:
                self._length = int(length)
            except ValueError:
                raise BadMessage(f"bad Content-Length {length!r}") from None
        conn = (headers.get("Connection") or "").lower()
        close_delimited = not self._chunked and self._length is None
        self.will_close = close_delimited or "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)
        self._left = 0            # bytes left in the current chunk
        self._done = self._length == 0

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def getheaders(self) -> list[tuple[str, str]]:
        return self.headers.items()

    def _next_chunk(self) -> int:
        line = self._fp.readline(MAX_LINE)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise (UpstreamClosed("upstream closed mid-answer") if not line
                   else BadMessage(f"bad chunk size {line[:40]!r}")) from None
        if size == 0:
            read_headers(self._fp)               # trailers, up to the blank line
            self._done = True
        return size

    def readline(self) -> bytes:
        """The next line of the body (b"" at its end), across chunk boundaries."""
        if self._done:
            return b""
        if not self._chunked:
            if self._length is None:             # close-delimited
                line = self._fp.readline()
                self._done = not line
                return line
            line = self._fp.readline(self._length)
            if not line:
                raise UpstreamClosed("upstream closed mid-answer")
            self._length -= len(line)
            self._done = self._length == 0
            return line
        out = b""
        while True:
            if self._left == 0:
                self._left = self._next_chunk()
                if self._done:
                    return out
            part = self._fp.readline(self._left)
            if not part:
                raise UpstreamClosed("upstream closed mid-answer")
            self._left -= len(part)
            if self._left == 0:
                self._fp.readline(8)             # the CRLF after the chunk's data
            out += part
            if out.endswith(b"\n"):
                return out

    def read(self) -> bytes:
        """The rest of the body."""
        if self._done:
            return b""
        if not self._chunked:
            data = self._fp.read() if self._length is None else self._fp.read(self._length)
            if self._length is not None and len(data) < self._length:
                raise UpstreamClosed("upstream closed mid-answer")
            self._done = True
            return data
        parts = []
        while (line := self.readline()):
            parts.append(line)
        return b"".join(parts)


class Upstream:
    """One kept-alive connection to the upstream, connected on first use."""

    def __init__(self, host: str, port: int, tls: bool, timeout_s: float,
                 on_connect: Callable[[], None] | None = None) -> None:
        self.host, self.port, self.tls, self.timeout_s = host, port, tls, timeout_s
        self.on_connect = on_connect
        self.sock: socket.socket | None = None
        self._fp: BinaryIO | None = None
        default = 443 if tls else 80
        self._host_header = host if port == default else f"{host}:{port}"

    def _connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout_s)
        # The request goes out in one write; NODELAY keeps Nagle from holding a small one back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock, self._fp = sock, sock.makefile("rb")
        if self.on_connect is not None:
            self.on_connect()

    def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Send one request (head and body in one write) and read the answer's head."""
        if self.sock is None:
            self._connect()
        assert self.sock is not None and self._fp is not None
        head = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}", *(f"{k}: {v}" for k, v in headers),
                f"Content-Length: {len(body)}"]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        while True:
            line = self._fp.readline(MAX_LINE + 1)
            if not line:
                raise UpstreamClosed("upstream closed the connection before answering")
            version, _, rest = line.decode("iso-8859-1").rstrip("\r\n").partition(" ")
            code, _, reason = rest.partition(" ")
            if not version.startswith("HTTP/") or not code.isdigit():
                raise BadMessage(f"bad status line {line[:80]!r}")
            resp = UpstreamResponse(self._fp, int(code), reason, version, read_headers(self._fp))
            if not 100 <= resp.status < 200:
                return resp                      # 1xx (100 Continue...) are interim: the answer follows

    def close(self) -> None:
        fp, sock, self._fp, self.sock = self._fp, self.sock, None, None
        for part in (fp, sock):
            if part is not None:
                try:
                    part.close()
                except OSError:
                    pass
