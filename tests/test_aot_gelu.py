"""sm_90 ahead-of-time compile of the GELU-backward kernel in bf16 (no GPU needed), at the presets' MLP widths (B text
2,048, B 3,072, L 4,096, H 5,120), with the launcher's own tile and warps (`_bwd_launch` on meta tensors), and with
the loads pipelined two tiles deep ("/2": BWD_STAGES = 2). Asserts no spills and no local memory; `pytest -s` prints
the resource table."""
import sys

import pytest
import torch

from kernels import linear_gelu as _public  # noqa: F401 (kernels/__init__ exports the op, not the module)
from kernels.aot import check, compile_sm90_like
from tests.conftest import aot_module

ge = sys.modules["kernels.gelu"]

M_AOT = 51203  # B/16's 1024 x 50 tokens, plus an odd tail
CASES = [(f"gelu bwd{'/2' if st == 2 else ''} N={n}", n, st) for n in (2048, 3072, 4096, 5120) for st in (1, 2)]


def _compile(n, stages):
    x = torch.empty(M_AOT, n, dtype=torch.bfloat16, device="meta")
    # B/16's row groups: 16 programs per SM on 132 SMs over 3,072 / 64 column blocks (the rows are a runtime argument)
    part = torch.empty(44, n, dtype=torch.float32, device="meta")
    _, args, const, opts = ge._bwd_launch(x, x, x, part, 1168)
    const["STAGES"] = stages
    return compile_sm90_like(ge._gelu_bwd_kernel, args, const, **opts)


pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)


@pytest.mark.parametrize("label,n,stages", CASES, ids=[c[0] for c in CASES])
def test_sm90_resources(resources, label, n, stages):
    check(resources[label], f"sm_90 bf16 {label}")
