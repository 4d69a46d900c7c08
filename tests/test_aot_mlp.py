"""sm_90 ahead-of-time compile of the MLP's fused matmul (kernels.mlp) in bf16 at the goal points' shapes (B/16: 51,200
tokens, width 768, MLP 3,072; L/16: 18,944 tokens, 1,024, 4,096), both epilogues, with the launcher's own config
(`_launch` on meta tensors). Asserts wgmma, no spills and no local memory; `pytest -s` prints the resource table."""
import sys

import pytest
import torch

from kernels import mlp as _public  # noqa: F401 (kernels/__init__ exports the op, not the module)
from kernels.aot import check, compile_sm90_like
from tests.conftest import aot_module

km = sys.modules["kernels.mlp"]
CASES = [(f"{name} {'dgelu' if dgelu else 'bias+gelu'}", m, k, n, dgelu)
         for name, m, k, n in (("B/16", 51200, 768, 3072), ("L/16", 18944, 1024, 4096)) for dgelu in (False, True)]


def _compile(m, k, n, dgelu):
    bf = dict(dtype=torch.bfloat16, device="meta")
    h = torch.empty(m, n, **bf)
    if dgelu:  # dh = (dy @ w2) * GELU'(h): w2 (k, n) row-major
        a, b, bias = torch.empty(m, k, **bf), torch.empty(k, n, **bf), None
        part = torch.empty(m // 128, n, dtype=torch.float32, device="meta")
    else:  # h = x @ w1^T + b1: w1 (n, k), read transposed
        a, b, bias, part = torch.empty(m, k, **bf), torch.empty(n, k, **bf).t(), torch.empty(n, **bf), None
    _, args, const, opts = km._launch(a, b, bias, h, torch.empty_like(h), part, dgelu)
    return compile_sm90_like(km._gemm_gelu_kernel, args, const, **opts)


pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)


@pytest.mark.parametrize("label,m,k,n,dgelu", CASES, ids=[c[0] for c in CASES])
def test_sm90_resources(resources, label, m, k, n, dgelu):
    check(resources[label], f"sm_90 bf16 {label}")
    assert resources[label].wgmma, f"{label}: no wgmma in the PTX"
