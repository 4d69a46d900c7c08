"""Helpers shared by the kernel files: backend choice, and the Triton helpers that work around the interpreter."""
import functools
import os

import torch
import triton
import triton.language as tl

IMPLS = (None, "triton", "ref")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor, impl: str | None) -> bool:
    """True when the op should launch its Triton kernel for tensor `x`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        return False
    if impl == "triton":
        if not (x.is_cuda or interpreting()):
            raise RuntimeError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    return x.is_cuda


def dot_prec(dtype) -> str:
    """tl.dot's input_precision: fp32 operands in tf32 only where torch's own matmul would use it."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


# INTERP_BF16 (set only under TRITON_INTERPRET with bf16 tiles) works around two bugs of triton 3.8's interpreter:
# tl.dot multiplies bf16 operands as their raw uint16 bits, and fp32 -> bf16 casts truncate. The workarounds keep
# the GPU's math: bf16 products are exact in fp32, and the hand-written cast rounds to nearest even like cvt.rn.
@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    """acc += a @ b with fp32 accumulation."""
    if INTERP_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def cast_rtne(x, DT: tl.constexpr, INTERP_BF16: tl.constexpr):
    """x.to(DT), rounding to nearest even."""
    if INTERP_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DT)


# --- the partial sums' finish: kernels.layer_norm, kernels.gelu and kernels.short_attention write fp32 partial sums
# (one row per program or per sequence) of their weight / bias gradients; a column sum over those rows finishes them.
@triton.jit
def _colsum_kernel(P, OUT, R, C, stride_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   INTERP_BF16: tl.constexpr):  # fmt: skip
    """OUT[c] = sum over r of P[r, c] in fp32, stored in OUT's dtype. Program: BLOCK_C columns, all rows."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(P + rows[:, None].to(tl.int64) * stride_r + cols[None, :],
                       mask=(rows[:, None] < R) & c_ok[None, :], other=0.0)  # fmt: skip
    tl.store(OUT + cols, cast_rtne(tl.sum(acc, 0), OUT.dtype.element_ty, INTERP_BF16), mask=c_ok)


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count_of(device: torch.device) -> int:
    """The device's SM count (4 for a CPU tensor under the interpreter)."""
    if device.type != "cuda":
        return 4
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


LONG_ROWS = 512  # from this many partial rows on, 16-column blocks step 512 rows at a time (below)


def colsum_config(cols: int, sms: int, rows: int = 0) -> dict:
    """The widest column block (64, 32 or 16 fp32: 256, 128 or 64 contiguous bytes per row) that still gives every
    SM a program, rows per step so a tile holds 4,096 values (32 per thread with 4 warps); with 16-column blocks and
    at least LONG_ROWS rows, 512 rows per step (8,192 values): twice the loads in flight in each of the few programs.
    On an H200 (bench/results/nvidia-h200-2026-11-27-bdf2175/sweep/sweep.md) 512 rows took 0.0105 against 0.0124 ms
    at the layer norm's (1,024 x 2,304) partials and 0.0100 against 0.0121 ms at the qkv bias's (1,024 x 2,304), and
    0.0071 against 0.0047 ms at the GELU bias's 22 rows, where most of the tile is masked off."""
    block_c = next((b for b in (64, 32) if triton.cdiv(cols, b) >= sms), 16)
    block_r = 512 if block_c == 16 and rows >= LONG_ROWS else 4096 // block_c
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 4}


def _colsum_launch(part2d: torch.Tensor, out: torch.Tensor, sms: int):
    """(grid, runtime args, constexprs, launch options) of _colsum_kernel; the AOT test compiles the same."""
    R, C = part2d.shape
    cfg = colsum_config(C, sms, R)
    args = dict(P=part2d, OUT=out, R=R, C=C, stride_r=part2d.stride(0))
    const = dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"],
                 INTERP_BF16=interpreting() and out.dtype == torch.bfloat16)  # fmt: skip
    return (triton.cdiv(C, cfg["BLOCK_C"]),), args, const, {"num_warps": cfg["num_warps"]}


FINISH = "triton"  # "triton": _colsum_kernel on CUDA (and under the interpreter); "torch": part.sum(0) and a cast


def finish_sums(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part (R, ...) fp32 partial sums -> their sum over R, shape part.shape[1:], in `dtype`: one kernel that reads
    each partial once and writes the result rounded (to nearest even), where torch's part.sum(0).to(dtype) is a
    reduction over the outer dim plus a cast: its reductions took ~12.5 us per call at the L/16 96 px shapes on an
    H100, 136 calls and 1.7 ms per step (bench/results/nvidia-h100-80gb-hbm3-2026-11-26-c9d6f1c/profile_l16).
    Not yet timed on a GPU: bench/sweep_kernels.py --kernels finish sets the two side by side. FINISH = "torch"
    keeps torch's."""
    if FINISH == "torch" or part.numel() == 0 or not (part.is_cuda or interpreting()):
        return part.sum(0).to(dtype)
    part2d = part.reshape(part.shape[0], -1)
    if part2d.stride(-1) != 1:
        part2d = part2d.contiguous()
    out = torch.empty(part.shape[1:], dtype=dtype, device=part.device)
    grid, args, const, opts = _colsum_launch(part2d, out.view(-1), _sm_count_of(part.device))
    _colsum_kernel[grid](**args, **const, **opts)
    return out
