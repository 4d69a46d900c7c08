"""Microbenchmarks: an MLP's first layer and GELU, forward + backward, clipfast's `kernels.linear_gelu` (GELU backward
and bias gradient in one pass) against torch's F.linear then F.gelu.

    pytest bench/test_bench_gelu.py --benchmark-only [--benchmark-json bench/results/<file>.json]

Shapes (bf16 on a GPU): tokens x width -> hidden
  `B-vision-112`  ViT-B/16 at 112 px, batch 1024: 51,200 x 768 -> 3,072
  `L-vision-96`   ViT-L/16 at 96 px, batch 512: 18,944 x 1,024 -> 4,096
  `B-text-16`     ViT-B/16's text tower, 1024 packed captions of ~11.6 tokens: 11,878 x 512 -> 2,048
TFLOP/s counts the three matmuls (forward, dx, dW: 6 M K N); the GELU work itself is memory-bound. On the CPU (float32,
1/64 of the rows) only torch's cases run; the kernel cases skip (the interpreter is for correctness, not speed).
"""
import pytest
import torch
import torch.nn.functional as F

from bench.conftest import DEVICE, record_rate, synced
from kernels import linear_gelu

SHAPES = {"B-vision-112": (51200, 768, 3072), "L-vision-96": (18944, 1024, 4096), "B-text-16": (11878, 512, 2048)}
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_gelu_fwdbwd(benchmark, impl, shape):
    if impl == "triton" and DEVICE != "cuda":
        pytest.skip("the Triton kernel needs a GPU here (the interpreter is for correctness, not speed)")
    M, K, N = SHAPES[shape]
    M = M if DEVICE == "cuda" else M // 64
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, K, generator=g, device=DEVICE).to(DTYPE).requires_grad_()
    w = (torch.randn(N, K, generator=g, device=DEVICE) * K**-0.5).to(DTYPE).requires_grad_()
    b = torch.zeros(N, device=DEVICE, dtype=DTYPE).requires_grad_()
    da = torch.randn(M, N, generator=g, device=DEVICE).to(DTYPE)

    def fwdbwd():
        x.grad = w.grad = b.grad = None
        y = linear_gelu(x, w, b, impl="triton") if impl == "triton" else F.gelu(F.linear(x, w, b))
        y.backward(da)

    fn = synced(fwdbwd)
    fn()  # compiles the kernel
    benchmark.group = f"linear + GELU {shape} fwdbwd"
    benchmark.extra_info.update(impl=impl, shape=shape, tokens_width_hidden=SHAPES[shape])
    benchmark.pedantic(fn, rounds=5 if DEVICE == "cpu" else 50, iterations=1, warmup_rounds=2)
    record_rate(benchmark, flops=6 * M * K * N)
