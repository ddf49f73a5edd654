"""The newer server pages in tests/fixtures/servers read by the token parser: vLLM 0.32 with data
parallelism, prompt tokens by source and cached prompt tokens; llama.cpp's page as the real
llama-server (built by tools/build_llama_server.sh) serves it."""
from __future__ import annotations

import http.server
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from wattmeter.tokens import TokenScraper, parse_tokens

FIXTURES = Path(__file__).parent / "fixtures" / "servers"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
VLLM_DP = (FIXTURES / "vllm-0.32-dp.txt").read_text()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_vllm_032_counts_each_prompt_token_once_over_both_engines():
    # prompt_tokens_total already holds cached and transferred tokens: the by-source and cached
    # series must not be added on top.
    assert parse_tokens("vllm", VLLM_DP) == {(LLAMA, "prompt"): 120500 + 98000, (LLAMA, "generation"): 45210 + 40790}


def test_vllm_032_page_is_what_a_dp_server_sends():
    s = samples(VLLM_DP)
    names = {name for name, _ in s}
    assert not [n for n in names if n.endswith("_created") or n.startswith(("process_", "python_"))]
    for engine in ("0", "1"):
        by_source = {dict(labels)["source"]: v for (name, labels), v in s.items()
                     if name == "vllm:prompt_tokens_by_source_total" and dict(labels)["engine"] == engine}
        assert set(by_source) == {"local_compute", "local_cache_hit", "external_kv_transfer"}
        key = (("engine", engine), ("model_name", LLAMA))
        assert sum(by_source.values()) == s[("vllm:prompt_tokens_total", key)]
        assert by_source["local_cache_hit"] + by_source["external_kv_transfer"] == s[("vllm:prompt_tokens_cached_total", key)]


class Page(http.server.BaseHTTPRequestHandler):
    body = ""

    def do_GET(self) -> None:  # noqa: N802
        data = self.body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=1.0.0; charset=utf-8")   # prometheus_client >= 0.22
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_vllm_032_scraped_with_its_content_type_counts_only_new_tokens():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
    try:
        scraper = TokenScraper("vllm", f"http://127.0.0.1:{httpd.server_address[1]}/metrics")
        Page.body = VLLM_DP
        assert scraper.deltas() == {} and scraper.up          # the server's history is not ours
        # 300 new prompt tokens on engine 1, 200 of them cache hits; 40 generated on engine 0.
        Page.body = (VLLM_DP
                     .replace('vllm:prompt_tokens_total{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 98000.0',
                              'vllm:prompt_tokens_total{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 98300.0')
                     .replace('source="local_cache_hit"} 27000.0', 'source="local_cache_hit"} 27200.0')
                     .replace('vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 45210.0',
                              'vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 45250.0'))
        assert scraper.deltas() == {(LLAMA, "prompt"): 300, (LLAMA, "generation"): 40}
        assert dict(scraper.errors) == {}
    finally:
        httpd.shutdown()
        httpd.server_close()
