"""The transformer MLP, c_proj(GELU(c_fc(x))), with its GELU fused into the two matmuls next to it.

Why: in the H100 profile of the B/16 112 px / 16-token step at 0d6d817
(bench/results/nvidia-h100-80gb-hbm3-2026-11-26-0d6d817/profile.md) the GELU passes are the largest non-matmul work
left: the forward (torch) 3.2 ms and the backward (kernels.linear_gelu's, which also sums the c_fc bias gradient)
5.0 ms per step, each a pass over the (tokens x 3,072) hidden activations that the matmul beside it has just written:
- forward: cuBLAS writes h = x W1^T + b1, then GELU reads h and writes a. Here the matmul's epilogue adds b1 and
  writes h (which the backward needs) and a = GELU(h): the pass that re-reads h is gone.
- backward: cuBLAS writes dA = dY W2, then the GELU backward reads dA and h and writes dh = dA GELU'(h) and the
  column sums of dh (the c_fc bias gradient). Here the matmul's epilogue reads h, writes dh and the column sums of its
  tile: dA is never written or read back.
Saving nothing more than the unfused path (x, h, a), the rest stays torch's: y = a W2^T (+ b2), dW2 = dY^T a,
dX = dh W1, dW1 = dh^T x.

The matmul is one Triton kernel with two epilogues (BIAS_GELU, DGELU): tiles of BLOCK_M x BLOCK_N over K in steps of
BLOCK_K, grouped along M (GROUP_M) for L2 reuse; on sm_90 tl.dot issues wgmma. The c_fc bias gradient is deterministic:
each row of tiles writes its column sums into DB_PART[tile row], and a torch sum finishes them.

mlp(x, w1, b1, w2, b2=None): x (..., K), w1 (N, K), b1 (N,), w2 (K2, N), b2 (K2,) or None; on CUDA (impl="triton":
also under the interpreter). CPU tensors, autocast regions, mixed dtypes and torch.compile take the reference.

Measured (H100, triton 3.6, bench/results/nvidia-h100-80gb-hbm3-2026-11-26-f0bc99c): slower. Each Triton matmul, at
its best of five configs, took 1.4x (forward) and 1.2x (backward) the time of cuBLAS plus the separate GELU pass it
replaces, and the CUDA-graph step with it in every MLP went from 69.9 to 79.0 ms at B/16 112 px / 16 tokens and from
80.4 to 91.0 ms at L/16 96 px / 8 tokens. The bytes it saves are real; the matmul under them is not cuBLAS's. Hence
`CLIP.set_mlp("triton_gemm")` and `bench/throughput.py --kernels-mlp triton_gemm` only, for work on the matmul (TMA
loads, an epilogue overlapped with the next tile's main loop), not a trainer choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import cast_rtne, dot_prec, interpreting, mma, use_triton
from kernels.layer_norm import _rows, _sm_count

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _tile(tile_id, num_m, num_n, GROUP_M: tl.constexpr):
    """(row, column) of a tile, grouped along M: GROUP_M row tiles share each column block while it is in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile_id // per_group) * GROUP_M
    rows_here = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile_id % per_group) % rows_here, (tile_id % per_group) // rows_here


@triton.jit
def _gemm_gelu_tile(tile_id, A, B, BIAS, H, OUT, DB_PART, M, N, K, stride_am, stride_bk, stride_bn, stride_hm,
                    stride_om, DGELU: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
                    INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):  # fmt: skip
    """One output tile: acc = A[M, K] @ B[K, N] (fp32), then
    BIAS_GELU (DGELU=False): h = acc + BIAS, written to H, and GELU(h) to OUT;
    DGELU: dh = acc * GELU'(H), written to OUT, and the column sums of dh to DB_PART[tile row]."""
    pid_m, pid_n = _tile(tile_id, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # the tile's first row as a 64-bit scalar offset of each base pointer, the rest in 32-bit offsets within the tile:
    # a 64-bit offset per element costs two registers each, which the epilogue (64 elements per thread) cannot spare
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    A += row0 * stride_am
    H += row0 * stride_hm
    OUT += row0 * stride_om
    rl = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rl < M - pid_m * BLOCK_M
    n_ok = rn < N
    a_ptrs = A + rl[:, None] * stride_am + rk[None, :]
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_PREC, INTERP_BF16)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    mask = m_ok[:, None] & n_ok[None, :]
    if DGELU:
        h = tl.load(H + rl[:, None] * stride_hm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2))
        pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
        dh = acc * (cdf + h * pdf)  # 0 outside the mask (acc = 0 there)
        out = cast_rtne(dh, OUT.dtype.element_ty, INTERP_BF16)
        tl.store(OUT + rl[:, None] * stride_om + rn[None, :], out, mask=mask)
        tl.store(DB_PART + pid_m * N + rn, tl.sum(dh, axis=0), mask=n_ok)
    else:
        h = acc + tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        h = cast_rtne(h, H.dtype.element_ty, INTERP_BF16)
        tl.store(H + rl[:, None] * stride_hm + rn[None, :], h, mask=mask)
        hf = h.to(tl.float32)  # GELU of h as stored (rounded), as torch's GELU reads it
        a = 0.5 * hf * (1.0 + tl.math.erf(hf * _SQRT1_2))
        out = cast_rtne(a, OUT.dtype.element_ty, INTERP_BF16)
        tl.store(OUT + rl[:, None] * stride_om + rn[None, :], out, mask=mask)


@triton.jit
def _gemm_gelu_kernel(A, B, BIAS, H, OUT, DB_PART, M, N, K, stride_am, stride_bk, stride_bn, stride_hm, stride_om,
                      DGELU: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
                      PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):  # fmt: skip
    """_gemm_gelu_tile for tile program_id, or PERSISTENT: for tiles pid, pid + programs, ... in one loop that the
    compiler flattens and pipelines, so the next tile's loads overlap this one's epilogue."""
    if PERSISTENT:
        for tile_id in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), tl.num_programs(0),
                                flatten=True):  # fmt: skip
            _gemm_gelu_tile(tile_id, A, B, BIAS, H, OUT, DB_PART, M, N, K, stride_am, stride_bk, stride_bn, stride_hm,
                            stride_om, DGELU, EVEN_K, DOT_PREC, INTERP_BF16, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _gemm_gelu_tile(tl.program_id(0), A, B, BIAS, H, OUT, DB_PART, M, N, K, stride_am, stride_bk, stride_bn,
                        stride_hm, stride_om, DGELU, EVEN_K, DOT_PREC, INTERP_BF16, BLOCK_M, BLOCK_N, BLOCK_K,
                        GROUP_M)


def _config(m: int, n: int, k: int, dgelu: bool = False) -> dict:
    """The fastest of five configs in the H100 sweep at f0bc99c (bench/results/nvidia-h100-80gb-hbm3-2026-11-26-f0bc99c/
    sweep/sweep.md), at B/16's 51,200 x 768 -> 3,072 and L/16's 18,944 x 1,024 -> 4,096: forward 128 x 128 tiles over K
    in 64s, 8 warps, 3 stages, one persistent program per SM (0.78 and 0.46 ms); backward 64 x 128 tiles, 4 warps, 4
    stages, a program per tile (0.88 and 0.51 ms). cuBLAS and the separate GELU passes took 0.57 / 0.33 ms and
    0.76 / 0.42 ms: this kernel is the slower, hence opt-in. programs: per SM, each looping over tiles (0: one per
    tile)."""
    if dgelu:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4,
                "programs": 0}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3,
            "programs": 1}


def _launch(a, b, bias, h, out, db_part, dgelu: bool, cfg: dict | None = None):
    """(grid, runtime args, constexprs, launch options) for OUT = epilogue(a @ b); b is a (K, N) view (any strides,
    e.g. a weight's transpose)."""
    M, K = a.shape
    N = b.shape[1]
    cfg = dict(_config(M, N, K, dgelu) if cfg is None else cfg)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    args = dict(A=a, B=b, BIAS=bias if bias is not None else out, H=h, OUT=out,
                DB_PART=db_part if db_part is not None else out, M=M, N=N, K=K, stride_am=a.stride(0),
                stride_bk=b.stride(0), stride_bn=b.stride(1), stride_hm=h.stride(0), stride_om=out.stride(0))
    per_sm = cfg.pop("programs")
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    sms = _sm_count(a.device.index) if a.device.type == "cuda" else 1  # (the interpreter: per_sm programs in all)
    programs = tiles if per_sm == 0 else min(tiles, per_sm * sms)
    const = dict(DGELU=dgelu, EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PREC=dot_prec(a.dtype),
                 INTERP_BF16=interpreting() and a.dtype == torch.bfloat16, PERSISTENT=programs < tiles, **cfg)
    return (programs,), args, const, opts


def fc_gelu(x2, w1, b1, cfg=None):
    """(h, a) = (x2 w1^T + b1, GELU(h)) for x2 (M, K), w1 (N, K), b1 (N,), in one kernel."""
    M, N = x2.shape[0], w1.shape[0]
    h = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    a = torch.empty_like(h)
    grid, args, const, opts = _launch(x2, w1.t(), b1, h, a, None, False, cfg)
    _gemm_gelu_kernel[grid](**args, **const, **opts)
    return h, a


def dgelu_proj(dy2, w2, h, cfg=None):
    """(dh, db1) = ((dy2 w2) * GELU'(h), column sums) for dy2 (M, K2), w2 (K2, N), h (M, N); db1 fp32."""
    M, N = h.shape
    cfg = _config(M, N, dy2.shape[1], True) if cfg is None else cfg
    dh = torch.empty_like(h)
    db_part = torch.empty((triton.cdiv(M, cfg["BLOCK_M"]), N), dtype=torch.float32, device=h.device)
    grid, args, const, opts = _launch(dy2, w2, None, h, dh, db_part, True, cfg)
    _gemm_gelu_kernel[grid](**args, **const, **opts)
    return dh, db_part.sum(0)


class MLPFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        x2 = _rows(x)
        h, a = fc_gelu(x2, w1, b1.contiguous())  # the epilogue indexes b1 as B + columns
        ctx.save_for_backward(x2, w1, w2, h, a)
        ctx.has_b2 = b2 is not None
        return F.linear(a, w2, b2).view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, w1, w2, h, a = ctx.saved_tensors
        dy2 = _rows(dy)
        dh, db1 = dgelu_proj(dy2, w2, h)
        dx = (dh @ w1).view(*dy.shape[:-1], w1.shape[1]) if ctx.needs_input_grad[0] else None
        dw1 = dh.t() @ x2 if ctx.needs_input_grad[1] else None
        dw2 = dy2.t() @ a if ctx.needs_input_grad[3] else None
        db2 = dy2.sum(0) if ctx.has_b2 and ctx.needs_input_grad[4] else None
        return dx, dw1, db1.to(w1.dtype), dw2, db2


def mlp_ref(x, w1, b1, w2, b2=None):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def mlp(x, w1, b1, w2, b2=None, *, impl=None):
    """F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) with the GELU in the matmuls' epilogues (see the module
    docstring). x (..., K), w1 (N, K), b1 (N,), w2 (K2, N), b2 (K2,) or None -> (..., K2)."""
    if (w1.dim() != 2 or w2.dim() != 2 or b1 is None or b1.shape != (w1.shape[0],) or x.shape[-1] != w1.shape[1]
            or w2.shape[1] != w1.shape[0] or (b2 is not None and b2.shape != (w2.shape[0],))):  # fmt: skip
        raise ValueError(f"mlp needs x (..., K), w1 (N, K), b1 (N,), w2 (K2, N), b2 (K2,) or None, got "
                         f"{tuple(x.shape)}, {tuple(w1.shape)}, {None if b1 is None else tuple(b1.shape)}, "
                         f"{tuple(w2.shape)}, {None if b2 is None else tuple(b2.shape)}")
    # one dtype the tensor cores take (float64 would reach tl.dot and come back wrong)
    same = (x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.dtype == w1.dtype == b1.dtype == w2.dtype
            and (b2 is None or b2.dtype == x.dtype))
    if not use_triton(x, impl) or x.numel() == 0 or torch.is_autocast_enabled(x.device.type) or not same:
        return mlp_ref(x, w1, b1, w2, b2)
    return MLPFn.apply(x, w1, b1, w2, b2)
