"""Masked patch embedding: gather kept patches + patch GEMM + bias + pos-embed, in one kernel.

    out[b, k] = patch(images[b], keep[b, k]) @ weight.T + bias + pos_embed[keep[b, k]]      # (B, K, D)

What it fuses: open_clip runs conv1 over *all* patches and then drops most of them (FLIP/CLIPA keep
25-50%); unfold + gather + linear materialises an im2col copy. Here each output tile computes the pixel
addresses of its patches from `keep` in-kernel, so dropped patches are never read and no patch tensor
exists. bias and pos_embed[keep] are added in the epilogue, before the single store.

Shapes / dtypes:
  images (B, C, H, W) fp32/bf16/fp16, any strides; or uint8 with `mean`/`std` (per channel, in [0, 1]
    pixel units as open_clip's OPENAI_DATASET_MEAN): normalisation u*scale+shift runs in fp32 inside the
    loads, so the float image never exists.
  keep (B, K) int32/int64 indices into the row-major (H/p)*(W/p) patch grid, or None = all patches (then
    no index tensor is read). Indices must lie in [0, N): not checked on the device (that would sync).
  weight (D, C*p*p), the flattening of a conv weight (D, C, p, p): column c*p*p + i*p + j is pixel (i, j)
    of channel c. bias (D,) or None. pos_embed (N, D). Parameters may be fp32 under bf16 images
    (autocast style): tiles are cast to the compute dtype in registers.
  out (B, K, D) in the images' dtype (uint8: `out_dtype`, default the autocast dtype or weight's dtype).

Kernels (GEMM view: M = B*K kept patches, N = D, K-dim = C*p*p):
  _patch_embed_fwd_kernel   grid (M/BLOCK_M * D/BLOCK_N,), n-tiles of one m-tile adjacent so its gathered
                            pixels are re-read from L2, not HBM. fp32 accumulation in tl.dot (wgmma on sm_90).
  _patch_embed_bwd_dw_kernel  dW = patches^T @ dOut with the same in-kernel gather; the m-loop is split over
                            SPLIT programs (grid D/BN x CPP/BK is only 36-48 tiles for B/16, L/14: too few
                            for 132 SMs), each writing an fp32 partial that torch sums in fixed order, so dW
                            is deterministic. dbias rides along in the programs of the first CPP-tile.
  _patch_embed_bwd_dpos_kernel  dpos rows by index. deterministic=True: keep sorted once (stable), then one
                            program per (patch, D-tile) sums its rows in order; otherwise fp32 atomics.
                            keep=None: dOut.sum(0) in torch (a plain, deterministic reduction).

Block sizes (bf16/fp16, H100; resources from the sm_90 AOT compile in tests/test_aot_patch_embed.py):
  forward BLOCK_M=128 kept patches x BLOCK_N=128 of D x BLOCK_K=64 of C*p*p, 8 warps (two warpgroups of 64 rows
  each issue wgmma), 3 stages: acc is 64 fp32 regs/thread; both operand tiles are cp.async-pipelined, 32 KiB
  per stage (96 KiB), 130 regs. j = kk % p lets the alignment analysis see runs of p contiguous pixels
  (16-byte vectors for p=16) and offsets are 32-bit unless a tensor passes 2^31 elements: the first version
  (64-bit offsets, subtraction-based column split) spilled 2 KiB at this tile.
  C*p*p = 588 (p=14) is not a multiple of 16: weight rows are not 16-byte aligned, loads go through registers
  (not cp.async), and BLOCK_K=64 needs 254 regs; BLOCK_K=32 needs 194, no spills (K tail: 608/588 = 3% padding).
  dW: 128 of D x 128 of C*p*p per program, rows in steps of 64, 8 warps, 3 stages: 144-160 regs, 64 KiB.
  fp32 images: exact fp32 by default, on FMA units (64x64x32 / 32x64x64 tiles, 4 warps; larger ones spill);
  tf32 only where torch's own matmul would use it (torch.backends.cuda.matmul.allow_tf32).
"""
import torch
import triton
import triton.language as tl

from kernels._common import cast_rtne, dot_prec, interpreting, mma, use_triton
from kernels.linear import column_sums


@triton.jit
def _patch_rows(keep, rm, mask_m, K, GW, stride_b, stride_h, stride_w, stride_kb, stride_kk,
                P: tl.constexpr, HAS_KEEP: tl.constexpr, I64: tl.constexpr):
    """Per row m = b*K + k: patch index n and the offset of its top-left pixel (int64 only if I64)."""
    b = rm // K
    k = rm % K
    if HAS_KEEP:
        n = tl.load(keep + b * stride_kb + k * stride_kk, mask=mask_m, other=0).to(tl.int32)
    else:
        n = k
    gy = n // GW
    gx = n % GW
    if I64:
        b = b.to(tl.int64)
        gy = gy.to(tl.int64)
    return n, b * stride_b + gy * (P * stride_h) + gx * (P * stride_w)


@triton.jit
def _patch_tile(img, base, mask_m, kk, mask_k, scale, shift, stride_c, stride_h, stride_w,
                P: tl.constexpr, NORMALIZE: tl.constexpr, DT: tl.constexpr, INTERP_BF16: tl.constexpr):
    """(BLOCK_M, BLOCK_K) tile of flattened patches: column kk = c*P*P + i*P + j is pixel (i, j) of channel c.
    j = kk % P keeps runs of P columns contiguous for the compiler's alignment analysis (vector loads, p=16)."""
    c = kk // (P * P)
    i = (kk // P) % P
    j = kk % P
    off = c * stride_c + i * stride_h + j * stride_w  # (BLOCK_K,)
    mask = mask_m[:, None] & mask_k[None, :]
    x = tl.load(img + (base[:, None] + off[None, :]), mask=mask, other=0)
    if NORMALIZE:  # uint8 -> (u/255 - mean)/std = u*scale + shift, in fp32
        s = tl.load(scale + c, mask=mask_k, other=0.0)
        t = tl.load(shift + c, mask=mask_k, other=0.0)
        x = tl.where(mask, x.to(tl.float32) * s[None, :] + t[None, :], 0.0)
    return cast_rtne(x, DT, INTERP_BF16 and NORMALIZE)


@triton.jit
def _patch_embed_fwd_kernel(img, keep, w, bias, pos, scale, shift, out,
                            M, K, D, CPP, GW,
                            stride_b, stride_c, stride_h, stride_w, stride_kb, stride_kk,
                            P: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, I64: tl.constexpr,
                            NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    DT = out.dtype.element_ty
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid - pid_m * num_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < D
    n, base = _patch_rows(keep, rm, mask_m, K, GW, stride_b, stride_h, stride_w, stride_kb, stride_kk,
                          P, HAS_KEEP, I64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CPP, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < CPP
        x = _patch_tile(img, base, mask_m, kk, mask_k, scale, shift, stride_c, stride_h, stride_w, P, NORMALIZE, DT,
                        INTERP_BF16)
        wt = tl.load(w + rn[None, :] * CPP + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(x, cast_rtne(wt, DT, INTERP_BF16), acc, DOT_PREC, INTERP_BF16)  # (BLOCK_M, BLOCK_N)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(pos + n[:, None] * D + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    ro = rm.to(tl.int64) if I64 else rm
    tl.store(out + ro[:, None] * D + rn[None, :], cast_rtne(acc, DT, INTERP_BF16), mask=mask)


@triton.jit
def _patch_embed_bwd_dw_kernel(img, keep, dout, scale, shift, dw, dbias,
                               M, K, D, CPP, GW, ROWS_PER_SPLIT,
                               stride_b, stride_c, stride_h, stride_w, stride_kb, stride_kk,
                               P: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, I64: tl.constexpr,
                               NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[s] (D, CPP) and dbias[s] (D,) fp32 partials of split s over rows [s*ROWS_PER_SPLIT, +ROWS_PER_SPLIT)."""
    DT = dout.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = rn < D
    mask_k = kk < CPP
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_lo = pid_s * ROWS_PER_SPLIT
    m_hi = tl.minimum(m_lo + ROWS_PER_SPLIT, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask_m = rm < m_hi
        _, base = _patch_rows(keep, rm, mask_m, K, GW, stride_b, stride_h, stride_w, stride_kb, stride_kk,
                              P, HAS_KEEP, I64)
        x = _patch_tile(img, base, mask_m, kk, mask_k, scale, shift, stride_c, stride_h, stride_w, P, NORMALIZE, DT,
                        INTERP_BF16)
        ro = rm.to(tl.int64) if I64 else rm
        do = tl.load(dout + ro[:, None] * D + rn[None, :], mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0)  # (BLOCK_M, BLOCK_N)
        acc = mma(tl.trans(do), x, acc, DOT_PREC, INTERP_BF16)  # (BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            db += tl.sum(do.to(tl.float32), axis=0)
    part = pid_s.to(tl.int64) * D * CPP
    tl.store(dw + part + rn[:, None] * CPP + kk[None, :], acc, mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(dbias + pid_s * D + rn, db, mask=mask_n)


@triton.jit
def _patch_embed_bwd_dpos_kernel(dout, keep_flat, order, offsets, dpos, M, D,
                                 DETERMINISTIC: tl.constexpr, INTERP_BF16: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """DETERMINISTIC: program (n, d-tile) sums dout rows order[offsets[n]:offsets[n+1]] in order into dpos[n]
    (any dtype). Otherwise program (m-tile, d-tile) atomically adds its rows into fp32 dpos[keep[m]]."""
    pid = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = rd < D
    if DETERMINISTIC:
        lo = tl.load(offsets + pid)
        hi = tl.load(offsets + pid + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < hi
            rows = tl.load(order + rr, mask=mask_r, other=0).to(tl.int64)
            g = tl.load(dout + rows[:, None] * D + rd[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32), axis=0)
        tl.store(dpos + pid.to(tl.int64) * D + rd, cast_rtne(acc, dpos.dtype.element_ty, INTERP_BF16), mask=mask_d)
    else:
        rm = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = rm < M
        n = tl.load(keep_flat + rm, mask=mask_r, other=0).to(tl.int64)
        mask = mask_r[:, None] & mask_d[None, :]
        g = tl.load(dout + rm.to(tl.int64)[:, None] * D + rd[None, :], mask=mask, other=0.0)
        tl.atomic_add(dpos + n[:, None] * D + rd[None, :], g.to(tl.float32), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


def _fwd_config(dtype, cpp, interpret=None):
    """Forward tiles (see the module docstring); small tiles under the interpreter so tests cover several tiles."""
    if interpreting() if interpret is None else interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:  # exact fp32 runs on FMA units: 64x128 tiles spill there (sm_90 AOT), 64x64 do not
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    # C*p*p % 16 != 0 (p=14: 588): weight rows are not 16-byte aligned, loads go through registers instead of
    # cp.async; BLOCK_K=64 then needs 254 registers (sm_90 AOT), BLOCK_K=32 194 and no spills.
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64 if cpp % 16 == 0 else 32, "num_warps": 8, "num_stages": 3}


def _dw_config(dtype, interpret=None):
    if interpreting() if interpret is None else interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}


def _dw_split(M, tiles, block_m, n_sm):
    """Row splits for dW: about two programs per SM, each split at least 4 row-tiles long. -> (split, rows)."""
    split = max(1, min(triton.cdiv(2 * n_sm, tiles), triton.cdiv(M, 4 * block_m)))
    rows = triton.cdiv(triton.cdiv(M, split), block_m) * block_m
    return triton.cdiv(M, rows), rows


def _dpos_config(interpret=None):
    """dpos is a gather/scatter of dout rows: 16 rows x 128 columns (256 B of bf16 per row) per step."""
    interp = interpreting() if interpret is None else interpret
    return {"BLOCK_R": 16, "BLOCK_D": 16 if interp else 128, "num_warps": 4, "num_stages": 2}


def _common_args(images, keep, D, p):
    """Runtime arguments shared by the forward and dW kernels (works on meta tensors, for AOT compiles)."""
    B, C, H, W = images.shape
    K = keep.shape[1] if keep is not None else (H // p) * (W // p)
    ks = (keep.stride(0), keep.stride(1)) if keep is not None else (0, 0)
    args = dict(M=B * K, K=K, D=D, CPP=C * p * p, GW=W // p, stride_b=images.stride(0), stride_c=images.stride(1),
                stride_h=images.stride(2), stride_w=images.stride(3), stride_kb=ks[0], stride_kk=ks[1])
    big = max(images.numel(), B * K * D) >= 2**31 - 1  # 32-bit offsets otherwise: fewer registers per pointer
    return args, dict(P=p, HAS_KEEP=keep is not None, I64=big)


def _fwd_launch(images, keep, weight, bias, pos_embed, p, scale, shift, out, interpret=None):
    """-> (grid, args, constexprs, launch options) of the forward kernel (interpret=False: the GPU choice)."""
    interpret = interpreting() if interpret is None else interpret
    D = weight.shape[0]
    args, const = _common_args(images, keep, D, p)
    cfg = _fwd_config(out.dtype, args["CPP"], interpret)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    dummy = weight
    args = dict(img=images, keep=keep if keep is not None else dummy, w=weight,
                bias=bias if bias is not None else dummy, pos=pos_embed, scale=scale if scale is not None else dummy,
                shift=shift if shift is not None else dummy, out=out, **args)
    const.update(HAS_BIAS=bias is not None, NORMALIZE=scale is not None, DOT_PREC=dot_prec(out.dtype),
                 INTERP_BF16=interpret and out.dtype == torch.bfloat16, **cfg)
    grid = (triton.cdiv(args["M"], cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_N"]),)
    return grid, args, const, opts


def _dw_launch(dout, images, keep, p, scale, shift, has_bias, dw, db, n_sm, interpret=None):
    """-> (grid, args, constexprs, launch options) of the dW kernel; dw (split, D, CPP), db (split, D) fp32."""
    interpret = interpreting() if interpret is None else interpret
    D = dout.shape[-1]
    args, const = _common_args(images, keep, D, p)
    cfg = _dw_config(dout.dtype, interpret)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    tiles = (triton.cdiv(D, cfg["BLOCK_N"]), triton.cdiv(args["CPP"], cfg["BLOCK_K"]))
    split, rows = _dw_split(args["M"], tiles[0] * tiles[1], cfg["BLOCK_M"], n_sm)
    dummy = dout
    args = dict(img=images, keep=keep if keep is not None else dummy, dout=dout,
                scale=scale if scale is not None else dummy, shift=shift if shift is not None else dummy,
                dw=dw, dbias=db if db is not None else dummy, ROWS_PER_SPLIT=rows, **args)
    const.update(HAS_BIAS=has_bias, NORMALIZE=scale is not None, DOT_PREC=dot_prec(dout.dtype),
                 INTERP_BF16=interpret and dout.dtype == torch.bfloat16, **cfg)
    return (*tiles, split), args, const, opts


def _patch_embed_fwd(images, keep, weight, bias, pos_embed, p, scale, shift, out_dtype):
    B = images.shape[0]
    D = weight.shape[0]
    K = keep.shape[1] if keep is not None else pos_embed.shape[0]
    out = torch.empty(B, K, D, device=images.device, dtype=out_dtype)
    if B * K == 0:
        return out
    bias = bias.contiguous() if bias is not None else None
    grid, args, const, opts = _fwd_launch(images, keep, weight.contiguous(), bias, pos_embed.contiguous(), p,
                                          scale, shift, out)
    _patch_embed_fwd_kernel[grid](**args, **const, **opts)
    return out


def _patch_embed_bwd_dw(dout, images, keep, p, scale, shift, has_bias):
    """-> dW (D, C*p*p) fp32 and dbias (D,) fp32 (or None); dout (B, K, D) contiguous."""
    B, K, D = dout.shape
    CPP = images.shape[1] * p * p
    if B * K == 0:
        return dout.new_zeros(D, CPP, dtype=torch.float32), dout.new_zeros(D, dtype=torch.float32) if has_bias else None
    n_sm = torch.cuda.get_device_properties(dout.device).multi_processor_count if dout.is_cuda else 8
    cfg = _dw_config(dout.dtype)
    tiles = triton.cdiv(D, cfg["BLOCK_N"]) * triton.cdiv(CPP, cfg["BLOCK_K"])
    split, _ = _dw_split(B * K, tiles, cfg["BLOCK_M"], n_sm)
    dw = torch.empty(split, D, CPP, device=dout.device, dtype=torch.float32)
    db = torch.empty(split, D, device=dout.device, dtype=torch.float32) if has_bias else None
    grid, args, const, opts = _dw_launch(dout, images, keep, p, scale, shift, has_bias, dw, db, n_sm)
    _patch_embed_bwd_dw_kernel[grid](**args, **const, **opts)
    # fixed-order sum of the split partials: deterministic
    return dw.sum(0) if split > 1 else dw[0], (db.sum(0) if split > 1 else db[0]) if has_bias else None


def _patch_embed_bwd_dpos(dout, keep, N, dtype, deterministic):
    """dpos (N, D) in `dtype`: rows of dout (B, K, D) accumulated at their patch index."""
    B, K, D = dout.shape
    if keep is None:  # K == N, every patch once per image: the column sums of dout as (B, N * D)
        return column_sums(dout.reshape(B, K * D), dtype, impl="triton" if interpreting() else None).view(K, D)
    keep_flat = keep.reshape(-1)
    cfg = _dpos_config()
    BLOCK_R, BLOCK_D = cfg["BLOCK_R"], cfg["BLOCK_D"]
    if deterministic:
        vals, order = torch.sort(keep_flat, stable=True)
        offsets = torch.searchsorted(vals, torch.arange(N + 1, device=keep.device, dtype=vals.dtype))
        dpos = torch.empty(N, D, device=dout.device, dtype=dtype)
        _patch_embed_bwd_dpos_kernel[(N, triton.cdiv(D, BLOCK_D))](
            dout, keep_flat, order, offsets, dpos, B * K, D, DETERMINISTIC=True,
            INTERP_BF16=interpreting() and dtype == torch.bfloat16, **cfg)
        return dpos
    dpos = torch.zeros(N, D, device=dout.device, dtype=torch.float32)
    if B * K:
        _patch_embed_bwd_dpos_kernel[(triton.cdiv(B * K, BLOCK_R), triton.cdiv(D, BLOCK_D))](
            dout, keep_flat, keep_flat, keep_flat, dpos, B * K, D, DETERMINISTIC=False, INTERP_BF16=False,
            **cfg)
    return dpos.to(dtype)


# ----------------------------------------------------------------------------------------------- reference


def _check(images, keep, weight, bias, pos_embed, patch_size):
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    p = patch_size
    if p <= 0 or H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch_size {p}")
    N = (H // p) * (W // p)
    if weight.dim() != 2 or weight.shape[1] != C * p * p:
        raise ValueError(f"weight must be (D, C*p*p) = (D, {C * p * p}), got {tuple(weight.shape)}")
    D = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be ({D},), got {tuple(bias.shape)}")
    if tuple(pos_embed.shape) != (N, D):
        raise ValueError(f"pos_embed must be (N, D) = ({N}, {D}) for {N} patches, got {tuple(pos_embed.shape)}")
    if keep is not None:
        if keep.dim() != 2 or keep.shape[0] != B:
            raise ValueError(f"keep must be (B, K) = ({B}, K), got {tuple(keep.shape)}")
        if keep.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"keep must be int32 or int64, got {keep.dtype}")
    return N, D


def _norm_params(images, mean, std, out_dtype, weight):
    """uint8 images: -> (scale, shift) fp32 (C,) with x = u*scale + shift, and the output dtype."""
    if images.dtype != torch.uint8:
        if mean is not None or std is not None or out_dtype is not None:
            raise ValueError("mean/std/out_dtype are for uint8 images only; normalise float images beforehand")
        return None, None, images.dtype
    if mean is None or std is None:
        raise ValueError("uint8 images need mean and std (per channel, in [0, 1] pixel units)")
    C = images.shape[1]
    mean = torch.as_tensor(mean, dtype=torch.float64, device=images.device).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float64, device=images.device).reshape(-1)
    if mean.numel() != C or std.numel() != C:
        raise ValueError(f"mean and std need {C} values, got {mean.numel()} and {std.numel()}")
    if out_dtype is None:
        dev = images.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    return (1.0 / (255.0 * std)).float(), (-mean / std).float(), out_dtype


def masked_patch_embed_ref(images, keep, weight, bias, pos_embed, patch_size, upcast=False, *,
                           mean=None, std=None, out_dtype=None):
    """Plain PyTorch: unfold patches -> gather rows `keep` -> `@ weight.T + bias + pos_embed[keep]`.

    Computes in the output dtype (the images' dtype; parameters are cast to it, as autocast would), or in
    float32 when `upcast`. uint8 images are normalised first (u*scale + shift, fp32 or wider). Differentiable
    in weight, bias and pos_embed.
    """
    N, D = _check(images, keep, weight, bias, pos_embed, patch_size)
    scale, shift, odt = _norm_params(images, mean, std, out_dtype, weight)
    if scale is not None:
        ndt = torch.promote_types(torch.float32, odt)
        images = (images.to(ndt) * scale.to(ndt)[:, None, None] + shift.to(ndt)[:, None, None]).to(odt)
    B, C, H, W = images.shape
    p = patch_size
    dt = torch.float32 if upcast else odt
    x = images.to(dt).reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, N, C * p * p)
    pos = pos_embed.to(dt)
    if keep is not None:
        x = x[torch.arange(B, device=x.device)[:, None], keep.long()]  # (B, K, C*p*p)
        pos = pos[keep.long()]  # (B, K, D)
    out = x @ weight.to(dt).t() + pos
    if bias is not None:
        out = out + bias.to(dt)
    return out.to(odt)


# ----------------------------------------------------------------------------------------------- autograd + op


class MaskedPatchEmbedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, keep, weight, bias, pos_embed, patch_size, scale, shift, out_dtype, deterministic):
        out = _patch_embed_fwd(images, keep, weight, bias, pos_embed, patch_size, scale, shift, out_dtype)
        ctx.save_for_backward(images, keep, scale, shift)
        ctx.p, ctx.deterministic, ctx.has_bias = patch_size, deterministic, bias is not None
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None, pos_embed.dtype)
        ctx.N = pos_embed.shape[0]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        images, keep, scale, shift = ctx.saved_tensors
        w_dt, b_dt, pos_dt = ctx.dtypes
        dout = dout.contiguous()
        dw = db = dpos = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dw32, db32 = _patch_embed_bwd_dw(dout, images, keep, ctx.p, scale, shift, ctx.needs_input_grad[3])
            dw = dw32.to(w_dt) if ctx.needs_input_grad[2] else None
            db = db32.to(b_dt) if ctx.needs_input_grad[3] else None
        if ctx.needs_input_grad[4]:
            dpos = _patch_embed_bwd_dpos(dout, keep, ctx.N, pos_dt, ctx.deterministic)
        return None, None, dw, db, dpos, None, None, None, None, None


def masked_patch_embed(images, keep, weight, bias, pos_embed, patch_size, *, impl=None, deterministic=False,
                       mean=None, std=None, out_dtype=None):
    """(B, C, H, W) images -> (B, K, D) embeddings of the kept patches; see the module docstring.

    deterministic: pos_embed's gradient without atomics (dW and dbias are always deterministic).
    mean/std/out_dtype: uint8 images only (normalisation folded into the loads).
    Under autocast, fp32 images are cast to the autocast dtype first (as conv1 would compute).
    """
    if images.requires_grad:
        raise ValueError("masked_patch_embed gives no gradient to images (they are data); "
                         "pass images without requires_grad, e.g. images.detach()")
    _check(images, keep, weight, bias, pos_embed, patch_size)
    dev = images.device.type
    if images.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        images = images.to(torch.get_autocast_dtype(dev))
    if not use_triton(images, impl):
        return masked_patch_embed_ref(images, keep, weight, bias, pos_embed, patch_size,
                                      mean=mean, std=std, out_dtype=out_dtype)
    scale, shift, odt = _norm_params(images, mean, std, out_dtype, weight)
    if odt not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"images/out_dtype must be float32, bfloat16 or float16 (or uint8 images), got {odt}")
    return MaskedPatchEmbedFn.apply(images, keep, weight, bias, pos_embed, patch_size, scale, shift, odt,
                                    deterministic)
