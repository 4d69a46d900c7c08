"""Helpers shared by the kernel files: backend choice, and the Triton helpers that work around the interpreter."""
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
