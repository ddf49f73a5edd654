"""Tokens from inference servers, joined with GPU energy into J/token.

    scraper = TokenScraper("vllm", "http://127.0.0.1:8000/metrics")   # or "auto"
    joiner = TokenJoiner(meter, scraper)                    # J/token over a 60 s window
    meter.sampler.add_task("tokens", 5.0, joiner.tick)     # before meter.start(): tasks added later never run
    joiner.snapshot()                                       # -> [TokenStat], for the exporter

Three seams: ``parse`` (what a server's page says), ``scrape`` (getting it, within a deadline,
into monotonic totals) and ``join`` (tokens with energy). Per-request energy under concurrency
is in ``wattmeter.requests``.
"""
from __future__ import annotations

from .join import TokenJoiner, TokenStat
from .parse import (AUTO, GENERATION, PROMPT, SERVER_KINDS, CounterSpec, ServerKind, TokenKey, TokenScrapeError,
                    detect_kind, parse_tokens, server_kind, token_series)
from .scrape import (MAX_BODY_BYTES, OllamaResponseCounter, TokenScraper, TokenSource, TokenTotals, Fetcher,
                     normalise_url)

__all__ = ["AUTO", "GENERATION", "PROMPT", "SERVER_KINDS", "CounterSpec", "ServerKind", "TokenKey",
           "TokenScrapeError", "detect_kind", "parse_tokens", "server_kind", "token_series", "MAX_BODY_BYTES",
           "OllamaResponseCounter", "TokenScraper", "TokenSource", "TokenTotals", "Fetcher", "normalise_url",
           "TokenJoiner", "TokenStat"]
