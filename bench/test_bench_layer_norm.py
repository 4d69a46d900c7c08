"""Microbenchmarks: layer norm over the last dim, clipfast's kernel (`kernels.layer_norm`) against torch's; and the
residual add with the norm after it (`kernels.add_layer_norm`, op `add_ln`) against torch's add then F.layer_norm.

    pytest bench/test_bench_layer_norm.py --benchmark-only [--benchmark-json bench/results/<file>.json]

Shapes: the rows a CLIPA step normalises (tokens x width), bf16 on a GPU:
  `B-vision-112`  ViT-B/16 at 112 px, batch 1024: 51,200 x 768 (the profiled step's 25 vision layer norms)
  `L-vision-96`   ViT-L/16 at 96 px, batch 512: 18,944 x 1,024
  `B-text-16`     ViT-B/16's text tower, 1024 packed captions of ~11.6 tokens: 11,878 x 512
Modes: `fwd`, and `fwdbwd` (forward, then backward with dW and dB). GB/s counts the bytes each mode must move
at least: fwd reads x and writes y; fwdbwd also reads x and dy and writes dx. add_ln: fwd reads x and r and writes
the sum and y; fwdbwd also reads the sum, dy and the sum's own gradient and writes dx. On the CPU (float32, 1/64 of the
rows) only torch's cases run; the kernel cases skip (the interpreter is for correctness, not speed).
"""
import pytest
import torch
import torch.nn.functional as F

from bench.conftest import DEVICE, record_rate, synced
from kernels import add_layer_norm, layer_norm

SHAPES = {"B-vision-112": (51200, 768), "L-vision-96": (18944, 1024), "B-text-16": (11878, 512)}
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _make(impl: str, shape: str, mode: str, op: str = "ln"):
    M, N = SHAPES[shape]
    M = M if DEVICE == "cuda" else M // 64
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, N, generator=g, device=DEVICE).to(DTYPE).requires_grad_(mode == "fwdbwd")
    w = (1 + 0.1 * torch.randn(N, generator=g, device=DEVICE)).to(DTYPE).requires_grad_(mode == "fwdbwd")
    b = (0.1 * torch.randn(N, generator=g, device=DEVICE)).to(DTYPE).requires_grad_(mode == "fwdbwd")
    dy = torch.randn(M, N, generator=g, device=DEVICE).to(DTYPE)
    r = torch.randn(M, N, generator=g, device=DEVICE).to(DTYPE).requires_grad_(mode == "fwdbwd")
    ds = torch.randn(M, N, generator=g, device=DEVICE).to(DTYPE)

    def fwd():
        if op == "add_ln":
            if impl == "triton":
                return add_layer_norm(x, r, w, b, impl="triton")
            s = x + r
            return s, F.layer_norm(s, (N,), w, b)
        if impl == "triton":
            return layer_norm(x, w, b, impl="triton")
        return F.layer_norm(x, (N,), w, b)

    def fwdbwd():
        x.grad = r.grad = w.grad = b.grad = None
        out = fwd()
        if op == "add_ln":
            torch.autograd.backward(out, (ds, dy))
        else:
            out.backward(dy)

    per_pass = M * N * x.element_size()
    passes = {("ln", "fwd"): 2, ("ln", "fwdbwd"): 5, ("add_ln", "fwd"): 4, ("add_ln", "fwdbwd"): 8}[op, mode]
    return (fwd if mode == "fwd" else fwdbwd), passes * per_pass


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("op", ["ln", "add_ln"])
def test_layer_norm(benchmark, op, impl, shape, mode):
    if impl == "triton" and DEVICE != "cuda":
        pytest.skip("the Triton kernel needs a GPU here (the interpreter is for correctness, not speed)")
    fn, nbytes = _make(impl, shape, mode, op)
    fn = synced(fn)
    fn()  # compiles the kernel
    benchmark.group = f"{'layer norm' if op == 'ln' else 'add + layer norm'} {shape} {mode}"
    benchmark.extra_info.update(op=op, impl=impl, shape=shape, mode=mode, rows_x_width=SHAPES[shape])
    benchmark.pedantic(fn, rounds=5 if DEVICE == "cpu" else 50, iterations=1, warmup_rounds=2)
    record_rate(benchmark, nbytes=nbytes)
