"""Microbenchmarks: packed (varlen) caption attention, forward and forward+backward.

    pytest bench/test_bench_varlen_attention.py --benchmark-only [--benchmark-json bench/results/<file>.json]

Implementations: `triton` (kernels.varlen_attention), `sdpa_padded` (F.scaled_dot_product_attention on the
right-padded (B, H, max_len, d) batch with is_causal (non-causal: a key-padding mask), what a padded text
tower runs; the padding itself is not timed),
`ref` (varlen_attention_ref: pad + SDPA + gather, the CPU training path), `torch_varlen`
(torch.nn.attention.varlen.varlen_attn, where this torch has it), `flash_attn` (flash_attn_varlen_func, where
installed), and `triton_bm<N>` (the kernel with its window forced to N: the sweep that re-tunes the BLOCK_M
rule, forward only, log-normal mix). Captions: log-normal lengths (median 12, clipped to [2, 77]) and fixed
8/16/32/77; models: ViT-B text (8 heads x 64) and ViT-H text (16 x 64). TFLOP/s count real tokens only
(`flops`), so padded implementations are charged for their padding. On CPU only `ref` and `sdpa_padded` run,
on a small batch in float32; kernel cases skip with a reason.
"""
import functools
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import DEVICE, record_rate, synced
from kernels.varlen_attention import varlen_attention, varlen_attention_ref

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # torch < 2.9
    _torch_varlen_attn = None
try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

MODELS = {"B-text": (8, 64), "H-text": (16, 64)}  # heads, head_dim
CAPTIONS = 1024 if DEVICE == "cuda" else 32
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
LENGTHS = ["lognormal", "8", "16", "32", "77"]
IMPLS = ["triton", "sdpa_padded", "ref", "torch_varlen", "flash_attn"]


def caption_lengths(kind: str, n: int = CAPTIONS, seed: int = 0) -> list[int]:
    """Token counts per caption: log-normal (median 12, sigma 0.6, clipped to [2, 77]) or a fixed length."""
    if kind != "lognormal":
        return [int(kind)] * n
    g = torch.Generator().manual_seed(seed)
    return torch.exp(math.log(12) + 0.6 * torch.randn(n, generator=g)).round().clamp(2, 77).int().tolist()


def flops(lens: list[int], heads: int, head_dim: int, causal: bool, mode: str) -> float:
    """Attention FLOPs on real tokens: QK^T and PV, 2 * d per score each (causal: L(L+1)/2 scores per sequence);
    backward = 2.5x forward (five matmuls to two), flash-attention's convention."""
    scores = sum(L * (L + 1) // 2 if causal else L * L for L in lens)
    fwd = 4 * head_dim * scores * heads
    return fwd * (3.5 if mode == "fwdbwd" else 1.0)


def _torch_varlen(q, k, v, cu, max_len, causal):
    # torch <= 2.10: is_causal=; torch >= 2.12 (2.14 here): keyword-only window_size, (-1, 0) = causal
    if "window_size" in inspect.signature(_torch_varlen_attn).parameters:
        return _torch_varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0) if causal else (-1, -1))
    return _torch_varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=causal)


def _skip_reason(impl: str) -> str | None:
    if impl.startswith("triton") and DEVICE != "cuda":
        return "Triton kernel cases need a GPU (the interpreter is for correctness, not speed)"
    if impl == "torch_varlen" and (_torch_varlen_attn is None or DEVICE != "cuda"):
        return "torch.nn.attention.varlen needs torch >= 2.9 and CUDA"
    if impl == "flash_attn" and (flash_attn_varlen_func is None or DEVICE != "cuda"):
        return "flash-attn not installed (or no GPU)"
    return None


@functools.lru_cache(maxsize=4)
def _packed(kind: str, heads: int, head_dim: int):
    lens = caption_lengths(kind)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(sum(lens), heads, head_dim, generator=g, device=DEVICE, dtype=DTYPE) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return lens, q, k, v, cu


def _padded(lens, x, cu):
    """(T, H, d) -> right-padded (B, H, max_len, d), as a padded text tower holds it."""
    out = x.new_zeros(len(lens), max(lens), *x.shape[1:])
    for i, (a, L) in enumerate(zip(cu[:-1].tolist(), lens)):
        out[i, :L] = x[a : a + L]
    return out.transpose(1, 2).contiguous()


def _make_fn(impl, kind, heads, head_dim, causal, mode):
    lens, q, k, v, cu = _packed(kind, heads, head_dim)
    max_len = max(lens)
    if impl == "sdpa_padded":
        args = [_padded(lens, x, cu) for x in (q, k, v)]
        # right padding: is_causal alone is exact for real queries; non-causal needs a key-padding mask
        keys = torch.arange(max_len, device=DEVICE)[None, :] < torch.tensor(lens, device=DEVICE)[:, None]
        mask = None if causal else keys[:, None, None, :]  # (B, 1, 1, L)

        def fwd(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    else:
        args = [q, k, v]
        fwd = {
            "ref": lambda q, k, v: varlen_attention_ref(q, k, v, cu, max_len, causal),
            "torch_varlen": lambda q, k, v: _torch_varlen(q, k, v, cu, max_len, causal),
            "flash_attn": lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal),
        }.get(impl)
        if fwd is None:  # triton, triton_bm<N>
            bm = int(impl.removeprefix("triton_bm")) if impl.startswith("triton_bm") else None
            fwd = functools.partial(_triton, cu=cu, max_len=max_len, causal=causal, block_m=bm)
    if mode == "fwd":
        return lens, torch.no_grad()(lambda: fwd(*args))
    args = [a.detach().requires_grad_() for a in args]
    dout = torch.randn_like(fwd(*args))
    return lens, lambda: torch.autograd.grad(fwd(*args), args, dout)


def _triton(q, k, v, cu, max_len, causal, block_m):
    return varlen_attention(q, k, v, cu, max_len, causal, impl="triton", _block_m=block_m)


def _bench(benchmark, impl, kind, model, causal, mode):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    heads, head_dim = MODELS[model]
    lens, fn = _make_fn(impl, kind, heads, head_dim, causal, mode)
    fn = synced(fn)
    fn()  # compile / warm up outside the timing
    benchmark.group = f"varlen-attn {mode} {model} {kind}{'' if causal else ' non-causal'}"
    benchmark.extra_info.update(impl=impl, lengths=kind, captions=len(lens), tokens=sum(lens),
                                mean_len=round(sum(lens) / len(lens), 2), max_len=max(lens),
                                dtype=str(DTYPE))  # fmt: skip
    if DEVICE == "cuda":
        benchmark(fn)
    else:  # CPU: fixed rounds keep the whole file under ~2 minutes on 2 cores
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    record_rate(benchmark, flops=flops(lens, heads, head_dim, causal, mode))


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("kind", LENGTHS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("impl", IMPLS)
def test_varlen_attention_causal(benchmark, impl, model, kind, mode):
    _bench(benchmark, impl, kind, model, True, mode)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_varlen_attention_noncausal(benchmark, impl, mode):
    _bench(benchmark, impl, "lognormal", "B-text", False, mode)


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
@pytest.mark.parametrize("model", list(MODELS))
def test_varlen_attention_window_sweep(benchmark, model, block_m):
    _bench(benchmark, f"triton_bm{block_m}", "lognormal", model, True, "fwd")
