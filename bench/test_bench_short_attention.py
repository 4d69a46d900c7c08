"""Microbenchmarks: the image tower's attention, clipfast's short-sequence kernel (`kernels.short_attention`) against
torch's SDPA the way clipfast.layers.Attention's SDPA path calls it (unbind the qkv projection, transpose, SDPA,
transpose back; backward into the projection's gradient, which stacks dq, dk, dv).

    pytest bench/test_bench_short_attention.py --benchmark-only [--benchmark-json bench/results/<file>.json]

Shapes (bf16 on a GPU, 64-dim heads), the attention of one vision block at the CLIPA goal points and around them:
  `B-112`  ViT-B/16 at 112 px, batch 1024: 50 tokens, 12 heads (one 64-token tile)
  `L-96`   ViT-L/16 at 96 px, batch 512: 37 tokens, 16 heads (one 64-token tile)
  `B-160`  ViT-B/16 at 160 px, batch 512: 101 tokens (64 x 64 blocks, per-window backward; the model keeps SDPA here)
Modes: `fwd`, and `fwdbwd` (forward, then backward to the projection's gradient). TFLOP/s counts the useful work:
4 N^2 d per head forward (QK^T and PV), 3.5x that forward + backward (the backward does 2.5x the forward). On the
CPU (float32, batch / 256) only SDPA runs; the kernel cases skip (the interpreter is for correctness, not speed).
"""
import pytest
import torch
import torch.nn.functional as F

from bench.conftest import DEVICE, record_rate, synced
from kernels import short_attention_qkvpacked

SHAPES = {"B-112": (1024, 50, 12), "L-96": (512, 37, 16), "B-160": (512, 101, 12)}
HEAD_DIM = 64
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _sdpa(qkv):
    B, N, _, H, d = qkv.shape
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * d)


def _make(impl: str, shape: str, mode: str):
    B, N, H = SHAPES[shape]
    B = B if DEVICE == "cuda" else max(1, B // 256)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    proj = torch.randn(B, N, 3 * H * HEAD_DIM, generator=g, device=DEVICE).to(DTYPE).requires_grad_(mode == "fwdbwd")
    dout = torch.randn(B, N, H * HEAD_DIM, generator=g, device=DEVICE).to(DTYPE)

    def fwd():
        qkv = proj.view(B, N, 3, H, HEAD_DIM)
        if impl == "triton":
            return short_attention_qkvpacked(qkv, impl="triton").reshape(B, N, H * HEAD_DIM)
        return _sdpa(qkv)

    def fwdbwd():
        proj.grad = None
        fwd().backward(dout)

    flops = 4 * B * H * N * N * HEAD_DIM
    return (fwd if mode == "fwd" else fwdbwd), (flops if mode == "fwd" else 3.5 * flops)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
def test_short_attention(benchmark, impl, shape, mode):
    if impl == "triton" and DEVICE != "cuda":
        pytest.skip("the Triton kernel needs a GPU here (the interpreter is for correctness, not speed)")
    fn, flops = _make(impl, shape, mode)
    fn = synced(fn)
    fn()  # compiles the kernel
    benchmark.group = f"vision attention {shape} {mode}"
    benchmark.extra_info.update(impl=impl, shape=shape, mode=mode, batch_tokens_heads=SHAPES[shape])
    benchmark.pedantic(fn, rounds=5 if DEVICE == "cpu" else 50, iterations=1, warmup_rounds=2)
    record_rate(benchmark, flops=flops)
