"""Why clipfast runs bf16 attention in float32 on the CPU: torch's SDPA forward + backward per dtype, one thread.

    python bench/cpu_attention.py [--threads 1] [--steps 20]

Prints the matmul throughput in float32 and bf16 first (bf16 is the fast one on a CPU with AMX), then a markdown
table: milliseconds per forward + backward for float32 inputs, bf16 inputs through torch's bf16
kernel (the baseline: what open_clip's amp_bf16 runs), and bf16 inputs upcast to float32 (clipfast.layers.sdpa),
with the speed-up of the last over the baseline.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from clipfast.layers import sdpa

# (batch, heads, tokens, head dim): ViT-S/16 at 64 / 112 / 224 px with a class token, and a packed-text bound
SHAPES = [(8, 6, 17, 64), (8, 6, 50, 64), (8, 6, 197, 64), (8, 6, 8, 64), (64, 12, 50, 64)]


def time_fwd_bwd(fn, shape, dtype, steps: int) -> float:
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))

    def once():
        fn(q, k, v).float().sum().backward()

    for _ in range(3):
        once()
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    return (time.perf_counter() - t0) / steps * 1e3


def matmul_gflops(dtype, m=1024, k=384, n=1536, steps=20) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(steps):
        a @ b
    return 2 * m * k * n * steps / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    f32, b16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"matmul 1024x384 @ 384x1536: float32 {f32:.0f} GFLOP/s, bf16 {b16:.0f} GFLOP/s ({b16 / f32:.1f}x)\n")
    print(f"CPU SDPA forward + backward, {args.threads} thread(s), torch {torch.__version__}, ms per call\n")
    print("| B, H, N, d | float32 | bf16 (torch) | bf16 upcast (clipfast) | upcast / torch bf16 |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        f32 = time_fwd_bwd(F.scaled_dot_product_attention, shape, torch.float32, args.steps)
        b16 = time_fwd_bwd(F.scaled_dot_product_attention, shape, torch.bfloat16, args.steps)
        up = time_fwd_bwd(sdpa, shape, torch.bfloat16, args.steps)
        rows.append({"shape": shape, "fp32_ms": f32, "bf16_ms": b16, "upcast_ms": up})
        print(f"| {', '.join(map(str, shape))} | {f32:.3f} | {b16:.3f} | {up:.3f} | **{b16 / up:.2f}x** |", flush=True)
    return rows


if __name__ == "__main__":
    main()
