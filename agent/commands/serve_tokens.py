"""`serve`'s token options: a scraped server (``--server``) or the proxy (``--proxy-to``), joined
with GPU energy into live J/token. Every option is also a config key and a WATTMETER_* variable
(``Settings.get``); all are parsed and checked before any thread or socket starts.
"""
from __future__ import annotations

import argparse
import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..config import Settings, labels, positive_float
from ..errors import UsageError
from ..exporters.http import ListenAddress, parse_listen
from ..exporters.prometheus import Health
from ..model import Component

if TYPE_CHECKING:  # pragma: no cover
    from ..meter import Meter
    from ..requests import RequestResult
    from ..tokens import TokenJoiner

PROXY_DEFAULT_LISTEN = "127.0.0.1:9446"


def add_token_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokens (J/token; docs/tokens.md)")
    g.add_argument("--server", default=None, metavar="KIND",
                   help="scrape an inference server's token counters: "
                        "vllm|sglang|sglang-realtime|tgi|llamacpp|lmdeploy|triton|ray|auto (env WATTMETER_SERVER)")
    g.add_argument("--server-url", default=None, metavar="URL", help="the server's /metrics URL (default per kind)")
    g.add_argument("--proxy-to", default=None, metavar="URL",
                   help="serve an OpenAI-compatible pass-through to URL and count each response's usage "
                        "(exact per request; instead of --server)")
    g.add_argument("--proxy-listen", default=None, metavar="ADDR",
                   help=f"where the proxy listens (default {PROXY_DEFAULT_LISTEN})")
    g.add_argument("--model", default=None, metavar="NAME",
                   help="model name for series that carry none (llama.cpp, TGI) and proxied requests without one")
    g.add_argument("--jpt-window", default=None, metavar="S", help="J/token window in seconds (default 60)")
    g.add_argument("--idle-power", default=None, metavar="W",
                   help="idle power per GPU for above-idle J/token (default: measured from idle periods)")
    g.add_argument("--gpu-model-map", default=None, metavar="MAP",
                   help="which model each GPU serves, e.g. gpu0=llama,gpu1=qwen (default: every GPU, every model)")
    g.add_argument("--requests-log", default=None, metavar="FILE",
                   help="with --proxy-to: append one JSON line per request (J, J/token, g CO2e with a grid zone)")
    g.add_argument("--drop-model-after", default=None, metavar="S",
                   help="drop a model's series once the server has not listed it for S seconds (default 900)")


@dataclass
class TokenOptions:
    source: Any                                # TokenScraper, or None with the proxy (built at start)
    url: str
    model: str | None
    window_s: float
    idle_w_per_gpu: float | None
    gpu_map: dict[str, str]                    # device key -> model
    forget_after_s: float
    proxy_listen: ListenAddress | None = None
    requests_log: str | None = None

    @property
    def gpus(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for gpu, model in self.gpu_map.items():
            out.setdefault(model, []).append(gpu)
        return out


def _non_negative(value: Any) -> float:
    x = float(value)
    if not x >= 0 or x == float("inf"):
        raise ValueError("must be a number of watts >= 0")
    return x


def _gpu_map(value: Any) -> dict[str, str]:
    pairs = labels(value)
    if not pairs:
        raise ValueError("expected GPU=MODEL pairs, e.g. gpu0=llama,gpu1=qwen")
    out = {}
    for gpu, model in pairs.items():
        key = f"gpu{gpu}" if gpu.isdigit() else gpu          # "0=llama" means gpu0
        if not model:
            raise ValueError(f"{gpu!r} has no model name (e.g. {key}=llama)")
        out[key] = model
    return out


def token_options(settings: Settings, flags: Mapping[str, Any]) -> TokenOptions | None:
    """The token group of `serve` (``flags``: flag values by settings key, None when not given)."""
    from ..tokens import AUTO, SERVER_KINDS, TokenScraper, server_kind

    kind = settings.get("server", flags.get("server"), None, str)
    url = settings.get("server_url", flags.get("server_url"), None, str)
    proxy_to = settings.get("proxy_to", flags.get("proxy_to"), None, str)
    if kind is None and proxy_to is None:
        if url is not None:
            raise UsageError(f"--server-url needs --server KIND ({', '.join([*SERVER_KINDS, AUTO])})")
        return None
    if kind is not None and proxy_to is not None:
        raise UsageError("--server and --proxy-to both given: the proxy counts every request's tokens "
                         "exactly; drop --server")
    no_map: dict[str, str] = {}
    model = settings.get("model", flags.get("model"), None, str)
    window_s = settings.get("jpt_window", flags.get("jpt_window"), 60.0, positive_float)
    idle_w = settings.get("idle_power", flags.get("idle_power"), None, _non_negative)
    gpu_map = settings.get("gpu_model_map", flags.get("gpu_model_map"), no_map, _gpu_map)
    forget_s = settings.get("drop_model_after", flags.get("drop_model_after"), 900.0, positive_float)
    if proxy_to is not None:
        from ..proxy import normalise_upstream

        normalise_upstream(proxy_to)
        listen = parse_listen(settings.get("proxy_listen", flags.get("proxy_listen"), PROXY_DEFAULT_LISTEN, str),
                              flag="--proxy-listen")
        log_path = settings.get("requests_log", flags.get("requests_log"), None, str)
        if log_path is not None:
            try:
                open(log_path, "a", encoding="utf-8").close()
            except OSError as exc:
                raise UsageError(f"--requests-log {log_path!r}: cannot write there ({exc.strerror}); "
                                 f"give a writable file") from None
        return TokenOptions(None, proxy_to, model, window_s, idle_w, gpu_map, forget_s, proxy_listen=listen,
                            requests_log=log_path)
    assert kind is not None
    if settings.get("requests_log", flags.get("requests_log"), None, str) is not None:
        raise UsageError("--requests-log needs --proxy-to: only the proxy sees each request")
    if kind == AUTO and url is None:
        raise UsageError("--server auto needs --server-url (there is no default port to guess)")
    if kind != AUTO:
        url = url or server_kind(kind).default_url      # an unknown family: the closest one in the message
    assert url is not None
    return TokenOptions(TokenScraper(kind, url, model=model), url, model, window_s, idle_w, gpu_map, forget_s)


def check_gpu_map(opts: TokenOptions, meter: "Meter") -> None:
    """A map naming a GPU this node does not have is a usage error, found before serving."""
    gpus = [d.key for d in meter.ledger.devices if d.component == Component.GPU]
    for gpu in opts.gpu_map:
        if gpu not in gpus:
            raise UsageError(f"--gpu-model-map names {gpu}, which does not exist here "
                             f"(GPUs: {', '.join(gpus) or 'none'}); use those keys, e.g. gpu0=llama")


@dataclass
class TokenRuntime:
    joiner: "TokenJoiner"
    describe: str
    health_line: Callable[[], str]
    health: Callable[[], list[Health]]
    stop: Callable[[], None] = field(default=lambda: None)
    warning: str = ""


class RequestLog:
    """One JSON line per final request, appended and flushed (a crash loses at most a line)."""

    def __init__(self, path: str, meter: "Meter") -> None:
        self._f = open(path, "a", encoding="utf-8")
        self._wall = meter.clock.wall
        self._lock = threading.Lock()

    def write(self, r: "RequestResult") -> None:
        row = {"request_id": r.request_id, "model": r.model, "start": round(self._wall(r.start_t), 6),
               "duration_s": round(r.duration_s, 6), "energy_j": round(r.energy_j, 6),
               "prompt_tokens": r.tokens.get("prompt", 0), "generation_tokens": r.tokens.get("generation", 0),
               "energy_per_token_j": None if r.energy_per_token_j is None else round(r.energy_per_token_j, 6),
               "co2e_g": None if r.co2e_g is None else round(r.co2e_g, 9),
               "device_energy_j": {k: round(v, 6) for k, v in sorted(r.device_energy_j.items())}}
        with self._lock:
            if not self._f.closed:
                self._f.write(json.dumps(row) + "\n")
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


def start_tokens(opts: TokenOptions, meter: "Meter", carbon: Any = None) -> TokenRuntime:
    """Build the joiner (and bind the proxy, failing fast) for `serve`. ``carbon`` (a
    CarbonAccountant) gives each logged request its g CO2e at the grid's current intensity."""
    from ..tokens import TokenJoiner

    if opts.proxy_listen is None:
        scraper = opts.source
        joiner = TokenJoiner(meter, scraper, opts.window_s, opts.idle_w_per_gpu, opts.gpus or None,
                             forget_after_s=opts.forget_after_s)

        def line() -> str:
            state = "up" if scraper.up else ("down (" + (scraper.last_error or "not reached yet") + ")")
            return f"tokens: {state} [{scraper.name} {scraper.url}]"

        return TokenRuntime(joiner, f"scraping {scraper.name} token counters at {scraper.url}", line,
                            lambda: [Health("tokens", scraper.up, dict(scraper.errors))], scraper.close)
    from ..proxy import OpenAIProxy, UsageCounter
    from ..requests import RequestAccountant

    counter = UsageCounter()
    log_file = RequestLog(opts.requests_log, meter) if opts.requests_log else None
    intensity = (lambda: carbon.snapshot().intensity_g_per_kwh) if carbon is not None else None
    # Settled by the token task (joiner.tick), off the request path.
    acct = RequestAccountant(meter, gpus=opts.gpus or None, settle_on_end=False, intensity_g_per_kwh=intensity,
                             on_result=log_file.write if log_file else None)
    proxy = OpenAIProxy(opts.url, acct, counter, host=opts.proxy_listen.host, port=opts.proxy_listen.port,
                        default_model=opts.model or "default").start()
    joiner = TokenJoiner(meter, counter, opts.window_s, opts.idle_w_per_gpu, opts.gpus or None,
                         forget_after_s=opts.forget_after_s, requests=acct)

    def stop() -> None:
        proxy.stop()
        acct.settle()                  # what the GPUs' reads already cover reaches the log
        if log_file is not None:
            log_file.close()
    return TokenRuntime(joiner, f"proxying {proxy.url} -> {opts.url} (tokens from each response's usage)",
                        lambda: f"tokens: up [proxy {proxy.url} -> {opts.url}]",
                        lambda: [Health("tokens", True, {"no_usage": counter.responses_without_usage}
                                        if counter.responses_without_usage else {})],
                        stop,
                        "" if opts.proxy_listen.loopback else
                        f"the proxy listens on {opts.proxy_listen} without TLS or auth: anyone who reaches it "
                        f"can use the model server")
