"""Scraping a server's ``/metrics`` into monotonic token totals, with a hard deadline per scrape.

Server counters are cumulative and reset when the server restarts; ``TokenTotals`` turns them
into monotonic totals per (model, kind). Nothing here raises into the sampler: a server that is
down, slow, dribbling bytes or answering garbage is counted in ``TokenScraper.errors`` and the
last totals stand.
"""
from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import urllib.parse
from collections import Counter
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from ..errors import UsageError
from .parse import (AUTO, GENERATION, PROMPT, SERVER_KINDS, SeriesId, ServerKind, TokenKey, TokenScrapeError,
                    detect_kind, server_kind, token_series)

if TYPE_CHECKING:  # pragma: no cover
    from ..meter import Meter

log = logging.getLogger("wattmeter.tokens")
MAX_BODY_BYTES = 32 << 20                      # a /metrics page is KBs to a few MB


class TokenSource(Protocol):
    """What TokenJoiner reads: monotonic totals, the increase since the last ``deltas()``
    (never the server's history from before we first reached it), whether the last read
    worked, and the models the source knows are served now (a source that only sees responses
    knows none: new tokens are the joiner's other sign of a model's life)."""

    @property
    def totals(self) -> dict[TokenKey, int]: ...

    def deltas(self) -> dict[TokenKey, int]: ...

    @property
    def up(self) -> bool: ...

    @property
    def models(self) -> frozenset[str]: ...


def split_http_url(url: str) -> tuple[urllib.parse.SplitResult | None, str | None]:
    """An inference server's address (``127.0.0.1:8000`` means ``http://``) as split parts, and
    what is wrong with it: None, "blank" (empty or spaces), "scheme" (not http/https) or
    "address" (no host, or a port outside 1-65535). Callers word the error for their flag."""
    if not url or any(c.isspace() for c in url):
        return None, "blank"
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https"):
        return parts, "scheme"
    try:
        port = parts.port
    except ValueError:
        port = 0
    return parts, ("address" if port == 0 or not parts.hostname else None)


def normalise_url(url: str) -> str:
    """``127.0.0.1:8000`` -> ``http://127.0.0.1:8000/metrics``; a bad URL is a UsageError."""
    parts, problem = split_http_url(url)
    if problem == "blank":
        raise UsageError(f"server URL {url!r} contains spaces or is empty; give e.g. http://127.0.0.1:8000/metrics")
    if problem == "scheme":
        raise UsageError(f"server URL {url!r}: use http:// or https://")
    if problem == "address" or parts is None:
        raise UsageError(f"server URL {url!r}: the port must be 1-65535 and a host is needed "
                         f"(e.g. http://127.0.0.1:8000/metrics)")
    full = url if "://" in url else "http://" + url
    return full if parts.path not in ("", "/") else full.rstrip("/") + "/metrics"


class TokenTotals:
    """Monotonic totals from reset-prone counters, plus the base for ``deltas()``."""

    def __init__(self, skip_history: bool) -> None:
        self._lock = threading.Lock()
        self._raw: dict[SeriesId, float] = {}
        self._totals: dict[TokenKey, float] = {}
        # A server's counters hold tokens from before we started: the first good scrape is a baseline.
        self._base: dict[TokenKey, int] | None = None if skip_history else {}
        self.resets = 0

    @property
    def totals(self) -> dict[TokenKey, int]:
        with self._lock:
            return {k: int(round(v)) for k, v in self._totals.items()}

    def add(self, key: TokenKey, n: float) -> None:
        with self._lock:
            self._totals[key] = self._totals.get(key, 0.0) + n

    def ingest(self, series: Mapping[SeriesId, tuple[TokenKey, float]]) -> None:
        with self._lock:
            reset = False
            for sid, (key, value) in series.items():
                last = self._raw.get(sid)
                if last is None:
                    inc = value              # a new series: all it holds is news (history on the first scrape)
                elif value >= last:
                    inc = value - last
                else:
                    inc = value              # it went down: the server restarted; what it holds came after
                    reset = True
                self._raw[sid] = value
                self._totals[key] = self._totals.get(key, 0.0) + inc
            self.resets += reset             # restarts seen, not series

    def deltas(self, ok: bool) -> dict[TokenKey, int]:
        cur = self.totals
        if self._base is None:
            if ok:
                self._base = cur             # the baseline: tokens counted before we first reached the server
            return {}
        out = {k: n - self._base.get(k, 0) for k, n in cur.items() if n > self._base.get(k, 0)}
        self._base = cur
        return out


class Fetcher:
    """GETs a page within a hard deadline of real time, whatever the server's pace: a watchdog
    shuts the socket at the deadline, so a server that drips one byte a second cannot hold a
    scrape past it. ``abort()`` (from another thread) cuts the fetch in flight now and refuses
    later ones, so `serve` stops at once on SIGTERM."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def abort(self) -> None:
        with self._lock:
            self._closed = True
            conn = self._conn
        if conn is not None:
            _shut(conn)

    def fetch(self, url: str, deadline_s: float, accept: str = "text/plain;version=0.0.4;q=1,*/*;q=0.1") -> str:
        """The body of ``url``; raises TokenScrapeError."""
        parts = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=deadline_s)
        with self._lock:
            if self._closed:
                raise TokenScrapeError("connection", "stopping")
            self._conn = conn
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _shut(conn)

        watchdog = threading.Timer(deadline_s, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            return _get(conn, parts, accept, deadline_s, expired)
        finally:
            watchdog.cancel()
            with self._lock:
                self._conn = None
            conn.close()


def _shut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _get(conn: http.client.HTTPConnection, parts: urllib.parse.SplitResult, accept: str, deadline_s: float,
         expired: threading.Event) -> str:
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path or "/metrics", headers={"Accept": accept, "User-Agent": "wattmeter"})
        resp = conn.getresponse()
        if resp.status >= 400:
            hint = ""
            if resp.status == 501:      # llama.cpp answers 501 when started without --metrics
                hint = "; the server's metrics are off: start it with --metrics (llama.cpp) or --enable-metrics"
            raise TokenScrapeError("http", f"HTTP {resp.status} {resp.reason}{hint}")
        chunks, size = [], 0
        while chunk := resp.read1(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise TokenScrapeError("timeout", f"the answer is over {MAX_BODY_BYTES >> 20} MiB")
        if expired.is_set():
            raise TimeoutError
        if resp.length:
            # A cut-short body's last line could parse as a smaller counter: a fake restart.
            raise TokenScrapeError("connection", "the answer was cut short")
        charset = resp.headers.get_content_charset() or "utf-8"
    except TokenScrapeError:
        raise
    except (TimeoutError, socket.timeout):
        raise TokenScrapeError("timeout", f"no full response within {deadline_s:g} s") from None
    except (OSError, ValueError, http.client.HTTPException, ssl.SSLError) as exc:   # refused, reset, bad status
        if expired.is_set():
            raise TokenScrapeError("timeout", f"no full response within {deadline_s:g} s") from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise TokenScrapeError("connection", reason) from None
    try:
        return b"".join(chunks).decode(charset, errors="replace")
    except LookupError:                      # an unknown charset name
        return b"".join(chunks).decode("utf-8", errors="replace")


class TokenScraper:
    """Scrapes one server's ``/metrics`` into monotonic per-(model, kind) token totals.

    ``kind`` is a family name or "auto" (detected from the first page that has token counters).
    ``model`` names series that carry no model label (TGI, llama.cpp); default "default".
    ``poll()`` never raises: failures are counted in ``errors`` (kind -> n), logged, and the
    last totals are returned. Point it at one server, not a load balancer (resets would blur).
    """

    def __init__(self, kind: str | ServerKind, url: str, timeout_s: float = 2.0,
                 model: str | None = None) -> None:
        self.server: ServerKind | None = None if kind == AUTO else server_kind(kind)
        self.url = normalise_url(url)
        self.timeout_s = timeout_s
        self.model = model or "default"
        self.errors: Counter[str] = Counter()
        self.last_error = ""
        self._up = False
        self._fail_level = logging.WARNING
        self._models: frozenset[str] = frozenset()
        self.scrapes = 0
        self._state = TokenTotals(skip_history=True)
        self._fetcher = Fetcher()

    def close(self) -> None:
        """Cut a scrape in flight and refuse later ones (shutdown)."""
        self._fetcher.abort()

    @property
    def name(self) -> str:
        return self.server.name if self.server is not None else AUTO

    @property
    def up(self) -> bool:
        return self._up

    @property
    def models(self) -> frozenset[str]:
        """Models in the last good scrape (a model the server no longer serves drops out)."""
        return self._models

    @property
    def totals(self) -> dict[TokenKey, int]:
        return self._state.totals

    @property
    def resets(self) -> int:
        return self._state.resets

    def fetch(self) -> str:
        return self._fetcher.fetch(self.url, self.timeout_s)

    def ingest(self, text: str) -> dict[TokenKey, int]:
        """Fold one /metrics page into the totals (raises TokenScrapeError; ``poll`` catches it)."""
        server = self.server or detect_kind(text)
        if server is None:
            token_series(SERVER_KINDS["vllm"], text, self.model)     # raises "parse" on a non-exposition page
            names = ", ".join(sorted({c.sample for k in SERVER_KINDS.values() for c in k.counters}))
            raise TokenScrapeError("missing", f"--server auto: no known token counter in the response ({names})")
        series = token_series(server, text, self.model)
        if not series:
            names = ", ".join(sorted({c.sample for c in server.counters}))
            raise TokenScrapeError("missing", f"none of {names} in the response"
                                   + (f" ({server.note})" if server.note else ""))
        if self.server is None:
            self.server = server
            log.info("token server at %s detected as %s", self.url, server.name)
        self._state.ingest(series)
        self._models = frozenset(model for (model, _), _ in series.values())
        return self.totals

    def poll(self) -> dict[TokenKey, int]:
        if self._fetcher.closed:
            return self.totals                   # shutting down: not a failure worth a warning
        self.scrapes += 1
        try:
            self.ingest(self.fetch())
        except TokenScrapeError as exc:
            self._failed(exc)
        else:
            if not self._up and self.errors:
                # At the failure notice's level: whoever saw "failed" must also see this.
                log.log(self._fail_level, "token scrape of %s works again", self.url)
            self._up = True
        return self.totals

    def deltas(self) -> dict[TokenKey, int]:
        """Poll, and return the tokens counted since the previous ``deltas()`` (none on the first
        good scrape: the server's history before we first reached it is not attributable)."""
        self.poll()
        return self._state.deltas(self._up)

    def _failed(self, exc: TokenScrapeError) -> None:
        self.errors[exc.kind] += 1
        message = f"{exc.kind}: {exc}"
        # Warn on a change of state, not on every scrape of a server that stays down.
        if self._up or message != self.last_error:
            self._fail_level = logging.WARNING
            log.warning("token scrape of %s (%s) failed: %s", self.url, self.name, message)
        else:
            log.debug("token scrape of %s (%s) failed: %s", self.url, self.name, message)
        self.last_error = message
        self._up = False


class OllamaResponseCounter:
    """Ollama has no /metrics: count tokens from each response's JSON instead.

    ``observe(resp)`` reads ``prompt_eval_count``/``eval_count`` (native API; in a stream only
    the final ``done`` chunk has them) or ``usage.prompt_tokens``/``completion_tokens`` (the
    OpenAI-compatible API). With a ``meter`` it calls ``meter.add_tokens``; it is also a
    TokenSource, so a TokenJoiner can use it for J/token (then give the meter to one, not both).
    """

    def __init__(self, meter: "Meter | None" = None, model: str | None = None) -> None:
        self.meter = meter
        self.model = model
        self._state = TokenTotals(skip_history=False)   # every observed response is ours

    @property
    def totals(self) -> dict[TokenKey, int]:
        return self._state.totals

    def observe(self, response: Mapping[str, Any]) -> tuple[int, int]:
        usage = response.get("usage")
        if isinstance(usage, Mapping):
            prompt, gen = usage.get("prompt_tokens"), usage.get("completion_tokens")
        else:
            prompt, gen = response.get("prompt_eval_count"), response.get("eval_count")
        prompt, gen = max(0, int(prompt or 0)), max(0, int(gen or 0))
        model = self.model or str(response.get("model") or "default")
        for kind, n in ((PROMPT, prompt), (GENERATION, gen)):
            if n:
                self._state.add((model, kind), n)
                if self.meter is not None:
                    self.meter.add_tokens(n, kind)
        return prompt, gen

    def poll(self) -> dict[TokenKey, int]:
        return self.totals

    @property
    def up(self) -> bool:
        return True                      # nothing to reach: responses come to us

    @property
    def models(self) -> frozenset[str]:
        return frozenset()               # only responses say a model is there (see TokenSource)

    def deltas(self) -> dict[TokenKey, int]:
        return self._state.deltas(True)


