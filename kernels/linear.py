"""Column sums of a (rows x columns) gradient in one Triton pass, and a linear layer whose bias gradient they make.

Why: torch sums a bias gradient (dy.sum(0) in F.linear's backward) with its generic reduction, which on the H100
takes ~0.05 ms a call over a few tens of MB (bench/results/nvidia-h100-80gb-hbm3-2026-11-28-5de47bf/profile_l16:
`reduce_kernel<..., ReduceOp<c10::BFloat16, ...` 15 calls, 0.75 ms per L/16 96 px / 8-token step), where reading
them takes ~0.01 ms. Counting torch's sums in a tiny model's step with every clipfast kernel on (under the
interpreter) accounts for those 15 as 12 text-tower qkv-bias gradients (packed captions: the varlen attention does
not add that bias inside its kernel, as kernels.short_attention does for the image tower), the image tower's
position-embedding gradient (kernels.masked_patch_embed with no patch dropped: a sum over the batch), the class
embedding's and the text tower's last c_proj bias's (small; left to torch). The first 13 are column sums here.

column_sums(x2, dtype): x2 (M, N), any float dtype, unit column stride -> (N,) in `dtype`. Programs (column block,
row group; kernels.gelu's row split), ~PROGRAMS_PER_SM in all per SM on CUDA: each sums its run of rows in fp32
into one row of partial sums, which kernels._common.finish_sums adds in a fixed order (no atomics: the same bits on
every run). CPU tensors (not interpreted) take x2.sum(0, dtype=float32).to(dtype), torch's own.

linear_bias(x, weight, bias) = F.linear(x, weight, bias): the forward is F.linear (cuBLAS, the bias in its
epilogue); the backward makes dx = dy W and dW = dy^T x with torch's matmuls, as autograd does for F.linear, and the
bias gradient with column_sums (once differentiable: a double backward is an error, not a bias gradient without its
own). CPU tensors, autocast regions, float64, empty weights and torch.compile take F.linear.

Tiles: BLOCK_M x BLOCK_N = 32 x 128 (8 KiB of bf16 a load), 4 warps; PROGRAMS_PER_SM 8. Chosen from arithmetic, not
yet from GPU timings (bench/sweep_kernels.py --kernels colsum times it against torch's sum).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import finish_sums, use_triton
from kernels.gelu import _row_groups
from kernels.layer_norm import _rows

BLOCK_M, BLOCK_N, NUM_WARPS = 32, 128, 4
PROGRAMS_PER_SM = 8  # on CUDA, over all column blocks and row groups
SUMS = "triton"  # "torch": column_sums is x2.sum(0) (`bench/throughput.py --knob linear.SUMS=torch` times the step)


@triton.jit
def _column_part_kernel(X, PART, M, N, stride_x, rows_per_prog, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (column block, row group g): PART[g, cols] = the fp32 sum of X[rows of g, cols]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    cmask = cols < N
    start = g * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & cmask[None, :]
        acc += tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(PART + g * N + cols, tl.sum(acc, axis=0), mask=cmask)


def _launch(x2, part, rows, block_m=BLOCK_M, block_n=BLOCK_N, num_warps=NUM_WARPS):
    """(grid, runtime args, constexprs, launch options) of _column_part_kernel (part's rows: the row groups)."""
    M, N = x2.shape
    args = dict(X=x2, PART=part, M=M, N=N, stride_x=x2.stride(0), rows_per_prog=rows)
    return (triton.cdiv(N, block_n), part.shape[0]), args, dict(BLOCK_M=block_m, BLOCK_N=block_n), \
        {"num_warps": num_warps}


def column_sums(x2: torch.Tensor, dtype: torch.dtype | None = None, *, impl=None, **cfg) -> torch.Tensor:
    """x2 (M, N) -> its sum over the rows, (N,) in `dtype` (default x2's), accumulated in fp32 and rounded once.
    cfg: block_m, block_n, num_warps, per_sm (the sweep's); the defaults are the module's."""
    if x2.dim() != 2:
        raise ValueError(f"column_sums needs a 2-D (rows, columns) tensor, got shape {tuple(x2.shape)}")
    dtype = x2.dtype if dtype is None else dtype
    M, N = x2.shape
    if not use_triton(x2, impl) or M == 0 or N == 0 or SUMS == "torch":
        return x2.sum(0, dtype=torch.float32).to(dtype)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    block_m, block_n = cfg.get("block_m", BLOCK_M), cfg.get("block_n", BLOCK_N)
    per_sm = cfg.get("per_sm") or PROGRAMS_PER_SM  # (read at each call: the --knob)
    groups, rows = _row_groups(M, N, block_m, block_n, x2.device, per_sm)
    part = torch.empty((groups, N), dtype=torch.float32, device=x2.device)
    grid, args, const, opts = _launch(x2, part, rows, block_m, block_n, cfg.get("num_warps", NUM_WARPS))
    _column_part_kernel[grid](**args, **const, **opts)
    return finish_sums(part, dtype)


class LinearBiasFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = _rows(x)
        ctx.save_for_backward(x2, weight)
        return F.linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's bias gradient has no graph: a double backward says so
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy2 = _rows(dy)
        dx = (dy2 @ weight).view(*dy.shape[:-1], weight.shape[1]) if ctx.needs_input_grad[0] else None
        dw = dy2.t() @ x2 if ctx.needs_input_grad[1] else None
        db = column_sums(dy2, weight.dtype, impl="triton") if ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear_bias(x, weight, bias, *, impl=None):
    """F.linear(x, weight, bias) for x (..., K), weight (N, K), bias (N,) -> (..., N); on CUDA (impl="triton": also
    under the interpreter) its backward sums the bias gradient with column_sums. See the module docstring."""
    if weight.dim() != 2 or bias is None or bias.shape != (weight.shape[0],) or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_bias needs x (..., K), weight (N, K) and bias (N,), got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}")  # fmt: skip
    if (not use_triton(x, impl) or x.numel() == 0 or weight.numel() == 0 or torch.is_autocast_enabled(x.device.type)
            or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)  # fp32 sums: float64 keeps torch's
            or not (x.dtype == weight.dtype == bias.dtype) or torch.compiler.is_compiling()):  # fmt: skip
        return F.linear(x, weight, bias)
    return LinearBiasFn.apply(x, weight, bias)

