"""Microbenchmarks: one optimizer step over a whole CLIP's parameters.

    pytest bench/test_bench_optim.py --benchmark-only [--benchmark-json bench/results/<file>.json]

Implementations (the same AdamW arithmetic, lr 1e-5, weight decay 0.1):
  `master_fused_cast`  clipfast.optim.MasterAdamW(fused_cast=True): bf16 weights, fp32 masters; per parameter one
                       compiled pass reads the bf16 gradient and writes the fp32 master, both moments and the bf16
                       weight (28 bytes per parameter). The CPU default.
  `master_unfused`     MasterAdamW(fused_cast=False): cast the gradients up, torch's fused AdamW on the masters, copy
                       them down (40 bytes per parameter). The CUDA default (also what DeepSpeed's bf16 mode does).
  `adamw_fp32`         torch's fused AdamW over fp32 weights and gradients (open_clip's optimizer; 28 bytes per
                       parameter), the baseline.
GB/s counts those bytes per parameter. Model: ViT-S/16 (62M parameters, 302 tensors) on CPU, ViT-B/16 (150M) on a
GPU. The compiled pass compiles in the untimed first call (seconds).
"""
import pytest
import torch

from bench.conftest import DEVICE, record_rate, synced
from clipfast.model import CLIP
from clipfast.optim import MasterAdamW
from clipfast.presets import from_name

MODEL = "ViT-B-16" if DEVICE == "cuda" else "ViT-S-16"
IMPLS = {"master_fused_cast": 28, "master_unfused": 40, "adamw_fp32": 28}  # bytes moved per parameter


def _make(impl: str):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = CLIP(from_name(MODEL))
    if impl == "adamw_fp32":
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True)
    else:
        params = list(model.to(torch.bfloat16).parameters())
        opt = MasterAdamW(params, lr=1e-5, weight_decay=0.1, fused=True, fused_cast=impl == "master_fused_cast")
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for p in params:  # gradients stay set: each timed call is one more step
        p.grad = torch.randn(p.shape, generator=g, device=DEVICE).to(p.dtype) * 1e-3
    return opt, sum(p.numel() for p in params)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_optimizer_step(benchmark, impl):
    opt, n = _make(impl)
    fn = synced(opt.step)
    fn()  # state allocation, compilation
    benchmark.group = f"optimizer step {MODEL}"
    benchmark.extra_info.update(impl=impl, model=MODEL, params=n)
    benchmark.pedantic(fn, rounds=5 if DEVICE == "cpu" else 20, iterations=1, warmup_rounds=1)
    record_rate(benchmark, nbytes=IMPLS[impl] * n)
