"""sm_90 ahead-of-time compile of the one-pass AdamW kernel (kernels.adamw) for bf16 and fp16 weights, with and without
the gradient scale, with the launcher's own block and warps (`_launch` on meta tensors). Asserts no spills and no
local memory, and no shared memory: every load and store in one layout, none moved through shared memory to change it
(a flat block did that for the fp32 stores); `pytest -s` prints the resource table."""
import pytest
import torch

from kernels import adamw as ad
from kernels.aot import check, compile_sm90_like
from tests.conftest import aot_module

CASES = [(f"adamw {dt} {'scaled' if s else 'plain'}", dt, s) for dt in ("bf16", "fp16") for s in (False, True)]


def _compile(dt, scaled):
    n = 1_048_579  # an odd tail
    p = torch.empty(n, dtype=torch.bfloat16 if dt == "bf16" else torch.float16, device="meta")
    w = torch.empty(n, dtype=torch.float32, device="meta")
    one = torch.empty((), dtype=torch.float32, device="meta")
    _, args, const, opts = ad._launch(p, p, w, w, w, one, one, one if scaled else None, 0.1, 0.9, 0.98, 1e-6)
    return compile_sm90_like(ad._adamw_cast_kernel, args, const, **opts)


pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)


@pytest.mark.parametrize("label,dt,scaled", CASES, ids=[c[0] for c in CASES])
def test_sm90_resources(resources, label, dt, scaled):
    check(resources[label], f"sm_90 {label}")
    assert resources[label].shared == 0, f"{label}: {resources[label].shared} bytes of shared memory (a layout change)"
