"""Tokens from inference servers' own ``/metrics``, joined with GPU energy into J/token.

    scraper = TokenScraper("vllm", "http://127.0.0.1:8000/metrics")
    joiner = TokenJoiner(meter, scraper)                    # J/token over a 60 s window
    meter.sampler.add_task("tokens", 5.0, joiner.tick)     # scrapes on its own reader thread
    joiner.snapshot()                                       # -> [TokenStat], for the exporter

Server counters are cumulative and reset when the server restarts; the scraper turns them
into monotonic totals per (model, kind). Nothing here raises into the sampler: a server that
is down, slow or answers garbage is counted in ``TokenScraper.errors`` and the last totals stand.
"""
from __future__ import annotations

import http.client
import logging
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from prometheus_client.parser import text_string_to_metric_families

from .errors import UsageError, WattmeterError
from .model import Component

if TYPE_CHECKING:  # pragma: no cover
    from .meter import Meter

log = logging.getLogger("wattmeter.tokens")

PROMPT, GENERATION = "prompt", "generation"
TokenKey = tuple[str, str]                     # (model, "prompt" | "generation")
_SeriesId = tuple[str, tuple[tuple[str, str], ...]]
MAX_BODY_BYTES = 32 << 20                      # a /metrics page is KBs to a few MB


@dataclass(frozen=True)
class CounterSpec:
    """One exposed sample that counts tokens. ``sample`` is the exact sample name: we match
    samples, not families, because prometheus_client's parser strips ``_total`` from a counter
    family's name (``vllm:prompt_tokens``) while the sample keeps it."""

    sample: str
    kind: str                                  # PROMPT or GENERATION
    where: Mapping[str, str] = field(default_factory=dict)   # label filter (e.g. mode="decode")


@dataclass(frozen=True)
class ServerKind:
    name: str
    counters: tuple[CounterSpec, ...]
    model_labels: tuple[str, ...] = ("model_name", "model")
    default_url: str = ""
    note: str = ""


def _kind(name: str, prompt: str | CounterSpec, generation: str | CounterSpec, port: int, note: str = "",
          *extra: CounterSpec, model_labels: tuple[str, ...] = ("model_name", "model")) -> ServerKind:
    specs = tuple(c if isinstance(c, CounterSpec) else CounterSpec(c, k)
                  for c, k in ((prompt, PROMPT), (generation, GENERATION)))
    return ServerKind(name, specs + extra, model_labels, f"http://127.0.0.1:{port}/metrics", note)


_SGL_RT = "sglang:realtime_tokens_total"
_TRT_IN, _TRT_OUT = {"response_metric_type": "total_input_tokens"}, {"response_metric_type": "total_output_tokens"}
SERVER_KINDS: dict[str, ServerKind] = {k.name: k for k in (
    _kind("vllm", "vllm:prompt_tokens_total", "vllm:generation_tokens_total", 8000, "labels model_name, engine"),
    _kind("sglang", "sglang:prompt_tokens_total", "sglang:generation_tokens_total", 30000,
          "needs --enable-metrics; counters move only when a request finishes"),
    _kind("sglang-realtime", CounterSpec(_SGL_RT, PROMPT, {"mode": "prefill_compute"}),
          CounterSpec(_SGL_RT, GENERATION, {"mode": "decode"}), 30000,
          "needs --enable-metrics and a SGLang with realtime_tokens_total; moves every log interval",
          CounterSpec(_SGL_RT, PROMPT, {"mode": "prefill_cache"})),
    _kind("tgi", "tgi_request_input_length_sum", "tgi_request_generated_tokens_sum", 3000,
          "histogram sums; generated tokens are recorded when a request finishes"),
    _kind("llamacpp", "llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", 8080, "needs --metrics"),
    _kind("lmdeploy", "lmdeploy:prompt_tokens_total", "lmdeploy:generation_tokens_total", 23333,
          "needs --enable-metrics; labels model_name, engine"),
    _kind("triton", CounterSpec("nv_llm_input_token_len_sum", PROMPT, _TRT_IN),
          CounterSpec("nv_llm_output_token_len_sum", GENERATION, _TRT_OUT), 8002,
          "TensorRT-LLM backend histograms, recorded when a response completes", model_labels=("model",)),
    _kind("ray", "ray_vllm_prompt_tokens_total", "ray_vllm_generation_tokens_total", 8080,
          "Ray Serve LLM (vLLM engine) on Ray's metrics export port; one series per replica",
          # Older Ray kept vLLM's colon (its dashboards queried ray_vllm:generation_tokens_total).
          CounterSpec("ray_vllm:prompt_tokens_total", PROMPT), CounterSpec("ray_vllm:generation_tokens_total", GENERATION)),
)}


class TokenScrapeError(WattmeterError):
    """A scrape that gave no usable counters. ``kind``: connection, timeout, http, parse, missing."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def server_kind(kind: str | ServerKind) -> ServerKind:
    if isinstance(kind, ServerKind):
        return kind
    if kind not in SERVER_KINDS:
        raise UsageError(f"unknown server kind {kind!r}; choose one of {', '.join(SERVER_KINDS)}")
    return SERVER_KINDS[kind]


# -- parsing ---------------------------------------------------------------------------
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SAMPLE_LINE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})?\s+\S+")


def _series(server: ServerKind, text: str, default_model: str) -> dict[_SeriesId, tuple[TokenKey, float]]:
    """Every raw token series in ``text``, keyed by its full label set (so resets are per series)."""
    wanted = {c.sample for c in server.counters}
    # Parse only our lines: a /metrics page is large, and an odd line elsewhere must not cost us ours.
    lines = [line for line in text.splitlines() if (m := _NAME.match(line)) and m.group() in wanted]
    if not lines:
        if not any(_SAMPLE_LINE.match(l) for l in text.splitlines() if l and not l.startswith("#")):
            raise TokenScrapeError("parse", "the response is not Prometheus text exposition")
        return {}
    try:
        samples = [s for fam in text_string_to_metric_families("\n".join(lines) + "\n") for s in fam.samples]
    except ValueError as exc:
        raise TokenScrapeError("parse", f"bad token counter line: {exc}") from None
    out: dict[_SeriesId, tuple[TokenKey, float]] = {}
    for s in samples:
        value = float(s.value)
        if not math.isfinite(value) or value < 0:
            continue
        for spec in server.counters:
            if s.name == spec.sample and all(s.labels.get(k) == v for k, v in spec.where.items()):
                model = next((s.labels[l] for l in server.model_labels if s.labels.get(l)), default_model)
                out[(s.name, tuple(sorted(s.labels.items())))] = ((model, spec.kind), value)
    return out


def parse_tokens(kind: str | ServerKind, text: str, default_model: str = "default") -> dict[TokenKey, float]:
    """Token counters in a /metrics page: (model, "prompt"|"generation") -> value summed over
    the other labels (engine, replica, ...). Raises TokenScrapeError if ``text`` is not exposition."""
    out: dict[TokenKey, float] = {}
    for key, value in _series(server_kind(kind), text, default_model).values():
        out[key] = out.get(key, 0.0) + value
    return out


# -- scraping --------------------------------------------------------------------------
class TokenSource(Protocol):
    """What TokenJoiner reads: monotonic totals, and the increase since the last ``deltas()``."""

    @property
    def totals(self) -> dict[TokenKey, int]: ...

    def deltas(self) -> dict[TokenKey, int]: ...


def normalise_url(url: str) -> str:
    """``127.0.0.1:8000`` -> ``http://127.0.0.1:8000/metrics``."""
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    if scheme not in ("http", "https"):
        raise UsageError(f"server URL {url!r}: use http:// or https://")
    return url if "/" in rest else url + "/metrics"


class _Totals:
    """Monotonic totals from reset-prone counters, plus the base for ``deltas()``."""

    def __init__(self, skip_history: bool) -> None:
        self._lock = threading.Lock()
        self._raw: dict[_SeriesId, float] = {}
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

    def ingest(self, series: Mapping[_SeriesId, tuple[TokenKey, float]]) -> None:
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
                self._base = cur
            return {}
        out = {k: n - self._base.get(k, 0) for k, n in cur.items() if n > self._base.get(k, 0)}
        self._base = cur
        return out


class TokenScraper:
    """Scrapes one server's ``/metrics`` into monotonic per-(model, kind) token totals.

    ``model`` names series that carry no model label (TGI, llama.cpp); default "default".
    ``poll()`` never raises: failures are counted in ``errors`` (kind -> n), logged, and the
    last totals are returned. Point it at one server, not a load balancer (resets would blur).
    """

    def __init__(self, kind: str | ServerKind, url: str, timeout_s: float = 2.0,
                 model: str | None = None) -> None:
        self.server = server_kind(kind)
        self.url = normalise_url(url)
        self.timeout_s = timeout_s
        self.model = model or "default"
        self.errors: Counter[str] = Counter()
        self.last_error = ""
        self.up = False
        self.scrapes = 0
        self._state = _Totals(skip_history=True)
        # Metrics endpoints are local or cluster-internal: never route them through an env proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def totals(self) -> dict[TokenKey, int]:
        return self._state.totals

    @property
    def resets(self) -> int:
        return self._state.resets

    def fetch(self) -> str:
        req = urllib.request.Request(self.url, headers={
            "Accept": "text/plain;version=0.0.4;q=1,*/*;q=0.1", "User-Agent": "wattmeter"})
        # The socket timeout bounds each read; the deadline (real time, whatever the meter's clock)
        # bounds a server that dribbles its answer.
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                chunks, size = [], 0
                while chunk := resp.read(1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_BODY_BYTES or time.monotonic() > deadline:
                        raise TokenScrapeError("timeout", f"no full response within {self.timeout_s:g} s"
                                               f" and {MAX_BODY_BYTES >> 20} MiB")
                if getattr(resp, "length", None):
                    # A cut-short body's last line could parse as a smaller counter: a fake restart.
                    raise TokenScrapeError("connection", "the answer was cut short")
                charset = resp.headers.get_content_charset() or "utf-8"
        except urllib.error.HTTPError as exc:
            raise TokenScrapeError("http", f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            kind = "timeout" if isinstance(exc.reason, TimeoutError) else "connection"
            raise TokenScrapeError(kind, f"{exc.reason}") from None
        except TimeoutError:
            raise TokenScrapeError("timeout", f"no response within {self.timeout_s:g} s") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:   # reset, bad status line, short read
            raise TokenScrapeError("connection", f"{type(exc).__name__}: {exc}") from None
        try:
            return b"".join(chunks).decode(charset, errors="replace")
        except LookupError:                      # an unknown charset name
            return b"".join(chunks).decode("utf-8", errors="replace")

    def ingest(self, text: str) -> dict[TokenKey, int]:
        """Fold one /metrics page into the totals (raises TokenScrapeError; ``poll`` catches it)."""
        series = _series(self.server, text, self.model)
        if not series:
            names = ", ".join(sorted({c.sample for c in self.server.counters}))
            raise TokenScrapeError("missing", f"none of {names} in the response"
                                   + (f" ({self.server.note})" if self.server.note else ""))
        self._state.ingest(series)
        return self.totals

    def poll(self) -> dict[TokenKey, int]:
        self.scrapes += 1
        try:
            self.ingest(self.fetch())
        except TokenScrapeError as exc:
            self._failed(exc)
        else:
            if not self.up and self.errors:
                log.info("token scrape of %s works again", self.url)
            self.up = True
        return self.totals

    def deltas(self) -> dict[TokenKey, int]:
        """Poll, and return the tokens counted since the previous ``deltas()`` (none on the first
        good scrape: the server's history before we started is not attributable)."""
        self.poll()
        return self._state.deltas(self.up)

    def _failed(self, exc: TokenScrapeError) -> None:
        self.errors[exc.kind] += 1
        message = f"{exc.kind}: {exc}"
        # Warn on a change of state, not on every scrape of a server that stays down.
        level = logging.WARNING if (self.up or message != self.last_error) else logging.DEBUG
        log.log(level, "token scrape of %s (%s) failed: %s", self.url, self.server.name, message)
        self.last_error = message
        self.up = False


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
        self._state = _Totals(skip_history=False)   # every observed response is ours

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

    def deltas(self) -> dict[TokenKey, int]:
        return self._state.deltas(True)


# -- joining with energy ---------------------------------------------------------------
@dataclass(frozen=True)
class TokenStat:
    """Per model, for ``wattmeter_tokens_total{model,kind}`` and ``wattmeter_energy_per_token_joules``."""

    model: str
    prompt_tokens_total: int
    generation_tokens_total: int
    energy_per_token_j: float | None            # GPU J per generation token over the window
    energy_above_idle_per_token_j: float | None


@dataclass(frozen=True)
class _Point:
    t: float
    energy_j: Mapping[str, float]               # GPU device key -> ledger total
    tokens: Mapping[TokenKey, int]


class TokenJoiner:
    """Feeds scraped tokens into the meter and keeps J/token per model over a sliding window.

    J/token = ΔE of the GPUs serving the model ÷ Δ generation tokens, over the last ``window_s``
    (keep it long: some servers count tokens only when a request ends). ``gpus`` maps a model
    to the device keys serving it (default: every GPU). Energy above idle subtracts
    ``idle_w_per_gpu`` × GPUs × Δt, or, unset, the lowest interval power seen in the window.
    """

    def __init__(self, meter: "Meter", source: TokenSource, window_s: float = 60.0,
                 idle_w_per_gpu: float | None = None, gpus: Mapping[str, Sequence[str]] | None = None) -> None:
        if window_s <= 0:
            raise UsageError(f"token window must be > 0 s, got {window_s}")
        self.meter = meter
        self.source = source
        self.window_s = window_s
        self.idle_w_per_gpu = idle_w_per_gpu
        self.gpus = {m: tuple(keys) for m, keys in (gpus or {}).items()}
        self._points: deque[_Point] = deque()
        self._lock = threading.Lock()

    def tick(self, now: float) -> None:
        """One scrape: count new tokens into the meter and record an (energy, tokens) point."""
        for (_, kind), n in sorted(self.source.deltas().items()):
            if n > 0:
                self.meter.add_tokens(n, kind)
        energy = {k: s.energy_j for k, s in self.meter.snapshot().items()
                  if s.device.component == Component.GPU}
        point = _Point(now, energy, self.source.totals)
        with self._lock:
            if self._points and now <= self._points[-1].t:
                return                           # a duplicate tick at the same instant adds nothing
            self._points.append(point)
            # Keep the newest point at or before the window start as its anchor edge.
            while len(self._points) >= 2 and self._points[1].t <= now - self.window_s:
                self._points.popleft()

    def snapshot(self) -> list[TokenStat]:
        with self._lock:
            points = list(self._points)
        totals = self.source.totals
        out = []
        for model in sorted({m for m, _ in totals}):
            jpt, above = self._per_token(model, points)
            out.append(TokenStat(model, totals.get((model, PROMPT), 0), totals.get((model, GENERATION), 0),
                                 jpt, above))
        return out

    def _per_token(self, model: str, points: list[_Point]) -> tuple[float | None, float | None]:
        if len(points) < 2:
            return None, None
        first, last = points[0], points[-1]
        keys = [k for k in self.gpus.get(model, last.energy_j) if k in first.energy_j and k in last.energy_j]
        gen = last.tokens.get((model, GENERATION), 0) - first.tokens.get((model, GENERATION), 0)
        if not keys or gen <= 0:
            return None, None
        energy = sum(last.energy_j[k] - first.energy_j[k] for k in keys)
        idle_w = self._idle_w(keys, points)
        above = None if idle_w is None else max(0.0, energy - idle_w * (last.t - first.t)) / gen
        return energy / gen, above

    def _idle_w(self, keys: Sequence[str], points: list[_Point]) -> float | None:
        if self.idle_w_per_gpu is not None:
            return self.idle_w_per_gpu * len(keys)
        powers = [sum(b.energy_j.get(k, 0.0) - a.energy_j.get(k, 0.0) for k in keys) / (b.t - a.t)
                  for a, b in zip(points, points[1:])]
        return min(powers) if len(powers) >= 2 else None   # one interval says nothing about idle


