"""LayerNorm over the last dim, forward and backward, with the weight and bias gradients in the same pass as dx.

Why: the H200 profile of a B/16 112 px / 16-token step (bench/results/nvidia-h200-2026-11-26-87ad763-ab/profile.md)
spends 12.4 of 85.3 ms in torch's layer norms, 6.6 ms of it in `GammaBetaBackward` (the weight and bias
gradients, a second pass over x and dy, at ~0.2 ms per 51,200 x 768 bf16 call where reading both takes ~0.04 ms).
Here the backward reads x and dy once: each program takes a contiguous run of rows, writes their dx and keeps
running fp32 sums of dy * x_hat and dy, then one row of partial dW / dB per program; a torch sum over the programs'
rows (a few MB at most) finishes them. No atomics: the result is the same on every run.
add_layer_norm (a pre-norm block's residual add and the norm after it) also takes the bias of the linear layer that
made the residual (rb): added in the forward pass, its gradient one more partial sum in the backward pass, so that
layer needs neither its bias epilogue nor torch's separate bias-gradient reduction (out_proj's and c_proj's: 48 of
the 73 bias-gradient sums that took 3.8 of 76.2 ms of device time per B/16 112 px step with the kernels on an H100,
bench/results/...-49ad34c/profile.md; the other 24 are the qkv projections').

Shapes: x (..., N) with a unit last stride, any float dtype; weight and bias (N,). y and dx come in x's dtype, dW and dB
in the weight's. Statistics and every sum in fp32. N up to 2,048, the widest tile the sm_90 compile test checks for
spills (one row's tile is held whole; the presets' widths are 384-1,664); wider rows, CPU tensors and autocast
regions take the reference. `layer_norm_ref` is F.layer_norm (upcast: in fp32).

Tiles: BLOCK_N = next_pow2(N), BLOCK_M rows per tile so a tile holds ~4K elements forward (B/16's 768: 4 rows) and ~2K
backward (2 rows), 4 warps each; chosen by an H100 sweep (bench/sweep_kernels.py, see _bwd_config).
Backward programs: 8 per SM on CUDA (rows split evenly, whole tiles each).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import finish_sums, use_triton

MAX_N = 2048


@triton.jit
def _layer_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, M, N, stride_x, stride_y, eps, R, S, stride_r, stride_s, RB,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RES: tl.constexpr,
                           HAS_RB: tl.constexpr):  # fmt: skip
    """y = LN(x); HAS_RES: s = x + r rounded to S's dtype (as torch's add), stored, and y = LN(s); HAS_RB: s = x + r +
    rb (rb (N,), the bias of the linear layer that produced r), summed in fp32 and rounded once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x + r
        if HAS_RB:
            x += tl.load(RB + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        s = x.to(S.dtype.element_ty)  # on a GPU round-to-nearest-even, as torch's add (triton 3.8's
        # interpreter truncates instead: tests/test_layer_norm.py allows it one ulp there)
        tl.store(S + r64 * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _layer_norm_bwd_kernel(X, W, DY, DX, MEAN, RSTD, PART, M, N, stride_x, stride_dy, stride_dx, stride_part,
                           rows_per_prog, DS, stride_ds, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           HAS_RES: tl.constexpr, HAS_RB: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """dx and one row of partial sums per program in PART (programs, 2 or 3, N): dW, dB and, HAS_RB, d rb (the sum of
    dx over the rows, in fp32 before dx's rounding); HAS_RES: dx += ds (the gradient that reached s = x + r directly).
    STAGES > 1: the row loop's loads run that many tiles ahead through shared memory (tl.range's pipeline, cp.async).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)  # (a tile's rows summed as they come: 128 -> 114 registers a thread
    db = tl.zeros([BLOCK_N], dtype=tl.float32)  # at B/16's width, sm_90, where (BLOCK_M, BLOCK_N) sums held 128)
    drb = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in tl.range(start, end, BLOCK_M, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy  # dy is 0 outside the mask
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_RES:
            dx += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        if HAS_RB:
            drb += tl.sum(dx, axis=0)  # rows past the end add 0; the masked columns are not stored
    part = PART + pid * stride_part + cols
    tl.store(part, dw, mask=cmask)
    tl.store(part + N, db, mask=cmask)
    if HAS_RB:
        tl.store(part + 2 * N, drb, mask=cmask)


def _config(n: int) -> dict:
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4 if block_m * block_n <= 4096 else 8}


def _bwd_config(n: int) -> dict:
    """Half the forward's rows per tile (~2K elements), the same warps. Measured on an H100 (bench/sweep_kernels.py,
    bench/results/nvidia-h100-80gb-hbm3-2026-11-26-dab88c7/sweep.md, add+LN backward with its finish): at B/16's
    51,200 x 768 0.166 ms against 0.248 ms for the earlier 4 rows and 8 warps (torch: 0.397 ms), at L/16's
    18,944 x 1,024 0.093 against 0.150 ms (torch: 0.178 ms); programs per SM 2-16 moved it by under 10%."""
    cfg = _config(n)
    return dict(cfg, BLOCK_M=max(1, cfg["BLOCK_M"] // 2))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# the backward's programs per SM on CUDA, and its row loop: 1 loads each tile after the one before it is done; 2 or 3
# pipeline the loads that many tiles ahead through shared memory (sm_90 compile at B/16's width: 108 registers and 12 /
# 24 KiB a program, against 114 and 4 KiB); 0 chooses (_bwd_stages). Read at each launch, so that `bench/throughput.py
# --knob layer_norm.PROGRAMS_PER_SM=8 layer_norm.BWD_STAGES=1` times the earlier defaults in a whole step.
# The H100 sweep at 5de47bf (bench/results/nvidia-h100-80gb-hbm3-2026-11-28-5de47bf/sweep/sweep.md, add+LN backward
# with its finish): B/16's 51,200 x 768 0.125 ms at 4 programs per SM and 3 stages against 0.171 ms at the earlier 8
# and 1; L/16's 18,944 x 1,024 0.082 ms at 4 and 1 against 0.086 (3 stages there: 0.087, its loop being short)
PROGRAMS_PER_SM = 4
BWD_STAGES = 0
PIPELINE_TILES = 32  # BWD_STAGES=0: 3 stages where a program's loop runs at least this many tiles, else 1


def _bwd_stages(rows: int, block_m: int) -> int:
    """The backward row loop's pipeline depth for programs of `rows` rows in tiles of block_m: BWD_STAGES, or where
    that is 0, 3 for loops of PIPELINE_TILES tiles or more (B/16 112 px: 49 tiles a program), else 1 (L/16 96 px:
    18; the pipeline's start and drain cost more than it hides there)."""
    if BWD_STAGES:
        return BWD_STAGES
    return 3 if triton.cdiv(rows, block_m) >= PIPELINE_TILES else 1


def _bwd_programs(m: int, block_m: int, device: torch.device, per_sm: int | None = None) -> tuple[int, int]:
    """(programs, rows per program): per_sm (default PROGRAMS_PER_SM) programs per SM on CUDA (4 under the
    interpreter), whole tiles each."""
    per_sm = PROGRAMS_PER_SM if per_sm is None else per_sm
    want = per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    rows = triton.cdiv(triton.cdiv(m, want), block_m) * block_m
    return triton.cdiv(m, rows), rows


def _fwd_launch(x2, w, b, y, mean, rstd, eps, r2=None, s=None, rb=None):
    """(grid, runtime args, constexprs, launch options) of the forward kernel; the AOT test compiles the same.
    r2, s: the residual input and the sum's output (add_layer_norm), else None; rb: r's bias, or None."""
    M, N = x2.shape
    cfg = _config(N)
    res = r2 is not None
    args = dict(X=x2, W=w, B=b, Y=y, MEAN=mean, RSTD=rstd, M=M, N=N, stride_x=x2.stride(0), stride_y=y.stride(0),
                eps=eps, R=r2 if res else x2, S=s if res else y, stride_r=r2.stride(0) if res else 0,
                stride_s=s.stride(0) if res else 0, RB=rb if rb is not None else w)  # fmt: skip
    const = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_RES=res, HAS_RB=rb is not None)
    return (triton.cdiv(M, cfg["BLOCK_M"]),), args, const, {"num_warps": cfg["num_warps"]}


def _bwd_launch(x2, w, dy2, dx, mean, rstd, part, rows, ds2=None):
    """(grid, runtime args, constexprs, launch options) of the backward kernel. part (programs, 2 or 3, N) fp32: the
    partial dW, dB and, with 3, the residual bias's gradient; ds2: the gradient to add into dx (add_layer_norm), else
    None."""
    M, N = x2.shape
    cfg = _bwd_config(N)
    res = ds2 is not None
    args = dict(X=x2, W=w, DY=dy2, DX=dx, MEAN=mean, RSTD=rstd, PART=part, M=M, N=N, stride_x=x2.stride(0),
                stride_dy=dy2.stride(0), stride_dx=dx.stride(0), stride_part=part.stride(0), rows_per_prog=rows,
                DS=ds2 if res else dy2, stride_ds=ds2.stride(0) if res else 0)  # fmt: skip
    const = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_RES=res, HAS_RB=part.shape[1] == 3,
                 STAGES=_bwd_stages(rows, cfg["BLOCK_M"]))
    return (part.shape[0],), args, const, {"num_warps": cfg["num_warps"]}


def _fwd(x2, w, b, eps, r2=None, rb=None):
    """(y, mean, rstd, s): s = x2 + r2 (+ rb) when r2 is given (y normalises s), else None."""
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    s = None if r2 is None else torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    mean = torch.empty(M, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    grid, args, const, opts = _fwd_launch(x2, w, b, y, mean, rstd, eps, r2, s, rb)
    _layer_norm_fwd_kernel[grid](**args, **const, **opts)
    return y, mean, rstd, s


def _bwd(dy2, x2, w, mean, rstd, ds2=None, rb=None):
    """(dx, dW, dB, d rb or None); the partial sums finish in one kernel (kernels._common.finish_sums)."""
    M, N = x2.shape
    progs, rows = _bwd_programs(M, _bwd_config(N)["BLOCK_M"], x2.device)
    dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    part = torch.empty((progs, 2 if rb is None else 3, N), dtype=torch.float32, device=x2.device)
    grid, args, const, opts = _bwd_launch(x2, w, dy2, dx, mean, rstd, part, rows, ds2)
    _layer_norm_bwd_kernel[grid](**args, **const, **opts)
    if rb is None or rb.dtype == w.dtype:
        sums = finish_sums(part, w.dtype)  # (2 or 3, N) in the weight's dtype
        return dx, sums[0], sums[1], None if rb is None else sums[2]
    sums = finish_sums(part, torch.float32)
    return dx, sums[0].to(w.dtype), sums[1].to(w.dtype), sums[2].to(rb.dtype)


def layer_norm_ref(x, weight, bias, eps: float = 1e-5, upcast: bool = False):
    """F.layer_norm over the last dim; upcast: computed in fp32, returned in x's dtype."""
    if upcast:
        return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


class LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2, weight, bias = _rows(x), weight.contiguous(), bias.contiguous()  # the kernels index (N,) as W + cols
        y, mean, rstd, _ = _fwd(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db, _ = _bwd(_rows(dy), x2, weight, mean, rstd)
        return dx.view(dy.shape), dw, db, None


class AddLayerNormFn(torch.autograd.Function):
    """(s, y) = (x + r (+ rb), LN(s)) in one pass; backward: dx = dr = ds + LN'(dy), and d rb = its sum over the rows,
    in one pass."""

    @staticmethod
    def forward(ctx, x, r, weight, bias, eps, rb):
        x2, r2 = (_rows(t) for t in (x, r))
        weight, bias, rb = (None if t is None else t.contiguous() for t in (weight, bias, rb))  # as LayerNormFn's
        y, mean, rstd, s = _fwd(x2, weight, bias, eps, r2, rb)
        ctx.save_for_backward(s, weight, mean, rstd, rb)
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds, dy):
        s2, weight, mean, rstd, rb = ctx.saved_tensors
        dx, dw, db, drb = _bwd(_rows(dy), s2, weight, mean, rstd, _rows(ds), rb)
        dx = dx.view(dy.shape)
        return dx, dx, dw, db, None, drb


def _rows(t):
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x, weight, bias, op="layer_norm"):
    if not x.is_floating_point():  # (the kernel would return an integer tensor where torch raises)
        raise TypeError(f"{op} needs a floating-point x, got {x.dtype}")
    N = x.shape[-1]
    if weight is None or bias is None or weight.shape != (N,) or bias.shape != (N,):
        raise ValueError(f"{op} needs weight and bias of shape ({N},) for x of shape {tuple(x.shape)}, got "
                         f"{None if weight is None else tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")  # fmt: skip


def _kernel_ok(x, impl) -> bool:
    # autocast: torch's rules (layer norm runs in fp32 there)
    return use_triton(x, impl) and x.shape[-1] <= MAX_N and x.numel() > 0 and not torch.is_autocast_enabled(
        x.device.type)


def layer_norm(x, weight, bias, eps: float = 1e-5, *, impl=None):
    """LayerNorm of x (..., N) over its last dim with weight and bias (N,) -> x's shape and dtype."""
    _check(x, weight, bias)
    if not _kernel_ok(x, impl):
        return layer_norm_ref(x, weight, bias, eps)
    return LayerNormFn.apply(x, weight, bias, float(eps))


def add_layer_norm_ref(x, r, weight, bias, eps: float = 1e-5, rb=None):
    s = x + (r if rb is None else r + rb)
    return s, F.layer_norm(s, s.shape[-1:], weight, bias, eps)


def fuses_add(x, r_dtype, impl=None) -> bool:
    """Whether add_layer_norm(x, r, ...) with an r of r_dtype runs the kernel (and so adds a residual bias rb in its
    pass: a caller can then leave the bias out of the linear layer that makes r, and its gradient's separate sum)."""
    return _kernel_ok(x, impl) and r_dtype == x.dtype


def add_layer_norm(x, r, weight, bias, eps: float = 1e-5, *, rb=None, impl=None):
    """(s, LayerNorm(s)) for s = x + r, both (..., N) of one shape: a pre-norm transformer's residual add and the next
    norm in one pass over x and r (the kernel writes s and y), and in one backward pass (dx = dr = ds + the norm's
    gradient, dW and dB as layer_norm's). rb (N,): s = x + r + rb, the bias of the linear layer that made r added
    here (in fp32, one rounding) and its gradient (the sum of dr over the rows) from the same backward pass. Same
    conditions for the kernel as layer_norm; dtypes of x and r that differ take the reference (torch's type
    promotion)."""
    _check(x, weight, bias, "add_layer_norm")
    if r.shape != x.shape:
        raise ValueError(f"add_layer_norm needs x and r of one shape, got {tuple(x.shape)} and {tuple(r.shape)}")
    if rb is not None and rb.shape != (x.shape[-1],):
        raise ValueError(f"add_layer_norm needs rb of shape ({x.shape[-1]},), got {tuple(rb.shape)}")
    if not fuses_add(x, r.dtype, impl):  # mixed dtypes: torch's type promotion, in the reference
        return add_layer_norm_ref(x, r, weight, bias, eps, rb)
    return AddLayerNormFn.apply(x, r, weight, bias, float(eps), rb)
