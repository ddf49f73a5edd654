"""A small bundled workload for trying wattmeter: matrix multiplies on the GPU when torch and a
GPU are present, else a CPU-bound loop. `python -m wattmeter.examples.workload [seconds]`."""
from __future__ import annotations

import sys
import time


def gpu_matmul(seconds: float) -> bool:
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(10):
            a = (a @ b).clamp_(-1, 1)
        torch.cuda.synchronize()
        n += 10
    tflop = 2 * 8192**3 * n / 1e12
    print(f"workload: {n} fp16 8192x8192 matmuls on {torch.cuda.get_device_name()} ({tflop:.0f} TFLOP)")
    return True


def cpu_loop(seconds: float) -> None:
    end = time.monotonic() + seconds
    x, n = 0, 0
    while time.monotonic() < end:
        for i in range(20000):
            x = (x * 31 + i) % 1000003
        n += 1
    print(f"workload: no GPU with torch here; ran a CPU loop ({n * 20000} iterations)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    seconds = float(argv[0]) if argv else 3.0
    if not gpu_matmul(seconds):
        cpu_loop(seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
