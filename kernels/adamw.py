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
def _adamw_cast_block(P, G, W, M, V, STEP, LR, GSCALE, n, blk, weight_decay, beta1, beta2, eps,
                      HAS_GSCALE: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Block `blk` (BLOCK elements) of one tensor's update."""
    # [BLOCK // 4, 4]: rows of four, so that every load and store (bf16 and fp32 alike) gets four elements per thread
    # and one layout; a flat 2,048 gave the bf16 loads eight per thread and the fp32 stores four, and Triton moved
    # the three fp32 results through shared memory to store them
    offs = (blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :])
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


@triton.jit
def _adamw_cast_kernel(P, G, W, M, V, STEP, LR, GSCALE, n, weight_decay, beta1, beta2, eps,
                       HAS_GSCALE: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    _adamw_cast_block(P, G, W, M, V, STEP, LR, GSCALE, n, tl.program_id(0), weight_decay, beta1, beta2, eps,
                      HAS_GSCALE, INTERP_BF16, BLOCK)  # fmt: skip


SLOTS = 8  # tensors per launch of _adamw_cast_multi_kernel (adamw_cast_multi_); 1: one launch per tensor
# the sizes and block offsets vary per tensor: not specialised (a value of 1 or a multiple of 16 would each compile
# a kernel of their own)
_SLOT_INTS = [f"N{k}" for k in range(8)] + [f"C{k}" for k in range(1, 8)]


@triton.jit(do_not_specialize=_SLOT_INTS)
def _adamw_cast_multi_kernel(
    P0, G0, W0, M0, V0, S0, N0, P1, G1, W1, M1, V1, S1, N1, P2, G2, W2, M2, V2, S2, N2,
    P3, G3, W3, M3, V3, S3, N3, P4, G4, W4, M4, V4, S4, N4, P5, G5, W5, M5, V5, S5, N5,
    P6, G6, W6, M6, V6, S6, N6, P7, G7, W7, M7, V7, S7, N7, C1, C2, C3, C4, C5, C6, C7,
    LR, GSCALE, weight_decay, beta1, beta2, eps,
    HAS_GSCALE: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Up to eight tensors in one launch: tensor k (P_k, G_k, W_k, M_k, V_k, its step count S_k, N_k elements) takes
    the programs C_k <= pid < C_k+1 (C_0 = 0, C_8 = the grid); a slot left empty has C_k = C_k+1."""
    pid = tl.program_id(0)
    if pid < C1:
        _adamw_cast_block(P0, G0, W0, M0, V0, S0, LR, GSCALE, N0, pid, weight_decay, beta1, beta2, eps,
                          HAS_GSCALE, INTERP_BF16, BLOCK)  # fmt: skip
    elif pid < C2:
        _adamw_cast_block(P1, G1, W1, M1, V1, S1, LR, GSCALE, N1, pid - C1, weight_decay, beta1, beta2, eps,
                          HAS_GSCALE, INTERP_BF16, BLOCK)  # fmt: skip
    elif pid < C3:
        _adamw_cast_block(P2, G2, W2, M2, V2, S2, LR, GSCALE, N2, pid - C2, weight_decay, beta1, beta2, eps,
                          HAS_GSCALE, INTERP_BF16, BLOCK)  # fmt: skip
    elif pid < C4:
        _adamw_cast_block(P3, G3, W3, M3, V3, S3, LR, GSCALE, N3, pid - C3, weight_decay, beta1, beta2, eps,
                          HAS_GSCALE, INTERP_BF16, BLOCK)  # fmt: skip
    elif pid < C5:
        _adamw_cast_block(P4, G4, W4, M4, V4, S4, LR, GSCALE, N4, pid - C4, weight_decay, beta1, beta2, eps,
                          HAS_GSCALE, INTERP_BF16, BLOCK)  # fmt: skip
    elif pid < C6:
        _adamw_cast_block(P5, G5, W5, M5, V5, S5, LR, GSCALE, N5, pid - C5, weight_decay, beta1, beta2, eps,
                          HAS_GSCALE, INTERP_BF16, BLOCK)  # fmt: skip
    elif pid < C7:
        _adamw_cast_block(P6, G6, W6, M6, V6, S6, LR, GSCALE, N6, pid - C6, weight_decay, beta1, beta2, eps,
                          HAS_GSCALE, INTERP_BF16, BLOCK)  # fmt: skip
    else:
        _adamw_cast_block(P7, G7, W7, M7, V7, S7, LR, GSCALE, N7, pid - C7, weight_decay, beta1, beta2, eps,
                          HAS_GSCALE, INTERP_BF16, BLOCK)  # fmt: skip


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


def _multi_launch(tensors, lr, grad_scale, weight_decay, beta1, beta2, eps, block=BLOCK, num_warps=NUM_WARPS):
    """(grid, runtime args, constexprs, launch options) of _adamw_cast_multi_kernel for 1-8 tensors, each a tuple
    (p, g, w, m, v, step); the empty slots repeat the first tensor with no programs."""
    if not 1 <= len(tensors) <= 8:
        raise ValueError(f"_adamw_cast_multi_kernel takes 1 to 8 tensors, got {len(tensors)}")
    args, start = {}, 0
    for k in range(8):
        p, g, w, m, v, step = tensors[k] if k < len(tensors) else tensors[0]
        n = w.numel() if k < len(tensors) else 0
        if k:
            args[f"C{k}"] = start
        args.update({f"P{k}": p, f"G{k}": g, f"W{k}": w, f"M{k}": m, f"V{k}": v, f"S{k}": step, f"N{k}": n})
        start += triton.cdiv(n, block)
    p0 = tensors[0][0]
    args.update(LR=lr, GSCALE=tensors[0][5] if grad_scale is None else grad_scale, weight_decay=float(weight_decay),
                beta1=float(beta1), beta2=float(beta2), eps=float(eps))
    const = dict(HAS_GSCALE=grad_scale is not None, INTERP_BF16=interpreting() and p0.dtype == torch.bfloat16,
                 BLOCK=block)
    return (start,), args, const, {"num_warps": num_warps}


def _launch(p, g, w, m, v, step, lr, grad_scale, weight_decay, beta1, beta2, eps, block=BLOCK, num_warps=NUM_WARPS):
    """(grid, runtime args, constexprs, launch options); block and num_warps: bench/sweep_kernels.py tries others."""
    n = w.numel()
    args = dict(P=p, G=g, W=w, M=m, V=v, STEP=step, LR=lr, GSCALE=step if grad_scale is None else grad_scale, n=n,
                weight_decay=float(weight_decay), beta1=float(beta1), beta2=float(beta2), eps=float(eps))
    const = dict(HAS_GSCALE=grad_scale is not None, INTERP_BF16=interpreting() and p.dtype == torch.bfloat16,
                 BLOCK=block)
    return (triton.cdiv(n, block),), args, const, {"num_warps": num_warps}


def _check(p, g, w, m, v, step, lr, grad_scale, name="adamw_cast_"):
    if not (w.dtype == m.dtype == v.dtype == torch.float32):
        raise ValueError(f"{name} needs fp32 master and moments, got {w.dtype}, {m.dtype}, {v.dtype}")
    if not (p.numel() == g.numel() == w.numel() == m.numel() == v.numel()):
        raise ValueError(f"{name} needs tensors of one size, got {p.numel()}, {g.numel()}, {w.numel()}, "
                         f"{m.numel()}, {v.numel()} elements")
    for what, t in (("step", step), ("lr", lr), ("grad_scale", grad_scale)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.numel() != 1 or t.device != w.device):
            raise ValueError(f"{name}: {what} must be a one-element tensor on {w.device}, got "
                             f"{t if not isinstance(t, torch.Tensor) else (tuple(t.shape), t.device)}")


@torch.no_grad()
def adamw_cast_(p, g, w, m, v, step, lr, *, weight_decay: float, beta1: float, beta2: float, eps: float,
                grad_scale=None, impl=None) -> None:
    """One AdamW step of the fp32 master w (moments m, v) from the bf16 gradient g, rounded into the bf16 weight p; see
    the module docstring. p, g: bf16 or fp16; w, m, v: fp32; all contiguous with the same number of elements. step,
    lr (and grad_scale): one-element float tensors on the same device (step already counts this step)."""
    _check(p, g, w, m, v, step, lr, grad_scale)
    if not use_triton(w, impl) or w.numel() == 0:
        adamw_cast_ref(p, g, w, m, v, step, lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps,
                       grad_scale=grad_scale)
        return
    if not all(t.is_contiguous() for t in (p, g, w, m, v)):
        raise ValueError("adamw_cast_ needs contiguous tensors (the kernel reads them flat)")
    grid, args, const, opts = _launch(p, g, w, m, v, step, lr, grad_scale, weight_decay, beta1, beta2, eps)
    _adamw_cast_kernel[grid](**args, **const, **opts)


@torch.no_grad()
def adamw_cast_multi_(tensors, lr, *, weight_decay: float, beta1: float, beta2: float, eps: float, grad_scale=None,
                      impl=None, slots: int | None = None) -> None:
    """adamw_cast_ for many tensors that share the hyper-parameters: `tensors` a list of (p, g, w, m, v, step), each as
    adamw_cast_ takes them. The Triton path launches `slots` (default SLOTS, at most 8) tensors per kernel, so that
    the small ones (biases, norms: 201 of ViT-B/16's 302 tensors have under 64K elements) share launches instead of
    each paying a launch and a mostly idle GPU; slots=1 is one adamw_cast_ launch per tensor."""
    slots = SLOTS if slots is None else slots
    if not 1 <= slots <= 8:
        raise ValueError(f"adamw_cast_multi_: slots must be 1 to 8, got {slots}")
    tensors = [t for t in tensors if t[2].numel()]
    for t in tensors:
        _check(*t, lr, grad_scale, name="adamw_cast_multi_")
    if not tensors:
        return
    hp = dict(weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, grad_scale=grad_scale)
    if slots == 1 or not use_triton(tensors[0][2], impl):
        for p, g, w, m, v, step in tensors:
            adamw_cast_(p, g, w, m, v, step, lr, **hp, impl=impl)
        return
    if not all(x.is_contiguous() for t in tensors for x in t[:5]):
        raise ValueError("adamw_cast_multi_ needs contiguous tensors (the kernel reads them flat)")
    if len({t[0].dtype for t in tensors}) > 1:
        raise ValueError(f"adamw_cast_multi_ needs one weight dtype, got {sorted({str(t[0].dtype) for t in tensors})}")
    for i in range(0, len(tensors), slots):
        grid, args, const, opts = _multi_launch(tensors[i:i + slots], lr, grad_scale, weight_decay, beta1, beta2, eps)
        _adamw_cast_multi_kernel[grid](**args, **const, **opts)
