"""Microbenchmarks: one optimizer step over a whole CLIP's parameters.

    pytest bench/test_bench_optim.py --benchmark-only [--benchmark-json bench/results/<file>.json]

Implementations (the same AdamW arithmetic, lr 1e-5, weight decay 0.1):
  `master_fused_cast`  clipfast.optim.MasterAdamW(fused_cast=True): bf16 weights, fp32 masters; per parameter one
                       pass reads the bf16 gradient and writes the fp32 master, both moments and the bf16 weight (28
                       bytes per parameter): a compiled pass on the CPU (its default there on one thread), the
                       Triton kernel kernels.adamw on CUDA (its default for the CUDA-graph step).
  `master_fused_cast_x1`  (CUDA) the same kernel launched once per parameter (kernels.adamw.SLOTS = 1), as before
                       a launch took eight parameters: what grouping the small tensors saves.
  `master_unfused`     MasterAdamW(fused_cast=False): cast the gradients up, torch's fused AdamW on the masters, copy
                       them down (40 bytes per parameter). The eager CUDA default (also what DeepSpeed's bf16 mode
                       does), and the CUDA-graph step's before kernels.adamw.
  `adamw_fp32`         torch's fused AdamW over fp32 weights and gradients (open_clip's optimizer; 28 bytes per
                       parameter), the baseline.
GB/s counts those bytes per parameter. Model: ViT-S/16 (62M parameters, 302 tensors) on CPU, ViT-B/16 (150M) on a
GPU. On CUDA each optimizer is built capturable and its step is timed as a replayed CUDA graph, as the CUDA-graph
training step (clipfast.graph) runs it: an eager step would time the Python launches of one kernel per parameter
instead. The compiled pass compiles in the untimed first call (seconds).
"""
import pytest
import torch

from bench.conftest import DEVICE, record_rate, synced
from clipfast.graph import lr_on_device
from clipfast.model import CLIP
from clipfast.optim import MasterAdamW
from clipfast.presets import from_name

MODEL = "ViT-B-16" if DEVICE == "cuda" else "ViT-S-16"
IMPLS = {"master_fused_cast": 28, "master_unfused": 40, "adamw_fp32": 28}  # bytes moved per parameter
if DEVICE == "cuda":  # on the CPU the fused step is a compiled pass, not the Triton kernel: nothing to group
    IMPLS["master_fused_cast_x1"] = 28


def _make(impl: str):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = CLIP(from_name(MODEL))
    kw = dict(lr=1e-5, weight_decay=0.1, fused=True, capturable=DEVICE == "cuda")
    if impl == "adamw_fp32":
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, **kw)
    else:
        params = list(model.to(torch.bfloat16).parameters())
        opt = MasterAdamW(params, fused_cast=impl.startswith("master_fused_cast"), **kw)
    if DEVICE == "cuda":
        lr_on_device(opt, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for p in params:  # gradients stay set: each timed call is one more step
        p.grad = torch.randn(p.shape, generator=g, device=DEVICE).to(p.dtype) * 1e-3
    return opt, sum(p.numel() for p in params)


def _graphed(step):
    """step() captured as a CUDA graph (after one eager call on a side stream: state allocation, compilation); the
    returned function replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@pytest.mark.parametrize("impl", list(IMPLS))
def test_optimizer_step(benchmark, impl, monkeypatch):
    if impl.endswith("_x1"):
        from kernels import adamw as ad

        monkeypatch.setattr(ad, "SLOTS", 1)  # read when the step is captured
    opt, n = _make(impl)
    fn = synced(_graphed(opt.step) if DEVICE == "cuda" else opt.step)
    fn()  # state allocation, compilation
    benchmark.group = f"optimizer step {MODEL}"
    benchmark.extra_info.update(impl=impl, model=MODEL, params=n)
    benchmark.pedantic(fn, rounds=5 if DEVICE == "cpu" else 20, iterations=1, warmup_rounds=1)
    record_rate(benchmark, nbytes=IMPLS[impl] * n)
