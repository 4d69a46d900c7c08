"""sm_90 ahead-of-time compile of the partial-sum finish (kernels._common._colsum_kernel; no GPU needed) with the
launcher's own config (`_colsum_launch` on meta tensors, 132 SMs) at the widths the kernels finish: layer norm's
2-3 x 768 / 1,024 rows of 1,056 partials (8 programs per SM), GELU's bias (3,072 / 4,096 columns of 22 / 16 row
groups), the attention qkv bias (3 x 768 / 1,024 columns of one row per sequence). Asserts no spills and no local
memory, fp32 and bf16 out; `pytest -s` prints the resource table."""
import pytest
import torch

from kernels._common import _colsum_kernel, _colsum_launch
from kernels.aot import check, compile_sm90_like
from tests.conftest import aot_module

CASES = [(f"colsum {r}x{c} -> {str(dt).split('.')[-1]}", r, c, dt)
         for r, c in ((1056, 2304), (1056, 3072), (22, 3072), (16, 4096), (1024, 2304), (512, 3072), (511, 3072))
         for dt in (torch.float32, torch.bfloat16)]


def _compile(r, c, dtype):
    part = torch.empty(r, c, dtype=torch.float32, device="meta")
    out = torch.empty(c, dtype=dtype, device="meta")
    _, args, const, opts = _colsum_launch(part, out, 132)
    return compile_sm90_like(_colsum_kernel, args, const, **opts)


pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)


@pytest.mark.parametrize("label,r,c,dtype", CASES, ids=[c[0] for c in CASES])
def test_sm90_resources(resources, label, r, c, dtype):
    check(resources[label], f"sm_90 {label}")
