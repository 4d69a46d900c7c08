"""Microbenchmarks: masked patch embedding (gather kept patches + patch GEMM + bias + pos-embed), fwd and fwd+bwd.

    pytest bench/test_bench_patch_embed.py --benchmark-only [--benchmark-json bench/results/<file>.json]

Implementations:
  `triton`       kernels.masked_patch_embed (one kernel forward; dW+dbias, dpos kernels backward; dpos by atomics)
  `triton_det`   the same with deterministic=True (dpos by sorted segments, no atomics)
  `triton_u8`    the kernel on uint8 images with mean/std folded into its loads (the others start from images
                 already normalised to the compute dtype, so this case skips a conversion pass they do not pay)
  `conv_gather`  what open_clip does: conv1 over *all* patches, + pos_embed, then gather the kept rows
  `unfold_linear`  masked_patch_embed_ref: unfold -> gather kept rows -> linear (+ pos_embed[keep])
Models at 224 px: B/16 (D=768, p=16, 196 patches) and L/14 (D=1024, p=14, 256 patches); keep 25/50/100% of
patches (100% = keep=None, no gather). bias=None as in open_clip's conv1. TFLOP/s count the kept work only
(`flops`: 2*B*K*C*p*p*D forward, twice that for forward+backward: dW; images get no gradient), so
`conv_gather` is charged for embedding patches it drops. On CPU only `conv_gather` and `unfold_linear` run,
on a batch of 8 in float32; kernel cases skip with a reason. GPU: batch 256, bfloat16.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import DEVICE, record_rate, synced
from kernels.patch_embed import masked_patch_embed, masked_patch_embed_ref

MODELS = {"B/16": (768, 16), "L/14": (1024, 14)}  # width, patch size
RES = 224
BATCH = 256 if DEVICE == "cuda" else 8
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
KEEP = [0.25, 0.5, 1.0]
IMPLS = ["triton", "triton_det", "triton_u8", "conv_gather", "unfold_linear"]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def flops(B: int, K: int, cpp: int, D: int, mode: str) -> float:
    """Patch-GEMM FLOPs on kept patches; backward adds dW (same size), nothing for images."""
    return 2.0 * B * K * cpp * D * (2.0 if mode == "fwdbwd" else 1.0)


@functools.lru_cache(maxsize=2)
def _inputs(model: str, frac: float):
    D, p = MODELS[model]
    N = (RES // p) ** 2
    g = torch.Generator(device=DEVICE).manual_seed(0)
    u8 = torch.randint(0, 256, (BATCH, 3, RES, RES), generator=g, device=DEVICE, dtype=torch.uint8)
    mean, std = (torch.tensor(v, device=DEVICE)[:, None, None] for v in (MEAN, STD))
    images = ((u8.float() / 255 - mean) / std).to(DTYPE)
    keep = None
    if frac < 1.0:  # random subset per image (FLIP/CLIPA random masking), row order kept
        keep = torch.rand(BATCH, N, generator=g, device=DEVICE).argsort(1)[:, : round(frac * N)].sort(1).values
    weight = torch.randn(D, 3 * p * p, generator=g, device=DEVICE, dtype=DTYPE) * (3 * p * p) ** -0.5
    pos = torch.randn(N, D, generator=g, device=DEVICE, dtype=DTYPE) * 0.02
    return u8, images, keep, weight, pos, p


def _conv_gather(images, keep, weight, bias, pos, p):
    D = weight.shape[0]
    x = F.conv2d(images, weight.view(D, images.shape[1], p, p), bias, stride=p)  # (B, D, H/p, W/p)
    x = x.flatten(2).transpose(1, 2) + pos  # (B, N, D)
    if keep is None:
        return x
    return x.gather(1, keep[:, :, None].expand(-1, -1, D))  # (B, K, D)


def _skip_reason(impl: str) -> str | None:
    if impl.startswith("triton") and DEVICE != "cuda":
        return "Triton kernel cases need a GPU (the interpreter is for correctness, not speed)"
    return None


def _make_fn(impl, model, frac, mode):
    u8, images, keep, weight, pos, p = _inputs(model, frac)
    fwd = {
        "triton": lambda w, pos: masked_patch_embed(images, keep, w, None, pos, p, impl="triton"),
        "triton_det": lambda w, pos: masked_patch_embed(images, keep, w, None, pos, p, impl="triton",
                                                        deterministic=True),
        "triton_u8": lambda w, pos: masked_patch_embed(u8, keep, w, None, pos, p, impl="triton", mean=MEAN, std=STD,
                                                       out_dtype=DTYPE),
        "conv_gather": lambda w, pos: _conv_gather(images, keep, w, None, pos, p),
        "unfold_linear": lambda w, pos: masked_patch_embed_ref(images, keep, w, None, pos, p),
    }[impl]
    if mode == "fwd":
        return torch.no_grad()(lambda: fwd(weight, pos))
    params = [weight.detach().requires_grad_(), pos.detach().requires_grad_()]
    dout = torch.randn_like(fwd(*params))
    return lambda: torch.autograd.grad(fwd(*params), params, dout)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("frac", KEEP, ids=lambda f: f"keep{round(f * 100)}")
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_patch_embed(benchmark, impl, model, frac, mode):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    D, p = MODELS[model]
    N = (RES // p) ** 2
    K = N if frac == 1.0 else round(frac * N)
    fn = synced(_make_fn(impl, model, frac, mode))
    fn()  # compile / warm up outside the timing
    benchmark.group = f"patch-embed {mode} {model} keep{round(frac * 100)}%"
    benchmark.extra_info.update(impl=impl, model=model, batch=BATCH, kept=K, patches=N, dtype=str(DTYPE))
    benchmark(fn)
    record_rate(benchmark, flops=flops(BATCH, K, 3 * p * p, D, mode))
