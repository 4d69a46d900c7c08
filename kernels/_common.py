"""Helpers shared by the kernel files: backend choice."""
import os

import torch

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
