"""Packed (varlen) attention, forward and backward, built for short sequences (captions of 2-77 tokens).

Shapes: q, k, v (T_total, H, d) with token/head strides free and the last dim contiguous; cu_seqlens (S+1,)
int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T_total exactly, never decreasing (the flash-attn varlen layout; checked
where cu_seqlens is on the host; on the device a bad one gives wrong numbers but no access outside the tensors).
Output (T_total, H, d).
dtypes fp16 / bf16 (fp32 too: exact-ish `ieee` dots, for interpreter tests). Head dims up to 128 tested
(32, 64, 80, 96, 128); a head dim that is not a power of two is padded to the next one with masked loads.
Causal or not; any lengths, including 1 and lengths that are not a multiple of the block. No host-device
sync: the launcher uses only python ints (T_total, S) and device tensors; max_seqlen is for the reference.

Scheduling: windows of packed tokens, not one program per sequence.
    The grid is (cdiv(T_total, BLOCK_M), H). A program takes BLOCK_M consecutive packed query rows - the
    tail of one caption, a few whole captions, the head of the next - and loops over the keys from the
    start of its first row's sequence to its last row's end (causal: to its last row), BLOCK_N at a time.
    A block-diagonal mask keeps each row inside its own sequence: per token we precompute the [lo, hi)
    token range of its sequence (one small kernel over cu_seqlens), so the mask is two compares per score
    (+1 for causal) and needs no per-key loads. Work per real row is about BLOCK_M + (overhang into the
    previous sequence) keys whatever the length mix, where a per-sequence grid does BLOCK_M^2 / len.
    Useful fraction of the score tiles, simulated for 4096 captions (log-normal, median 12, clipped to
    [2, 77]; mean 14.2, max 77) and counted as sum(len^2) / computed entries (causal: sum(len(len+1)/2)):
        per-sequence grid, BLOCK_M = next_pow2(max_seqlen) = 128:  causal 1%,  full 2%   (4096 programs/head)
        per-sequence grid, 16 x 16 blocks:                          causal 33%, full 51%  (5542 programs/head)
        token windows 32 x 32 (this kernel's pick for that mix):    causal 17%, full 29%  (1822 programs/head)
        token windows 16 x 16:                                      causal 31%, full 47%  (3643 programs/head)
    A 12-token caption alone in a 128-row tile uses 12*12/128^2 < 1% of it. Windows keep waste bounded by the
    window size, not by the longest caption in the batch, and each K/V row is read ~1.3x (the overhang).
    Why not the smallest tiles: at d=64 a row computes 4*d*keys FLOPs against 8*d bytes (q, k, v, o in 16-bit),
    so the kernel stays memory-bound up to ~360 keys per row on an H100 (~600 TFLOP/s mma / 3.35 TB/s); a few
    wasted keys cost nothing, while each program has a fixed cost (bounds, loads of lo/hi, epilogue) and
    16-row tiles run one warp each. So BLOCK_M = next_pow2(2 * mean_len) clamped to [16, 128], with
    mean_len = T_total / S (python ints, no sync): a window holds ~2-4 sequences and computes ~2-3x mean_len
    keys per row (log-normal mix -> 32; all-77 -> 128; all-8 -> 16). BLOCK_N = min(BLOCK_M, 64).
    These are choices from arithmetic, not yet from GPU timings: bench/test_bench_varlen_attention.py sweeps
    BLOCK_M on the log-normal mix so the rule can be re-tuned from measured numbers.

Backward: a preprocess kernel delta = rowsum(dO * O); then one kernel per token window (grid (cdiv(T, 64), H))
computes dK, dV for its key window (looping over the query rows that can see it) and dQ for its query window
(looping over keys), recomputing P from the saved log-sum-exp (base 2, of the scaled scores). No atomics.
The backward window does not follow BLOCK_M: it holds k, v, dk, dv for the window, so its limit is registers.
sm_90 bf16 compiles of the variants (kernels.aot; tests/test_aot_varlen_attention.py keeps the chosen ones),
registers x threads / window rows, lower = more rows in flight per SM: d=64: WIN 16 (1 warp) 366,
WIN 32/STEP 16 (2 warps) 332, WIN 64/STEP 16 (4 warps) 254; d=128: WIN 16 and 32 with 1-2 warps spill
(272-280 B), WIN 32/STEP 16 (4 warps) 672, WIN 64/STEP 32 (8 warps) 760 with wgmma. Picked: WIN 64 with
STEP 16 / 4 warps for d <= 64, STEP 32 / 8 warps above.
Backward does ~2.5x the forward FLOPs per score on ~2x the bytes, still below the ridge at 64 + overhang keys.
"""
import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import use_triton

_LOG2E = 1.4426950408889634


@triton.jit
def _seq_bounds_kernel(CU, LO, HI, S, T, BLOCK: tl.constexpr):
    """Per token: the [lo, hi) token range of its sequence. Grid (S + 1,). Bounds clamped to [0, T], and program S
    gives tokens outside every sequence (before cu[0], from cu[S]) the empty range [t, t): a cu_seqlens that breaks
    the layout gives wrong numbers for those tokens, never a read or write outside the tensors."""
    s = tl.program_id(0)
    if s < S:
        a = tl.minimum(tl.maximum(tl.load(CU + s), 0), T)
        b = tl.minimum(tl.maximum(tl.load(CU + s + 1), a), T)
        for start in range(a, b, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < b
            tl.store(LO + offs, tl.zeros([BLOCK], tl.int32) + a, mask=ok)
            tl.store(HI + offs, tl.zeros([BLOCK], tl.int32) + b, mask=ok)
    else:
        head = tl.minimum(tl.maximum(tl.load(CU), 0), T)
        tail = tl.minimum(tl.maximum(tl.load(CU + S), head), T)
        for start in range(0, head, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(LO + offs, offs, mask=offs < head)
            tl.store(HI + offs, offs, mask=offs < head)
        for start in range(tail, T, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(LO + offs, offs, mask=offs < T)
            tl.store(HI + offs, offs, mask=offs < T)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """tl.dot; F32_DOT (interpreter + bf16 only) upcasts the operands exactly: triton 3.8's interpreter keeps
    bf16 as uint16 and np.matmul's the raw bits, so a bf16 tl.dot there returns garbage."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _softmax_update(s, keep, m_i, l_i, acc, v, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """One key block of the online softmax (both attention kernels' forward): scores s (log2 units), masked by keep,
    folded into the running row max m_i, row sum l_i and output acc; returns the three."""
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, F32_DOT)
    return m_new, l_i, acc


@triton.jit
def _softmax_finish(m_i, l_i, acc):
    """(output, log2-sum-exp) of the rows; a row that saw no key gives 0 and m_i (its sum stays 0)."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    return acc / l_safe[:, None], m_i + tl.log2(l_safe)


@triton.jit
def _dkdv_block(k, v, q, do, keep_t, lse, delta, qk_scale, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """(dK, dV) shares of a key window k, v (WIN rows) from one block of queries q, dO (STEP rows), both attention
    kernels' backward: P^T recomputed from the log-sum-exp, masked by keep_t (WIN, STEP); dK before the softmax
    scale."""
    p_t = tl.where(keep_t, tl.exp2(_dot(k, tl.trans(q), PREC, F32_DOT) * qk_scale - lse[None, :]), 0.0)
    dv = _dot(p_t.to(do.dtype), do, PREC, F32_DOT)
    ds_t = p_t * (_dot(v, tl.trans(do), PREC, F32_DOT) - delta[None, :])
    return _dot(ds_t.to(q.dtype), q, PREC, F32_DOT), dv


@triton.jit
def _dq_block(q, do, kb, vb, keep, lse, delta, qk_scale, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """dQ's share of a query window q, dO from one block of keys kb, vb (both kernels' backward); before the softmax
    scale."""
    p = tl.where(keep, tl.exp2(_dot(q, tl.trans(kb), PREC, F32_DOT) * qk_scale - lse[:, None]), 0.0)
    ds = p * (_dot(do, tl.trans(vb), PREC, F32_DOT) - delta[:, None])
    return _dot(ds.to(kb.dtype), kb, PREC, F32_DOT)


@triton.jit
def _varlen_attn_fwd_kernel(
    Q, K, V, O, LSE, LO, HI,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    T, D, qk_scale,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d[None, :] < D
    lo_m = tl.load(LO + offs_m, mask=row_ok, other=0)
    hi_m = tl.load(HI + offs_m, mask=row_ok, other=0)  # rows past T: empty range, never stored
    q = tl.load(Q + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok, other=0.0)  # fmt: skip
    last = tl.minimum(m0 + BLOCK_M, T) - 1
    start = tl.load(LO + m0)
    if IS_CAUSAL:
        end = last + 1
    else:
        end = tl.load(HI + last)
    K += h * stride_kh
    V += h * stride_vh
    # m starts finite so that rows with no key so far give exp2(-inf - m) = 0, never inf - inf
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n in range(start, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        ld = (offs_n[:, None] < end) & d_ok
        rows = offs_n[:, None].to(tl.int64)
        k = tl.load(K + rows * stride_kt + offs_d[None, :], mask=ld, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + rows * stride_vt + offs_d[None, :], mask=ld, other=0.0)
        s = _dot(q, tl.trans(k), PREC, F32_DOT) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        keep = (offs_n[None, :] >= lo_m[:, None]) & (offs_n[None, :] < hi_m[:, None])
        if IS_CAUSAL:
            keep &= offs_n[None, :] <= offs_m[:, None]
        m_i, l_i, acc = _softmax_update(s, keep, m_i, l_i, acc, v, PREC, F32_DOT)
    o, lse = _softmax_finish(m_i, l_i, acc)
    tl.store(O + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok)  # fmt: skip
    tl.store(LSE + h * T + offs_m, lse, mask=row_ok)


@triton.jit
def _varlen_attn_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ot, stride_oh, stride_dt, stride_dh, T, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """delta = rowsum(dO * O) in fp32, (H, T). Grid (cdiv(T, BLOCK_M), H)."""
    h = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + h * stride_oh + rows * stride_ot + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + h * stride_dh + rows * stride_dt + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + h * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _varlen_attn_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, LO, HI,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
    stride_gt, stride_gh,
    T, D, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, WIN: tl.constexpr, STEP: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
):  # fmt: skip
    """Program (w, h): dK, dV for key window w, then dQ for query window w. dQ/dK/dV share strides (g)."""
    w0 = tl.program_id(0) * WIN
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    Q += h * stride_qh
    K += h * stride_kh
    V += h * stride_vh
    DO += h * stride_dh
    LSE += h * T
    DELTA += h * T
    last = tl.minimum(w0 + WIN, T) - 1
    offs_w = w0 + tl.arange(0, WIN)
    w_ok = offs_w < T
    lo_w = tl.load(LO + offs_w, mask=w_ok, other=0)
    hi_w = tl.load(HI + offs_w, mask=w_ok, other=0)
    rows_w = offs_w[:, None].to(tl.int64)
    ld_w = w_ok[:, None] & d_ok

    # dK, dV: keys w0.., queries from the window's first sequence start (causal: from w0) to its last end
    k = tl.load(K + rows_w * stride_kt + offs_d[None, :], mask=ld_w, other=0.0)  # (WIN, BLOCK_D)
    v = tl.load(V + rows_w * stride_vt + offs_d[None, :], mask=ld_w, other=0.0)
    dk = tl.zeros([WIN, BLOCK_D], tl.float32)
    dv = tl.zeros([WIN, BLOCK_D], tl.float32)
    if IS_CAUSAL:
        start = w0
    else:
        start = tl.load(LO + w0)
    end = tl.load(HI + last)
    for m in range(start, end, STEP):
        offs_m = m + tl.arange(0, STEP)
        m_ok = offs_m < end
        rows = offs_m[:, None].to(tl.int64)
        q = tl.load(Q + rows * stride_qt + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)  # (STEP, BD)
        do = tl.load(DO + rows * stride_dt + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        keep = (offs_m[None, :] >= lo_w[:, None]) & (offs_m[None, :] < hi_w[:, None])  # (WIN, STEP)
        if IS_CAUSAL:
            keep &= offs_m[None, :] >= offs_w[:, None]
        dk_b, dv_b = _dkdv_block(k, v, q, do, keep, lse, delta, qk_scale, PREC, F32_DOT)
        dk += dk_b
        dv += dv_b
    g = h * stride_gh + rows_w * stride_gt + offs_d[None, :]
    tl.store(DK + g, (dk * sm_scale).to(DK.dtype.element_ty), mask=ld_w)
    tl.store(DV + g, dv.to(DV.dtype.element_ty), mask=ld_w)

    # dQ: queries w0.., keys from the first row's sequence start to the last row (causal) or its end
    q = tl.load(Q + rows_w * stride_qt + offs_d[None, :], mask=ld_w, other=0.0)
    do = tl.load(DO + rows_w * stride_dt + offs_d[None, :], mask=ld_w, other=0.0)
    lse = tl.load(LSE + offs_w, mask=w_ok, other=float("inf"))
    delta = tl.load(DELTA + offs_w, mask=w_ok, other=0.0)
    dq = tl.zeros([WIN, BLOCK_D], tl.float32)
    start = tl.load(LO + w0)
    if IS_CAUSAL:
        end = last + 1
    for n in range(start, end, STEP):
        offs_n = n + tl.arange(0, STEP)
        rows = offs_n[:, None].to(tl.int64)
        ld = (offs_n[:, None] < end) & d_ok
        kb = tl.load(K + rows * stride_kt + offs_d[None, :], mask=ld, other=0.0)  # (STEP, BD)
        vb = tl.load(V + rows * stride_vt + offs_d[None, :], mask=ld, other=0.0)
        keep = (offs_n[None, :] >= lo_w[:, None]) & (offs_n[None, :] < hi_w[:, None])  # (WIN, STEP)
        if IS_CAUSAL:
            keep &= offs_n[None, :] <= offs_w[:, None]
        dq += _dq_block(q, do, kb, vb, keep, lse, delta, qk_scale, PREC, F32_DOT)
    tl.store(DQ + h * stride_gh + rows_w * stride_gt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=ld_w)  # fmt: skip


def _fwd_config(total: int, nseq: int, head_dim: int, block_m: int | None = None) -> dict:
    """BLOCK_M = next_pow2(2 * mean length) in [16, 128] (see the header); python ints only, no sync."""
    if block_m is None:
        block_m = min(max(triton.next_power_of_2(max(1, 2 * total // max(nseq, 1))), 16), 128)
    warps = max(1, min(block_m // 16, 8))
    return {"BLOCK_M": block_m, "BLOCK_N": min(block_m, 64), "num_warps": warps, "num_stages": 2}


def _bwd_config(head_dim: int) -> dict:
    """Fixed 64-token windows (see the header): the spill-free sm_90 compile with the fewest registers per row."""
    if head_dim <= 64:
        return {"WIN": 64, "STEP": 16, "num_warps": 4, "num_stages": 2}
    return {"WIN": 64, "STEP": 32, "num_warps": 8, "num_stages": 2}


def _bd(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _dot_consts(q: torch.Tensor, interpret: bool) -> dict:
    # fp32 gets exact dots (tests); the interpreter's bf16 dot is broken (see _dot), so there it runs in fp32
    return {"PREC": "ieee" if q.dtype == torch.float32 else "tf32", "F32_DOT": interpret and q.dtype == torch.bfloat16}


def _seq_bounds(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.empty(total, dtype=torch.int32, device=cu_seqlens.device)
    hi = torch.empty_like(lo)
    S = cu_seqlens.numel() - 1
    _seq_bounds_kernel[(S + 1,)](cu_seqlens, lo, hi, S, total, BLOCK=64)
    return lo, hi


def _fwd_launch(q, k, v, o, lse, lo, hi, causal, scale, cfg, interpret):
    """(grid, runtime args, constexprs, launch options) of the forward kernel; the AOT test compiles the same."""
    T, H, d = q.shape
    args = dict(Q=q, K=k, V=v, O=o, LSE=lse, LO=lo, HI=hi, stride_qt=q.stride(0), stride_qh=q.stride(1),
                stride_kt=k.stride(0), stride_kh=k.stride(1), stride_vt=v.stride(0), stride_vh=v.stride(1),
                stride_ot=o.stride(0), stride_oh=o.stride(1), T=T, D=d, qk_scale=scale * _LOG2E)  # fmt: skip
    const = dict(IS_CAUSAL=causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_bd(d),
                 **_dot_consts(q, interpret))  # fmt: skip
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return (triton.cdiv(T, cfg["BLOCK_M"]), H), args, const, opts


def _bwd_launch(q, k, v, do, dq, dk, dv, lse, delta, lo, hi, causal, scale, cfg, interpret):
    """(grid, runtime args, constexprs, launch options) of the dq/dk/dv kernel; dq, dk, dv share strides."""
    T, H, d = q.shape
    args = dict(Q=q, K=k, V=v, DO=do, DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, LO=lo, HI=hi,
                stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
                stride_vt=v.stride(0), stride_vh=v.stride(1), stride_dt=do.stride(0), stride_dh=do.stride(1),
                stride_gt=dq.stride(0), stride_gh=dq.stride(1), T=T, D=d, qk_scale=scale * _LOG2E,
                sm_scale=scale)  # fmt: skip
    const = dict(IS_CAUSAL=causal, WIN=cfg["WIN"], STEP=cfg["STEP"], BLOCK_D=_bd(d), **_dot_consts(q, interpret))
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return (triton.cdiv(T, cfg["WIN"]), H), args, const, opts


def _fwd(q, k, v, lo, hi, causal, scale, cfg):
    T, H, d = q.shape
    o = torch.empty((T, H, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    grid, args, const, opts = _fwd_launch(q, k, v, o, lse, lo, hi, causal, scale, cfg, not q.is_cuda)
    _varlen_attn_fwd_kernel[grid](**args, **const, **opts)
    return o, lse


def _bwd(do, q, k, v, o, lse, lo, hi, causal, scale, cfg, out=None):
    """dq, dk, dv; out: three (T, H, d) tensors with one set of strides to write them into (views of one dqkv)."""
    T, H, d = q.shape
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(T, 64), H)](
        o, do, delta, *o.stride()[:2], *do.stride()[:2], T, d, BLOCK_M=64, BLOCK_D=_bd(d)
    )
    dq, dk, dv = out or (torch.empty((T, H, d), dtype=q.dtype, device=q.device) for _ in range(3))
    grid, args, const, opts = _bwd_launch(q, k, v, do, dq, dk, dv, lse, delta, lo, hi, causal, scale, cfg,
                                          not q.is_cuda)  # fmt: skip
    _varlen_attn_bwd_kernel[grid](**args, **const, **opts)
    return dq, dk, dv


def _seq_index(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its sequence id and its position inside that sequence; no host sync."""
    tok = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.long()
    seq = torch.searchsorted(cu[1:], tok, right=True)  # (T,)
    return seq, tok - cu[seq]


def varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, causal=False, softmax_scale=None, upcast=False):
    """Scatter into a right-padded (S, H, max_seqlen, d) batch, run SDPA, gather the real rows back.

    Differentiable, no python loop over sequences: the CPU training path. With right padding, causal
    needs no mask (a real query at position i only sees keys 0..i, all real); non-causal masks padded
    keys for real queries (padded queries see everything, so no row is fully masked, even for empty
    sequences). upcast=True computes in float32, a dtype computes in that dtype; output in q's dtype.
    """
    T, H, _ = q.shape
    S = cu_seqlens.numel() - 1
    L = int(max_seqlen)
    dtype = q.dtype
    cdt = (torch.float32 if upcast is True else upcast) if upcast else dtype
    seq, pos = _seq_index(cu_seqlens, T)

    def pad(x):
        buf = x.new_zeros(S, L, H, x.shape[-1], dtype=cdt)
        return buf.index_put((seq, pos), x.to(cdt)).transpose(1, 2)  # (S, H, L, d)

    mask = None
    if not causal:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        real = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # (S, L)
        mask = real[:, None, None, :] | ~real[:, None, :, None]  # (S, 1, L, L)
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, is_causal=causal, scale=softmax_scale)
    return o.transpose(1, 2)[seq, pos].to(dtype)  # (T, H, d)


def _forward(q, k, v, cu_seqlens, causal, scale, block_m):
    """Both autograd Functions' forward: (o, lse, lo, hi), the last three kept for the backward."""
    lo, hi = _seq_bounds(cu_seqlens, q.shape[0])
    cfg = _fwd_config(q.shape[0], cu_seqlens.numel() - 1, q.shape[2], block_m)
    o, lse = _fwd(q, k, v, lo, hi, causal, scale, cfg)
    return o, lse, lo, hi


def _unit_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class VarlenAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, causal, scale, block_m):
        q, k, v = (_unit_stride(x) for x in (q, k, v))
        o, lse, lo, hi = _forward(q, k, v, cu_seqlens, causal, scale, block_m)
        ctx.save_for_backward(q, k, v, o, lse, lo, hi)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, lo, hi = ctx.saved_tensors
        dq, dk, dv = _bwd(_unit_stride(do), q, k, v, o, lse, lo, hi, ctx.causal, ctx.scale, _bwd_config(q.shape[2]))
        return dq, dk, dv, None, None, None, None


class VarlenAttentionQKVFn(torch.autograd.Function):
    """The same kernels on q, k, v packed as one (T, 3, H, d) tensor (a qkv projection's output): backward writes
    dq, dk, dv straight into one dqkv of that layout, where three separate gradients would be stacked into it by
    autograd (a copy of the whole dqkv per layer)."""

    @staticmethod
    def forward(ctx, qkv, cu_seqlens, causal, scale, block_m):
        qkv = _unit_stride(qkv)
        o, lse, lo, hi = _forward(*qkv.unbind(1), cu_seqlens, causal, scale, block_m)
        ctx.save_for_backward(qkv, o, lse, lo, hi)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        qkv, o, lse, lo, hi = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _bwd(_unit_stride(do), *qkv.unbind(1), o, lse, lo, hi, ctx.causal, ctx.scale, _bwd_config(qkv.shape[3]),
             out=dqkv.unbind(1))  # fmt: skip
        return dqkv, None, None, None, None


def _scale(head_dim: int, softmax_scale) -> float:
    return head_dim**-0.5 if softmax_scale is None else float(softmax_scale)


def _check_cu_seqlens(cu_seqlens, total: int) -> None:
    """dtype and shape always; the values too where cu_seqlens is on the host (checking a device tensor's would wait
    for the device: there the kernels stay in bounds whatever the values, see _seq_bounds_kernel)."""
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 (flash-attn layout), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be (num_seqs + 1,), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type == "cpu":
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the {total} packed tokens, got "
                             f"{cu[:8]}{' ...' if len(cu) > 8 else ''} (last {cu[-1]})")


def varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, causal=False, softmax_scale=None, *, impl=None,
                               _block_m=None):  # fmt: skip
    """varlen_attention of q, k, v = qkv.unbind(1) for qkv (T_total, 3, H, d) -> (T_total, H, d): the same
    results, with qkv's gradient written in one piece (see VarlenAttentionQKVFn)."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (T_total, 3, heads, head_dim), got {tuple(qkv.shape)}")
    if not use_triton(qkv, impl) or qkv.shape[0] == 0:
        return varlen_attention(*qkv.unbind(1), cu_seqlens, max_seqlen, causal, softmax_scale, impl=impl,
                                _block_m=_block_m)  # fmt: skip
    _check_cu_seqlens(cu_seqlens, qkv.shape[0])
    return VarlenAttentionQKVFn.apply(qkv, cu_seqlens, bool(causal), _scale(qkv.shape[-1], softmax_scale), _block_m)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, softmax_scale=None, *, impl=None, _block_m=None):
    """Attention within each packed sequence. q, k, v (T_total, H, d); cu_seqlens (S+1,) int32 -> (T_total, H, d).

    max_seqlen is the caller's bound on the longest sequence (a python int: no device sync here); the kernel
    needs only cu_seqlens, the reference pads to it. `_block_m` overrides the kernel's window (benchmarks).
    """
    if not (q.shape == k.shape == v.shape and q.dim() == 3):
        raise ValueError(f"q, k, v must share one (T_total, heads, head_dim) shape: {q.shape}, {k.shape}, {v.shape}")
    scale = _scale(q.shape[-1], softmax_scale)
    if not use_triton(q, impl):
        # on the CPU, in float32: torch's bf16 SDPA there is up to ~5x slower (see clipfast.layers.sdpa)
        upcast = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, causal, scale, upcast=upcast)
    if q.dtype != k.dtype or q.dtype != v.dtype or not q.is_floating_point():
        raise TypeError(f"varlen_attention needs q, k, v of one floating-point dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    _check_cu_seqlens(cu_seqlens, q.shape[0])
    if q.shape[0] == 0:  # nothing to launch; the reference keeps the (empty) output in the graph
        return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return VarlenAttentionFn.apply(q, k, v, cu_seqlens, bool(causal), scale, _block_m)
