"""Live J/token of `wattmeter serve --server vllm` under steady load. Writes results/jpt.json.

    python bench/bench_jpt.py             # ~80 s

A simulated H100 draws a flat 300 W (fake NVML scenario); a fake vLLM /metrics page counts 128
generation tokens/s (history of 50,000 tokens before `serve` starts). The true figure is
300 / 128 = 2.344 J/token. `serve` runs as a user would run it (its own process, default 5 s
token scrapes, --jpt-window 30); this process reads its /metrics every 2 s and records the
error of every exported J/token, from the first one on.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, machine_info  # noqa: E402

POWER_W, RATE = 300.0, 128
SCENARIO = f"""description = "flat {POWER_W:g} W"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
[gpu.trace]
kind = "constant"
power_w = {POWER_W}
"""


def main(duration_s: float = 75.0) -> None:
    started = time.monotonic()

    class Vllm(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            n = int((time.monotonic() - started) * RATE) + 50_000
            body = (f'vllm:prompt_tokens_total{{model_name="m"}} {n // 4}\n'
                    f'vllm:generation_tokens_total{{model_name="m"}} {n}\n').encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Vllm)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp()
    scen = os.path.join(tmp, "flat.toml")
    with open(scen, "w", encoding="utf-8") as f:
        f.write(SCENARIO)
    proc = subprocess.Popen([sys.executable, "-m", "wattmeter", "serve", "--listen", f"127.0.0.1:{port}",
                             "--fake-nvml", scen, "--server", "vllm", "--server-url",
                             f"127.0.0.1:{srv.server_address[1]}", "--jpt-window", "30"],
                            stderr=subprocess.DEVNULL)
    truth = POWER_W / RATE
    rows = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < duration_s:
            time.sleep(2.0)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            m = re.search(r'wattmeter_energy_per_token_joules\{model="m"\} (\S+)', body)
            if m:
                rows.append({"t_s": round(time.monotonic() - t0, 1), "jpt": float(m.group(1)),
                             "error_pct": 100 * (float(m.group(1)) / truth - 1)})
    finally:
        proc.terminate()
        proc.wait(10)
        srv.shutdown()
    errs = [r["error_pct"] for r in rows]
    out = {"machine": machine_info(), "truth_j_per_token": truth, "readings": len(rows),
           "first_reading_s": rows[0]["t_s"] if rows else None,
           "error_pct_min": min(errs) if errs else None, "error_pct_max": max(errs) if errs else None,
           "rows": rows}
    path = os.path.join(RESULTS_DIR, "jpt.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    print(f"J/token under steady load: {len(rows)} readings from {out['first_reading_s']} s, "
          f"error {out['error_pct_min']:+.3f} % .. {out['error_pct_max']:+.3f} % (truth {truth:.4f}); wrote {path}")


if __name__ == "__main__":
    main()
