"""What the proxy counts: ``usage`` read from OpenAI-style answers, and the per-model token
totals it feeds to the J/token joiner (a TokenSource). Used by wattmeter.proxy."""
from __future__ import annotations

import json
import threading
from typing import Any, Mapping

from .requests import GENERATION, PROMPT
from .tokens.parse import TokenKey
from .tokens.scrape import TokenTotals


class UsageCounter:
    """Tokens per (model, kind) from proxied responses: a TokenSource for the J/token joiner."""

    def __init__(self) -> None:
        self._state = TokenTotals(skip_history=False)      # every proxied response is ours
        self._lock = threading.Lock()
        self._without_usage = 0

    @property
    def responses_without_usage(self) -> int:
        return self._without_usage

    def no_usage(self) -> None:
        """A completion answered without ``usage`` (counted, shown as an error kind)."""
        with self._lock:
            self._without_usage += 1

    def observe(self, model: str, prompt: int, generation: int) -> None:
        for kind, n in ((PROMPT, prompt), (GENERATION, generation)):
            if n > 0:
                self._state.add((model, kind), n)

    @property
    def totals(self) -> dict[TokenKey, int]:
        return self._state.totals

    def deltas(self) -> dict[TokenKey, int]:
        return self._state.deltas(True)

    @property
    def up(self) -> bool:
        return True                      # responses come to us: nothing to reach

    @property
    def models(self) -> frozenset[str]:
        """None known: the proxy sees models only as they answer (the joiner counts a model's
        tokens as a sign of life, so one without requests for its forget time is dropped)."""
        return frozenset()


_DECODER = json.JSONDecoder()


def usage_from_body(data: bytes) -> tuple[int, int] | None:
    """``usage`` of a JSON completion. Fast path: the top-level object's last key is ``usage``
    (vLLM, llama.cpp), so only the tail is decoded; anything else is parsed whole."""
    i = data.rfind(b'"usage"')
    if i > 0 and data[i - 1:i] != b"\\":
        tail = data[i + 7:].decode("utf-8", "replace")
        colon = tail.find(":")
        if colon >= 0 and not tail[:colon].strip():
            rest = tail[colon + 1:]
            try:
                obj, end = _DECODER.raw_decode(tail, colon + 1 + len(rest) - len(rest.lstrip()))
            except ValueError:
                obj, end = None, 0
            if isinstance(obj, dict) and tail[end:].strip() == "}":
                return usage_of({"usage": obj})
    try:
        return usage_of(json.loads(data))
    except ValueError:
        return None


def usage_of(obj: Any) -> tuple[int, int] | None:
    usage = obj.get("usage") if isinstance(obj, Mapping) else None
    if not isinstance(usage, Mapping):
        return None
    try:
        return max(0, int(usage.get("prompt_tokens") or 0)), max(0, int(usage.get("completion_tokens") or 0))
    except (TypeError, ValueError):
        return None
