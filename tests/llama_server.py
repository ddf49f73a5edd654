"""A real llama.cpp ``llama-server`` for end-to-end tests: the binary (built from the llama-cpp-python
sdist by tools/build_llama_server.sh and cached by version), a tiny random-weight GGUF written
here with the ``gguf`` package, and a process wrapper. No downloads beyond the package index.
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from e2e_servers import _Process, free_port, http_get, wait_until

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "tools" / "build_llama_server.sh"
BUILD_TIMEOUT_S = 1500.0          # a cold build is ~5 min on 2 cores; leave room on a busy machine

# A llama-architecture model small enough to generate thousands of tokens/s on one core.
N_EMBD, N_HEAD, N_LAYER, N_FF, N_CTX = 64, 4, 2, 128, 512
PIECES = ["▁the", "▁a", "▁energy", "▁token", "▁watt", "▁joule", "▁model", "▁of", "s", "ing"]


def llama_server_binary() -> str:
    """The cached llama-server, building it when the cache has none (what CI does on a cold cache).
    LLAMA_SERVER_BIN names a prebuilt binary instead."""
    given = os.environ.get("LLAMA_SERVER_BIN")
    if given:
        return given
    try:
        out = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"building llama-server took over {BUILD_TIMEOUT_S:g} s")
    if out.returncode != 0:
        pytest.fail(f"tools/build_llama_server.sh failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer llama with random weights and a SentencePiece-style vocabulary: control tokens,
    the 256 byte-fallback tokens (so any text tokenizes) and a few word pieces."""
    import numpy as np
    from gguf import GGUFWriter, TokenType

    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += PIECES
    types += [TokenType.NORMAL] * len(PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(PIECES))]
    n_vocab = len(tokens)

    w = GGUFWriter(str(path), "llama")
    w.add_name("wattmeter-tiny-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)                                   # all F32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> Any:                        # numpy shape is (rows=out, cols=in)
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    w.add_tensor("token_embd.weight", rand(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones.copy())
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones.copy())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", ones.copy())
    w.add_tensor("output.weight", rand(n_vocab, N_EMBD))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class LlamaServer(_Process):
    """``llama-server --metrics`` on 127.0.0.1; ``restart()`` keeps the port."""

    def __init__(self, binary: str, model: Path, workdir: Path, port: int | None = None,
                 alias: str = "tiny-llama") -> None:
        self.binary, self.model, self.workdir, self.alias = binary, model, workdir, alias
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._start()

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__([self.binary, "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                          "--metrics", "-c", str(N_CTX), "-np", "1", "-t", "1", "-tb", "1",
                          "--alias", self.alias, "--no-warmup"], self.workdir)

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"llama-server exited with {self.proc.returncode}: {self.output[-3000:]}")
            return http_get(f"{self.url}/health", timeout_s=2.0)[0] == 200

        wait_until(healthy, 60.0, "llama-server to load the model")

    def restart(self) -> None:
        self.stop()
        self._start()

    def metrics(self) -> str:
        status, body = http_get(f"{self.url}/metrics")
        if status != 200:
            raise AssertionError(f"llama-server /metrics answered {status}: {body[:300]!r}")
        return body.decode()

    def complete(self, prompt: str, n_predict: int, timeout_s: float = 30.0) -> dict:
        """One /completion with ignore_eos: exactly n_predict tokens are generated."""
        body = json.dumps({"prompt": prompt, "n_predict": n_predict, "ignore_eos": True,
                           "temperature": 0.0, "cache_prompt": False}).encode()
        req = urllib.request.Request(f"{self.url}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
