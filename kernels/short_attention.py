"""Dense attention for short sequences of one length (a ViT's 37-99 tokens at CLIPA sizes), q, k, v packed as one
qkv projection output, forward and backward.

Shapes: qkv (B, N, 3, H, d), a (B, N, 3*H*d) projection output viewed in place (token/slot/head strides free, last
dim contiguous); output (B, N, H, d) contiguous, so `.reshape(B, N, H*d)` is a view. The backward writes dq, dk, dv
into one dqkv of qkv's shape, where SDPA's three gradients are stacked into it by autograd (a copy per block). fp16 /
bf16 (fp32 too, with exact dots, for interpreter tests); head dims up to 128; causal or not; any N >= 1.

Why: at N = 50 (B/16 at 112 px) torch's SDPA on the H200 runs cuDNN tiles of 64 x 128 (forward) and 64 x 64
(backward) and reaches ~37 TFLOP/s: 8.8 of 85 ms of the B/16 step (bench/results/nvidia-h200-2026-11-26-87ad763-ab/
profile.md), plus 1.4 ms for stacking dq, dk, dv. Here a tile is sized to the sequence: TILE = next_pow2(N) in [16, 64]
for N <= 64, so one program per (sequence, head) holds the whole sequence (50 of 64 rows and keys are real: 61% of
the score tile, where 64 x 128 holds 31%).
  forward, N <= 64: one program per (sequence, head), one S = q k^T tile, softmax, P v; no loop.
  backward, N <= 64: one program per (sequence, head): S, P recomputed once from the saved log-sum-exp, then
      dV = P^T dO, dP = dO V^T, dS = P (dP - delta), dQ = dS K, dK = dS^T Q; delta = rowsum(dO * O) in the same
      program. Five tile products, no atomics, no second pass.
  N > 64: 64-row query blocks looping over 64-key blocks (forward); the backward runs per 64-token window, dK, dV
      over the query blocks, then dQ over the key blocks (recomputing P, as kernels.varlen_attention does), with
      delta from a small preprocess kernel.
bias= (N <= 64): the qkv projection's bias, left out of the projection, is added to q, k, v as the tiles load, and the
one-tile backward writes each sequence's column sums of dq, dk, dv (B, 3, H, d, fp32), one torch sum from the bias's
gradient: no separate reduction over the (B, N, 3*H*d) gradient (torch's bias-gradient sums took 3.8 of 76.2 ms of
device time per B/16 112 px step with the kernels on an H100, 49ad34c; the vision qkv ones read the widest rows).
Registers and spills of each configuration: tests/test_aot_short_attention.py (sm_90, no GPU needed).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import finish_sums, use_triton
from kernels.varlen_attention import (
    _LOG2E,
    _dkdv_block,
    _dot,
    _dot_consts,
    _dq_block,
    _softmax_finish,
    _softmax_update,
)

TILE_MAX = 64  # N up to this: one program per (sequence, head), forward and backward


@triton.jit
def _short_attn_fwd_kernel(
    QKV, O, LSE, stride_b, stride_n, stride_s, stride_h, stride_ob, stride_on, stride_oh,
    N, H, D, qk_scale, BIAS,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, F32_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Program (m, b * H + h): query rows m*BLOCK_M.. of sequence b, head h; LSE (B*H, N) in log2 units. HAS_BIAS:
    q, k, v are the loaded rows plus the projection's bias BIAS (3, H, D) contiguous, rounded to qkv's dtype."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    Q = QKV + b.to(tl.int64) * stride_b + h * stride_h
    K = Q + stride_s
    V = K + stride_s
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d[None, :] < D
    q = tl.load(Q + offs_m[:, None] * stride_n + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
    if HAS_BIAS:
        bq, bk, bv = _bias3(BIAS, h, H, D, offs_d)
        q = (q.to(tl.float32) + bq[None, :]).to(q.dtype)
    if IS_CAUSAL:
        end = tl.minimum(m0 + BLOCK_M, N)
    else:
        end = N
    # m starts finite: a row with no key so far gives exp2(-inf - m) = 0, never inf - inf
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n in range(0, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        ld = (offs_n[:, None] < N) & d_ok
        k = tl.load(K + offs_n[:, None] * stride_n + offs_d[None, :], mask=ld, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + offs_n[:, None] * stride_n + offs_d[None, :], mask=ld, other=0.0)
        if HAS_BIAS:  # padded key rows get the bias too: masked out of the scores, and p = 0 multiplies their v
            k = (k.to(tl.float32) + bk[None, :]).to(q.dtype)
            v = (v.to(tl.float32) + bv[None, :]).to(q.dtype)
        s = _dot(q, tl.trans(k), PREC, F32_DOT) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        keep = offs_n[None, :] < N
        if IS_CAUSAL:
            keep &= offs_n[None, :] <= offs_m[:, None]
        m_i, l_i, acc = _softmax_update(s, keep, m_i, l_i, acc, v, PREC, F32_DOT)
    o, lse = _softmax_finish(m_i, l_i, acc)
    O += b.to(tl.int64) * stride_ob + h * stride_oh
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    tl.store(LSE + bh * N + offs_m, lse, mask=row_ok)


@triton.jit
def _short_attn_fwd_tile_kernel(
    QKV, O, LSE, stride_b, stride_n, stride_s, stride_h, stride_ob, stride_on, stride_oh,
    N, H, D, qk_scale, BIAS,
    IS_CAUSAL: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HPP: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """The forward for N <= TILE in one tile and no key loop: program p takes the (sequence, head) pairs p * HPP ..
    p * HPP + HPP - 1 in turn (HPP divides B * H), in a loop that Triton may software-pipeline (STAGES): the next
    pair's q, k, v load while this one's tile products run. LSE (B*H, N) in log2 units, as _short_attn_fwd_kernel."""
    for i in tl.range(0, HPP, num_stages=STAGES):
        bh = tl.program_id(0) * HPP + i
        b, h, offs, offs_d, ok, ld, q, k, v = _load_qkv_tile(QKV, bh, N, H, D, stride_b, stride_n, stride_s, stride_h,
                                                             BIAS, TILE, BLOCK_D, HAS_BIAS)  # fmt: skip
        s = _dot(q, tl.trans(k), PREC, F32_DOT) * qk_scale  # (TILE, TILE), log2 units
        keep = ok[None, :]
        if IS_CAUSAL:
            keep &= offs[None, :] <= offs[:, None]
        s = tl.where(keep, s, float("-inf"))
        m = tl.maximum(tl.max(s, 1), -1.0e30)  # padded query rows see the real keys; every row has a key
        p = tl.exp2(s - m[:, None])
        l_i = tl.sum(p, 1)
        o = _dot(p.to(v.dtype), v, PREC, F32_DOT) / l_i[:, None]
        o_rows = b.to(tl.int64) * stride_ob + h * stride_oh + offs[:, None] * stride_on + offs_d[None, :]
        tl.store(O + o_rows, o.to(O.dtype.element_ty), mask=ld)
        tl.store(LSE + bh * N + offs, m + tl.log2(l_i), mask=ok)


@triton.jit
def _short_attn_bwd_tile_kernel(
    QKV, O, DO, DQKV, LSE,
    stride_b, stride_n, stride_s, stride_h, stride_ob, stride_on, stride_oh, stride_db, stride_dn, stride_dh,
    stride_gb, stride_gn, stride_gs, stride_gh,
    N, H, D, qk_scale, sm_scale, BIAS, DBIAS_PART,
    IS_CAUSAL: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HPP: tl.constexpr = 1, STAGES: tl.constexpr = 1,
):  # fmt: skip
    """Program p: the (sequence, head) pair p (HPP = 1), or the pairs p * HPP .. p * HPP + HPP - 1 in a loop that
    Triton may software-pipeline (STAGES; HPP divides B * H), each whole sequence (N <= TILE) in one tile; see the
    module docstring. HAS_BIAS: the forward's bias added to q, k, v again, and the column sums of dq, dk, dv (fp32,
    before rounding) into DBIAS_PART (B, 3, H, D): the bias's gradient once summed over the sequences."""
    if HPP == 1:
        _bwd_tile(tl.program_id(0), QKV, O, DO, DQKV, LSE, stride_b, stride_n, stride_s, stride_h, stride_ob,
                  stride_on, stride_oh, stride_db, stride_dn, stride_dh, stride_gb, stride_gn, stride_gs, stride_gh,
                  N, H, D, qk_scale, sm_scale, BIAS, DBIAS_PART, IS_CAUSAL, TILE, BLOCK_D, PREC, F32_DOT, HAS_BIAS)
    else:
        for i in tl.range(0, HPP, num_stages=STAGES):
            _bwd_tile(tl.program_id(0) * HPP + i, QKV, O, DO, DQKV, LSE, stride_b, stride_n, stride_s, stride_h,
                      stride_ob, stride_on, stride_oh, stride_db, stride_dn, stride_dh, stride_gb, stride_gn,
                      stride_gs, stride_gh, N, H, D, qk_scale, sm_scale, BIAS, DBIAS_PART, IS_CAUSAL, TILE, BLOCK_D,
                      PREC, F32_DOT, HAS_BIAS)


@triton.jit
def _bwd_tile(
    bh, QKV, O, DO, DQKV, LSE,
    stride_b, stride_n, stride_s, stride_h, stride_ob, stride_on, stride_oh, stride_db, stride_dn, stride_dh,
    stride_gb, stride_gn, stride_gs, stride_gh,
    N, H, D, qk_scale, sm_scale, BIAS, DBIAS_PART,
    IS_CAUSAL: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """The one-tile backward of the (sequence, head) pair bh."""
    b, h, offs, offs_d, ok, ld, q, k, v = _load_qkv_tile(QKV, bh, N, H, D, stride_b, stride_n, stride_s, stride_h, BIAS,
                                                         TILE, BLOCK_D, HAS_BIAS)  # fmt: skip
    o_rows = b.to(tl.int64) * stride_ob + h * stride_oh + offs[:, None] * stride_on + offs_d[None, :]
    o = tl.load(O + o_rows, mask=ld, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h * stride_dh + offs[:, None] * stride_dn + offs_d[None, :],
                 mask=ld, other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (TILE,)
    lse = tl.load(LSE + bh * N + offs, mask=ok, other=float("inf"))  # padded rows: p = 0
    s = _dot(q, tl.trans(k), PREC, F32_DOT) * qk_scale  # (TILE, TILE): rows queries, columns keys
    keep = ok[None, :]
    if IS_CAUSAL:
        keep &= offs[None, :] <= offs[:, None]
    p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
    # each gradient stored (and its bias column sum taken) as soon as it is made, so that it need not stay in registers
    # while the next tile products run; padded rows: ds and p are 0 there, so dq, dk, dv rows are 0
    G = DQKV + b.to(tl.int64) * stride_gb + h * stride_gh + offs[:, None] * stride_gn + offs_d[None, :]
    part = DBIAS_PART + b.to(tl.int64) * 3 * H * D + h * D + offs_d
    d_in = offs_d < D
    dv = _dot(tl.trans(p.to(do.dtype)), do, PREC, F32_DOT)
    tl.store(G + 2 * stride_gs, dv.to(DQKV.dtype.element_ty), mask=ld)
    if HAS_BIAS:
        tl.store(part + 2 * H * D, tl.sum(dv, 0), mask=d_in)
    dp = _dot(do, tl.trans(v), PREC, F32_DOT)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dq = _dot(ds, k, PREC, F32_DOT) * sm_scale
    tl.store(G, dq.to(DQKV.dtype.element_ty), mask=ld)
    if HAS_BIAS:
        tl.store(part, tl.sum(dq, 0), mask=d_in)
    dk = _dot(tl.trans(ds), q, PREC, F32_DOT) * sm_scale
    tl.store(G + stride_gs, dk.to(DQKV.dtype.element_ty), mask=ld)
    if HAS_BIAS:
        tl.store(part + H * D, tl.sum(dk, 0), mask=d_in)


@triton.jit
def _load_qkv_tile(QKV, bh, N, H, D, stride_b, stride_n, stride_s, stride_h, BIAS, TILE: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """The (sequence, head) pair bh's tile: (b, h, row offsets, column offsets, rows < N, the load mask, q, k, v),
    q, k, v with the projection's bias where HAS_BIAS (added in fp32, rounded to qkv's dtype), 0 outside the mask."""
    b = bh // H
    h = bh % H
    offs = tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs < N
    ld = ok[:, None] & (offs_d[None, :] < D)
    Q = QKV + b.to(tl.int64) * stride_b + h * stride_h
    rows = offs[:, None] * stride_n + offs_d[None, :]
    q = tl.load(Q + rows, mask=ld, other=0.0)
    k = tl.load(Q + stride_s + rows, mask=ld, other=0.0)
    v = tl.load(Q + 2 * stride_s + rows, mask=ld, other=0.0)
    if HAS_BIAS:
        bq, bk, bv = _bias3(BIAS, h, H, D, offs_d)
        q = (q.to(tl.float32) + bq[None, :]).to(v.dtype)
        k = (k.to(tl.float32) + bk[None, :]).to(v.dtype)
        v = (v.to(tl.float32) + bv[None, :]).to(q.dtype)
    return b, h, offs, offs_d, ok, ld, q, k, v


@triton.jit
def _bias3(BIAS, h, H, D, offs_d):
    """The q, k and v bias of head h, fp32 (BLOCK_D,) each, from BIAS (3, H, D) contiguous."""
    B0 = BIAS + h * D + offs_d
    d_in = offs_d < D
    bq = tl.load(B0, mask=d_in, other=0.0).to(tl.float32)
    bk = tl.load(B0 + H * D, mask=d_in, other=0.0).to(tl.float32)
    bv = tl.load(B0 + 2 * H * D, mask=d_in, other=0.0).to(tl.float32)
    return bq, bk, bv


@triton.jit
def _short_attn_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_on, stride_oh, stride_db, stride_dn, stride_dh, N, H, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) in fp32, (B*H, N). Grid (cdiv(N, BLOCK_M), B*H)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(DO + b.to(tl.int64) * stride_db + h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
                 mask=ok, other=0.0).to(tl.float32)  # fmt: skip
    tl.store(DELTA + bh * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def _short_attn_bwd_kernel(
    QKV, DO, DQKV, LSE, DELTA,
    stride_b, stride_n, stride_s, stride_h, stride_db, stride_dn, stride_dh, stride_gb, stride_gn, stride_gs, stride_gh,
    N, H, D, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, WIN: tl.constexpr, STEP: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
):  # fmt: skip
    """Program (w, b * H + h): dK, dV for key window w, then dQ for query window w (N > TILE_MAX)."""
    w0 = tl.program_id(0) * WIN
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    Q = QKV + b.to(tl.int64) * stride_b + h * stride_h
    K = Q + stride_s
    V = K + stride_s
    DO += b.to(tl.int64) * stride_db + h * stride_dh
    LSE += bh * N
    DELTA += bh * N
    offs_w = w0 + tl.arange(0, WIN)
    w_ok = offs_w < N
    ld_w = w_ok[:, None] & d_ok
    rows_w = offs_w[:, None] * stride_n + offs_d[None, :]

    # dK, dV: keys w0.., every query that sees them (causal: from w0)
    k = tl.load(K + rows_w, mask=ld_w, other=0.0)  # (WIN, BLOCK_D)
    v = tl.load(V + rows_w, mask=ld_w, other=0.0)
    dk = tl.zeros([WIN, BLOCK_D], tl.float32)
    dv = tl.zeros([WIN, BLOCK_D], tl.float32)
    if IS_CAUSAL:
        start = w0
    else:
        start = 0
    for m in range(start, N, STEP):
        offs_m = m + tl.arange(0, STEP)
        m_ok = offs_m < N
        q = tl.load(Q + offs_m[:, None] * stride_n + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dn + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))  # padded queries: p = 0
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        keep = m_ok[None, :] & w_ok[:, None]  # (WIN, STEP): rows keys, columns queries
        if IS_CAUSAL:
            keep &= offs_m[None, :] >= offs_w[:, None]
        dk_b, dv_b = _dkdv_block(k, v, q, do, keep, lse, delta, qk_scale, PREC, F32_DOT)
        dk += dk_b
        dv += dv_b
    G = DQKV + b.to(tl.int64) * stride_gb + h * stride_gh + offs_w[:, None] * stride_gn + offs_d[None, :]
    tl.store(G + stride_gs, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=ld_w)
    tl.store(G + 2 * stride_gs, dv.to(DQKV.dtype.element_ty), mask=ld_w)

    # dQ: queries w0.., every key they see (causal: up to the window's last row)
    q = tl.load(Q + rows_w, mask=ld_w, other=0.0)
    do = tl.load(DO + offs_w[:, None] * stride_dn + offs_d[None, :], mask=ld_w, other=0.0)
    lse = tl.load(LSE + offs_w, mask=w_ok, other=float("inf"))
    delta = tl.load(DELTA + offs_w, mask=w_ok, other=0.0)
    dq = tl.zeros([WIN, BLOCK_D], tl.float32)
    if IS_CAUSAL:
        end = tl.minimum(w0 + WIN, N)
    else:
        end = N
    for n in range(0, end, STEP):
        offs_n = n + tl.arange(0, STEP)
        ld = (offs_n[:, None] < N) & d_ok
        kb = tl.load(K + offs_n[:, None] * stride_n + offs_d[None, :], mask=ld, other=0.0)  # (STEP, BLOCK_D)
        vb = tl.load(V + offs_n[:, None] * stride_n + offs_d[None, :], mask=ld, other=0.0)
        keep = offs_n[None, :] < N  # (WIN, STEP)
        if IS_CAUSAL:
            keep &= offs_n[None, :] <= offs_w[:, None]
        dq += _dq_block(q, do, kb, vb, keep, lse, delta, qk_scale, PREC, F32_DOT)
    tl.store(G, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=ld_w)


def _bd(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# (sequence, head) pairs per program of the one-tile kernels, and the software-pipelining depth of their loop over
# them. FWD_HEADS 0: the forward runs _short_attn_fwd_kernel (its key loop, one pair per program); k >= 1:
# _short_attn_fwd_tile_kernel, k pairs per program. Default 1 pair, 1 stage: on an H200 at bdf2175
# (bench/results/nvidia-h200-2026-11-27-bdf2175/sweep/sweep.md) the one-tile forward took 0.094 against the key
# loop's 0.136 ms at B/16 112 px (N = 50) and 0.060 against 0.091 ms at L/16 96 px (N = 37); 2 or 4 pairs per
# program were slower than 1 (0.112-0.122 ms at N = 50); in the graphed step at 981a94d, 65.02 against 65.75 ms at
# B/16 112/16 and 75.51 against 76.46 ms at L/16 96/8 (bench/results/nvidia-h200-2026-11-27-981a94d, kernels_ab2 vs
# kernels_ab1). BWD_HEADS 1: one pair per program (2 pairs: 0.347 against 0.261 ms at N = 50).
FWD_HEADS, FWD_STAGES = 1, 1
BWD_HEADS, BWD_STAGES = 1, 2


def _fwd_config(n: int, head_dim: int) -> dict:
    """N <= TILE_MAX: one tile of next_pow2(N) rows and keys (HPP: pairs per program of the one-tile kernel, where
    FWD_HEADS asks for it); longer: 64 x 64 blocks."""
    t = min(_tile(n), TILE_MAX)
    cfg = {"BLOCK_M": t, "BLOCK_N": t, "num_warps": 4 if t == 64 else (2 if t == 32 else 1), "num_stages": 2}
    if n <= TILE_MAX and FWD_HEADS >= 1:
        cfg.update(HPP=FWD_HEADS, STAGES=FWD_STAGES)
    return cfg


def _bwd_config(n: int, head_dim: int) -> dict:
    """One-tile kernel for N <= TILE_MAX; per-window kernel above it (kernels.varlen_attention's windows)."""
    if n <= TILE_MAX:
        t = _tile(n)
        # 4 warps at 64: on an H100 (bench/sweep_kernels.py, bench/results/nvidia-h100-80gb-hbm3-2026-11-26-dab88c7/
        # sweep.md) 0.231 ms at B/16 112 px (N = 50) against 0.344 ms with 8 warps (SDPA's backward + stack: 1.14 ms)
        # (d <= 64; d = 128 keeps 8 warps: three 64 x 128 fp32 accumulators would not fit 4 warps' registers)
        return {"TILE": t, "num_warps": (4 if head_dim <= 64 else 8) if t == 64 else (4 if t == 32 else 1),
                "num_stages": 1, "HPP": BWD_HEADS, "STAGES": BWD_STAGES}
    if head_dim <= 64:
        return {"WIN": 64, "STEP": 16, "num_warps": 4, "num_stages": 2}
    return {"WIN": 64, "STEP": 32, "num_warps": 8, "num_stages": 2}


def _qkv_strides(x):
    return dict(stride_b=x.stride(0), stride_n=x.stride(1), stride_s=x.stride(2), stride_h=x.stride(3))


def _pairs_per_program(pairs: int, hpp: int) -> int:
    """hpp halved until it divides the number of (sequence, head) pairs (the looped kernels need no tail guard)."""
    while hpp > 1 and pairs % hpp:
        hpp //= 2
    return max(1, hpp)


def _fwd_tile_launch(qkv, o, lse, causal, scale, cfg, interpret, bias=None):
    """(grid, runtime args, constexprs, launch options) of _short_attn_fwd_tile_kernel (cfg has HPP)."""
    B, N, _, H, d = qkv.shape
    hpp = _pairs_per_program(B * H, cfg["HPP"])
    args = dict(QKV=qkv, O=o, LSE=lse, **_qkv_strides(qkv), stride_ob=o.stride(0), stride_on=o.stride(1),
                stride_oh=o.stride(2), N=N, H=H, D=d, qk_scale=scale * _LOG2E,
                BIAS=qkv if bias is None else bias)  # fmt: skip
    const = dict(IS_CAUSAL=causal, TILE=cfg["BLOCK_M"], BLOCK_D=_bd(d), HAS_BIAS=bias is not None, HPP=hpp,
                 STAGES=cfg["STAGES"], **_dot_consts(qkv, interpret))  # fmt: skip
    return (B * H // hpp,), args, const, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _fwd_launch(qkv, o, lse, causal, scale, cfg, interpret, bias=None):
    """(grid, runtime args, constexprs, launch options) of the forward kernel; the AOT test compiles the same.
    bias: the projection's (3, H, d) contiguous, added to q, k, v in the kernel; None: none."""
    B, N, _, H, d = qkv.shape
    args = dict(QKV=qkv, O=o, LSE=lse, **_qkv_strides(qkv), stride_ob=o.stride(0), stride_on=o.stride(1),
                stride_oh=o.stride(2), N=N, H=H, D=d, qk_scale=scale * _LOG2E,
                BIAS=qkv if bias is None else bias)  # fmt: skip
    const = dict(IS_CAUSAL=causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_bd(d),
                 HAS_BIAS=bias is not None, **_dot_consts(qkv, interpret))  # fmt: skip
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return (triton.cdiv(N, cfg["BLOCK_M"]), B * H), args, const, opts


def _bwd_launch(qkv, o, do, dqkv, lse, delta, causal, scale, cfg, interpret, bias=None, dbias_part=None):
    """(kernel, grid, runtime args, constexprs, launch options) of the backward: the one-tile kernel (cfg has TILE;
    delta is then None, computed inside; bias as the forward's, its gradient's partial sums into dbias_part
    (B, 3, H, d) fp32) or the per-window kernel (no bias)."""
    B, N, _, H, d = qkv.shape
    args = dict(QKV=qkv, **_qkv_strides(qkv), stride_db=do.stride(0), stride_dn=do.stride(1), stride_dh=do.stride(2),
                stride_gb=dqkv.stride(0), stride_gn=dqkv.stride(1), stride_gs=dqkv.stride(2), stride_gh=dqkv.stride(3),
                N=N, H=H, D=d, qk_scale=scale * _LOG2E, sm_scale=scale)  # fmt: skip
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    consts = dict(IS_CAUSAL=causal, BLOCK_D=_bd(d), **_dot_consts(qkv, interpret))
    if "TILE" in cfg:
        args.update(O=o, DO=do, DQKV=dqkv, LSE=lse, stride_ob=o.stride(0), stride_on=o.stride(1), stride_oh=o.stride(2),
                    BIAS=qkv if bias is None else bias, DBIAS_PART=lse if dbias_part is None else dbias_part)
        hpp = _pairs_per_program(B * H, cfg.get("HPP", 1))
        return _short_attn_bwd_tile_kernel, (B * H // hpp,), args, \
            dict(consts, TILE=cfg["TILE"], HAS_BIAS=bias is not None, HPP=hpp, STAGES=cfg.get("STAGES", 1)), opts
    if bias is not None:
        raise ValueError(f"the per-window backward (N = {N} > {TILE_MAX}) takes no bias")
    args.update(DO=do, DQKV=dqkv, LSE=lse, DELTA=delta)
    const = dict(consts, WIN=cfg["WIN"], STEP=cfg["STEP"])
    return _short_attn_bwd_kernel, (triton.cdiv(N, cfg["WIN"]), B * H), args, const, opts


def _launch(kernel, grid, args, const, opts):
    kernel[grid](**args, **const, **opts)


class ShortAttentionQKVFn(torch.autograd.Function):
    """bias: None, or the qkv projection's (3*H*d,) bias (N <= TILE_MAX): added to q, k, v in the kernels, its
    gradient from the backward kernel's per-sequence column sums (one small torch sum over the sequences)."""

    @staticmethod
    def forward(ctx, qkv, causal, scale, bias):
        B, N, _, H, d = qkv.shape
        o = torch.empty((B, N, H, d), dtype=qkv.dtype, device=qkv.device)
        lse = torch.empty((B * H, N), dtype=torch.float32, device=qkv.device)
        b3 = None if bias is None else bias.view(3, H, d)
        cfg, interp = _fwd_config(N, d), not qkv.is_cuda
        if "HPP" in cfg:
            _launch(_short_attn_fwd_tile_kernel, *_fwd_tile_launch(qkv, o, lse, causal, scale, cfg, interp, b3))
        else:
            _launch(_short_attn_fwd_kernel, *_fwd_launch(qkv, o, lse, causal, scale, cfg, interp, b3))
        ctx.save_for_backward(qkv, o, lse, bias)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        qkv, o, lse, bias = ctx.saved_tensors
        B, N, _, H, d = qkv.shape
        do = do if do.stride(-1) == 1 else do.contiguous()
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        cfg = _bwd_config(N, d)
        if bias is not None:
            part = torch.empty((B, 3, H, d), dtype=torch.float32, device=qkv.device)
            _launch(*_bwd_launch(qkv, o, do, dqkv, lse, None, ctx.causal, ctx.scale, cfg, not qkv.is_cuda,
                                 bias.view(3, H, d), part))  # fmt: skip
            return dqkv, None, None, finish_sums(part, bias.dtype).view(-1)
        delta = None
        if "TILE" not in cfg:
            delta = torch.empty((B * H, N), dtype=torch.float32, device=qkv.device)
            _short_attn_bwd_preprocess_kernel[(triton.cdiv(N, 64), B * H)](
                o, do, delta, *o.stride()[:3], *do.stride()[:3], N, H, d, BLOCK_M=64, BLOCK_D=_bd(d)
            )
        _launch(*_bwd_launch(qkv, o, do, dqkv, lse, delta, ctx.causal, ctx.scale, cfg, not qkv.is_cuda))
        return dqkv, None, None, None


def short_attention_ref(qkv, causal=False, softmax_scale=None, upcast=False):
    """F.scaled_dot_product_attention of q, k, v = qkv.unbind(2), (B, N, H, d) out in qkv's dtype; upcast=True
    computes in float32 (the CPU path for bf16: torch's CPU bf16 SDPA is up to ~5x slower)."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, N, d) views
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)
    return o.transpose(1, 2).to(qkv.dtype)


def fuses_bias(x, n_tokens: int, bias_dtype, impl=None) -> bool:
    """Whether short_attention_qkvpacked(qkv, bias=b) with n_tokens per sequence adds b inside the kernels: the kernel
    path for x (qkv, or its projection's input: same device and dtype), n_tokens <= TILE_MAX, b in x's dtype, no
    autocast. A caller can then leave the bias out of its projection (and torch's separate sum for its gradient)."""
    return (use_triton(x, impl) and n_tokens <= TILE_MAX and bias_dtype == x.dtype
            and not torch.is_autocast_enabled(x.device.type))


def short_attention_qkvpacked(qkv, causal=False, softmax_scale=None, *, bias=None, impl=None):
    """Attention within each of B equal-length sequences: qkv (B, N, 3, H, d) -> (B, N, H, d), the Triton kernels on
    CUDA (and under the interpreter with impl="triton"), short_attention_ref elsewhere. bias (3*H*d,): the qkv
    projection's bias, not yet added to qkv (q, k, v = qkv + bias): in the kernels where fuses_bias, else added
    first. See the module docstring."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (batch, tokens, 3, heads, head_dim), got {tuple(qkv.shape)}")
    if qkv.shape[-1] > 128:
        raise ValueError(f"head_dim {qkv.shape[-1]} > 128 is not supported by the kernel; use SDPA")
    if not qkv.is_floating_point():
        raise TypeError(f"short_attention_qkvpacked needs a floating-point qkv, got {qkv.dtype}")
    if bias is not None and bias.shape != (qkv[0, 0].numel(),):
        raise ValueError(f"bias must be ({qkv[0, 0].numel()},) for qkv of shape {tuple(qkv.shape)}, got "
                         f"{tuple(bias.shape)}")  # fmt: skip
    scale = qkv.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if bias is not None and not fuses_bias(qkv, qkv.shape[1], bias.dtype, impl):
        qkv, bias = qkv + bias.view(qkv.shape[2:]), None
    if not use_triton(qkv, impl):
        upcast = qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            return short_attention_ref(qkv, causal, scale, upcast=upcast)
    if qkv.shape[0] * qkv.shape[1] == 0:  # nothing to launch; the reference keeps the (empty) output in the graph
        return short_attention_ref(qkv if bias is None else qkv + bias.view(qkv.shape[2:]), causal, scale)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if bias is not None:
        bias = bias.contiguous()  # the kernels index it as BIAS + offsets (a strided view read other elements)
    return ShortAttentionQKVFn.apply(qkv, bool(causal), scale, bias)
