"""AdamW over an fp32 master copy of a bf16 weight, one pass: the bf16 gradient is read and cast up, the fp32 master
and both moments are updated, and the master is rounded into the bf16 weight, all in one kernel.

Why: MasterAdamW (clipfast.optim, DeepSpeed's bf16 precision for one GPU) ran three passes on CUDA: the gradients cast
up into fp32 buffers (one copy per tensor), torch's fused AdamW over the masters, and a `_foreach_copy_` back into the
bf16 weights. That is 40 bytes per parameter: 2 + 4 for the cast, 4 x 4 read and 3 x 4 written by AdamW, then 4 + 2
for the copy down. This kernel moves 28: the bf16 gradient (2), the master and moments read and written (24), and the
bf16 weight (2). In the H100 profile of the L/16 96 px / 8-token step at 379f68a
(bench/results/nvidia-h100-80gb-hbm3-2026-11-26-379f68a/profile_l16/profile.md) the three passes took 2.6 ms (450
copies), 4.5 ms (AdamW) and 1.0 ms (the copy down) for 428M parameters; 28 bytes x 428M at ~3 TB/s is about 4 ms.

adamw_cast_(p, g, w, m, v, step, lr, *, weight_decay, beta1, beta2, eps, grad_scale=None) updates w, m, v and p in
place with torch.optim.AdamW's arithmetic (decoupled weight decay first, then lerp / addcmul for the moments, bias
corrections from `step`, a float32 tensor the caller has already incremented). `lr`, `step` and `grad_scale` are
device tensors the kernel reads when it runs, so a CUDA graph that captured it follows an LR schedule and its own
step count. grad_scale (optional): the gradient is divided by it, as torch's fused AdamW does for clipping.

Launch: one program per BLOCK = 2,048 elements (8 warps, 4 contiguous elements per thread and access); the scalar
inputs are loaded once per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cast_rtne, interpreting, use_triton

BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _adamw_cast_kernel(P, G, W, M, V, STEP, LR, GSCALE, n, weight_decay, beta1, beta2, eps,
                       HAS_GSCALE: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # [BLOCK // 4, 4]: rows of four, so that every load and store (bf16 and fp32 alike) gets four elements per thread
    # and one layout; a flat 2,048 gave the bf16 loads eight per thread and the fp32 stores four, and Triton moved
    # the three fp32 results through shared memory to store them
    offs = (tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK // 4)[:, None] * 4
            + tl.arange(0, 4)[None, :])
    mask = offs < n
    t = tl.load(STEP).to(tl.float32)
    lr = tl.load(LR).to(tl.float32)
    bc1 = 1.0 - tl.exp2(t * tl.log2(beta1))  # 1 - beta1^t
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2)))
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GSCALE:
        g = g / tl.load(GSCALE).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    w = w * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp_(g, 1 - beta1) for a weight below 0.5
    v = v * beta2 + (1.0 - beta2) * g * g
    w = w - (lr / bc1) * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    tl.store(W + offs, w, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    tl.store(P + offs, cast_rtne(w, P.dtype.element_ty, INTERP_BF16), mask=mask)  # the interpreter's cast truncates


def adamw_cast_ref(p, g, w, m, v, step, lr, *, weight_decay, beta1, beta2, eps, grad_scale=None):
    """The same update with torch ops (torch.optim.AdamW's single-tensor arithmetic), in place."""
    t = step.float()
    g = g.float() if grad_scale is None else g.float() / grad_scale
    w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - torch.pow(beta1, t)
    bc2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
    w.sub_(m / (v.sqrt() / bc2_sqrt + eps) * (lr / bc1))
    p.copy_(w)


def _launch(p, g, w, m, v, step, lr, grad_scale, weight_decay, beta1, beta2, eps, block=BLOCK, num_warps=NUM_WARPS):
    """(grid, runtime args, constexprs, launch options); block and num_warps: bench/sweep_kernels.py tries others."""
    n = w.numel()
    args = dict(P=p, G=g, W=w, M=m, V=v, STEP=step, LR=lr, GSCALE=step if grad_scale is None else grad_scale, n=n,
                weight_decay=float(weight_decay), beta1=float(beta1), beta2=float(beta2), eps=float(eps))
    const = dict(HAS_GSCALE=grad_scale is not None, INTERP_BF16=interpreting() and p.dtype == torch.bfloat16,
                 BLOCK=block)
    return (triton.cdiv(n, block),), args, const, {"num_warps": num_warps}


@torch.no_grad()
def adamw_cast_(p, g, w, m, v, step, lr, *, weight_decay: float, beta1: float, beta2: float, eps: float,
                grad_scale=None, impl=None) -> None:
    """One AdamW step of the fp32 master w (moments m, v) from the bf16 gradient g, rounded into the bf16 weight p; see
    the module docstring. p, g: bf16 or fp16; w, m, v: fp32; all contiguous with the same number of elements. step,
    lr (and grad_scale): one-element float tensors on the same device (step already counts this step)."""
    if not (w.dtype == m.dtype == v.dtype == torch.float32):
        raise ValueError(f"adamw_cast_ needs fp32 master and moments, got {w.dtype}, {m.dtype}, {v.dtype}")
    if not (p.numel() == g.numel() == w.numel() == m.numel() == v.numel()):
        raise ValueError(f"adamw_cast_ needs tensors of one size, got {p.numel()}, {g.numel()}, {w.numel()}, "
                         f"{m.numel()}, {v.numel()} elements")
    for name, t in (("step", step), ("lr", lr), ("grad_scale", grad_scale)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.numel() != 1 or t.device != w.device):
            raise ValueError(f"adamw_cast_: {name} must be a one-element tensor on {w.device}, got "
                             f"{t if not isinstance(t, torch.Tensor) else (tuple(t.shape), t.device)}")
    if not use_triton(w, impl) or w.numel() == 0:
        adamw_cast_ref(p, g, w, m, v, step, lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps,
                       grad_scale=grad_scale)
        return
    if not all(t.is_contiguous() for t in (p, g, w, m, v)):
        raise ValueError("adamw_cast_ needs contiguous tensors (the kernel reads them flat)")
    grid, args, const, opts = _launch(p, g, w, m, v, step, lr, grad_scale, weight_decay, beta1, beta2, eps)
    _adamw_cast_kernel[grid](**args, **const, **opts)
