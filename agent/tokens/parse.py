"""Reading inference servers' own ``/metrics`` pages: which samples count tokens, per server family.

Pure functions of the page text: no sockets, no clocks. ``detect_kind`` picks the family from
the metric names a page holds (``serve --server auto``).
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Mapping

from prometheus_client.parser import text_string_to_metric_families

from ..errors import UsageError, WattmeterError

PROMPT, GENERATION = "prompt", "generation"
TokenKey = tuple[str, str]                     # (model, "prompt" | "generation")
SeriesId = tuple[str, tuple[tuple[str, str], ...]]
AUTO = "auto"


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
        close = difflib.get_close_matches(str(kind).lower(), [*SERVER_KINDS, AUTO], n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown server kind {kind!r}; {hint}choose one of {', '.join([*SERVER_KINDS, AUTO])}")
    return SERVER_KINDS[kind]


def detect_kind(text: str) -> ServerKind | None:
    """The server family whose token samples appear in ``text`` (the most matching counters
    wins; sglang-realtime only when its realtime counter is there and the plain ones are not)."""
    names = {m.group() for line in text.splitlines() if line and line[0] != "#" and (m := _NAME.match(line))}
    best, best_n = None, 0
    for kind in SERVER_KINDS.values():
        n = len({c.sample for c in kind.counters} & names)
        if n > best_n:
            best, best_n = kind, n
    return best


# -- parsing ---------------------------------------------------------------------------
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SAMPLE_LINE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})?\s+\S+")


def token_series(server: ServerKind, text: str, default_model: str) -> dict[SeriesId, tuple[TokenKey, float]]:
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
    out: dict[SeriesId, tuple[TokenKey, float]] = {}
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
    for key, value in token_series(server_kind(kind), text, default_model).values():
        out[key] = out.get(key, 0.0) + value
    return out


