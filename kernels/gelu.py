"""A linear layer followed by GELU (exact, erf), whose backward computes the GELU gradient and the linear layer's bias
gradient in one pass.

Why: in the H200 profile of a B/16 112 px / 16-token step (bench/results/nvidia-h200-2026-11-26-87ad763-ab/profile.md)
torch's GELU backward takes 3.9 ms and the bias-gradient reductions 4.6 ms of 85.3 ms. The MLP's first bias gradient
is the largest of those sums: it reads the whole pre-activation gradient dh (51,200 x 3,072 bf16 per vision block)
again after GeluBackward wrote it. Here the kernel that writes dh also keeps fp32 column sums of it per program; a
torch sum over the programs' rows (a few hundred KB) finishes db. No atomics: the same result on every run.

linear_gelu(x, weight, bias) = F.gelu(F.linear(x, weight, bias)). Forward: torch's linear (cuBLAS, bias in its
epilogue) and torch's GELU, saving x and the pre-activation h as autograd would. Backward: the kernel reads dA and h,
writes dh = dA * GELU'(h) (fp32 math, as torch's GeluBackward) and the partial db; then dx = dh W and dW = dh^T x with
torch's matmuls. CPU tensors, autocast regions and torch.compile take the reference (F.linear then F.gelu).

Tiles: BLOCK_N = 64 columns by BLOCK_M = 16 rows, 8 warps, the fastest of 54 configs in an H100 sweep (see _config);
programs: the column blocks times enough row groups for ~16 programs per SM on CUDA, each row group a contiguous run
of rows (whole tiles).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import finish_sums, use_triton
from kernels.layer_norm import _rows, _sm_count

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # globals a @triton.jit reads must be constexpr
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_bwd_kernel(DA, H, DH, DB_PART, M, N, stride_da, stride_h, stride_dh, rows_per_prog,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """Program (column block, row group): dh = da * GELU'(h) for its tile run, and the column sums of dh (fp32) into
    DB_PART[row group]. STAGES > 1: the loads run that many tiles ahead through shared memory (tl.range's pipeline)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    cmask = cols < N
    start = g * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in tl.range(start, end, BLOCK_M, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        da = tl.load(DA + r64 * stride_da + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2))
        pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
        dh = da * (cdf + h * pdf)  # 0 outside the mask (da = 0 there)
        tl.store(DH + r64 * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        db += dh
    tl.store(DB_PART + g * N + cols, tl.sum(db, axis=0), mask=cmask)


# the row loop: 1 loads each tile after the one before it; 2 or 3 pipeline the loads that many tiles ahead (sm_90
# compile at B/16's 3,072: 40 or 32 registers and 4 or 8 KiB a program, against 32 and 2 KiB). Not yet timed on a
# GPU: bench/sweep_kernels.py --kernels gelu, and `bench/throughput.py --knob gelu.BWD_STAGES=2` in a whole step
BWD_STAGES = 1
# on CUDA, in all over the column blocks. 16 since 8abbd3e: the H100 sweep at 5de47bf timed the kernel with its
# finish at 0.3624 ms at B/16's 51,200 x 3,072 against 0.3653 ms at 8
# (bench/results/nvidia-h100-80gb-hbm3-2026-11-28-5de47bf/sweep/sweep.md), and two A/Bs of the whole graphed step at
# 8abbd3e put it 1.2% and 1.9% faster at B/16 112 px / 16 (IQRs 2.6-3.6 ms: within their noise), -0.7% and +0.1% at
# L/16 96 px / 8 (bench/results/nvidia-h100-80gb-hbm3-2026-11-28-8abbd3e/ab*.md)
PROGRAMS_PER_SM = 16


def _config() -> dict:
    """16 x 64 tiles, 8 warps: on an H100 (bench/sweep_kernels.py,
    bench/results/nvidia-h100-80gb-hbm3-2026-11-26-dab88c7/sweep.md) 0.367 ms at B/16's 51,200 x 3,072 against
    0.398 ms for the earlier 32 x 128 (torch's GeluBackward and bias sum: 0.437 ms), and 0.189 against 0.204 ms at
    L/16's 18,944 x 4,096 (torch: 0.231 ms)."""
    return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8}


def _row_groups(m: int, n: int, block_m: int, block_n: int, device: torch.device,
                per_sm: int | None = None) -> tuple[int, int]:
    """(row groups, rows per group): ~per_sm (default PROGRAMS_PER_SM) programs per SM in all on CUDA (4 row groups
    under the interpreter)."""
    per_sm = PROGRAMS_PER_SM if per_sm is None else per_sm
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        want = max(1, per_sm * sms // triton.cdiv(n, block_n))
    else:
        want = 4
    rows = triton.cdiv(triton.cdiv(m, want), block_m) * block_m
    return triton.cdiv(m, rows), rows


def _bwd_launch(da2, h2, dh, db_part, rows):
    """(grid, runtime args, constexprs, launch options) of the kernel (db_part's rows: the row groups)."""
    M, N = h2.shape
    cfg = _config()
    args = dict(DA=da2, H=h2, DH=dh, DB_PART=db_part, M=M, N=N, stride_da=da2.stride(0), stride_h=h2.stride(0),
                stride_dh=dh.stride(0), rows_per_prog=rows)  # fmt: skip
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), db_part.shape[0])
    return grid, args, dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], STAGES=BWD_STAGES), \
        {"num_warps": cfg["num_warps"]}


def gelu_bwd(da2, h2, db_dtype=torch.float32):
    """(dh, db) for GELU of the pre-activations h2 (M, N) under the gradient da2 (M, N); db (N,) in db_dtype (its
    row groups' partial sums finished by kernels._common.finish_sums)."""
    M, N = h2.shape
    cfg = _config()
    groups, rows = _row_groups(M, N, cfg["BLOCK_M"], cfg["BLOCK_N"], h2.device)
    dh = torch.empty((M, N), dtype=h2.dtype, device=h2.device)
    db_part = torch.empty((groups, N), dtype=torch.float32, device=h2.device)
    grid, args, const, opts = _bwd_launch(da2, h2, dh, db_part, rows)
    _gelu_bwd_kernel[grid](**args, **const, **opts)
    return dh, finish_sums(db_part, db_dtype)


class LinearGELUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = _rows(x)
        h = F.linear(x2, weight, bias)
        ctx.save_for_backward(x2, weight, h)
        return F.gelu(h).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, da):
        x2, weight, h = ctx.saved_tensors
        dh, db = gelu_bwd(_rows(da), h, weight.dtype)
        dx = (dh @ weight).view(*da.shape[:-1], weight.shape[1]) if ctx.needs_input_grad[0] else None
        dw = dh.t() @ x2 if ctx.needs_input_grad[1] else None
        return dx, dw, db


def linear_gelu_ref(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias))


def linear_gelu(x, weight, bias, *, impl=None):
    """F.gelu(F.linear(x, weight, bias)) for x (..., K), weight (N, K), bias (N,) -> (..., N); on CUDA (impl="triton":
    also under the interpreter) its backward computes dh and db in one kernel pass. See the module docstring."""
    if weight.dim() != 2 or bias is None or bias.shape != (weight.shape[0],) or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_gelu needs x (..., K), weight (N, K) and bias (N,), got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}")  # fmt: skip
    if (not use_triton(x, impl) or x.numel() == 0 or torch.is_autocast_enabled(x.device.type)
            or not (x.dtype == weight.dtype == bias.dtype)):  # fmt: skip
        return linear_gelu_ref(x, weight, bias)
    return LinearGELUFn.apply(x, weight, bias)
