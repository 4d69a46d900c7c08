"""sm_90 ahead-of-time compile of kernels.linear's column-sum pass (_column_part_kernel; no GPU needed) with the
launcher's own config (`_launch` on meta tensors; the row split is a runtime argument) at the gradients it sums: the
text tower's qkv projection (B/16's ~12,000 packed tokens x 1,536, L/16's ~3,800 x 2,304) and the image tower's
position embedding (B/16's 1,024 x 50 * 768), bf16 and fp32 in. Asserts no spills and no local memory; `pytest -s`
prints the resource table."""
import pytest
import torch

from kernels.aot import check, compile_sm90_like
from kernels.linear import BLOCK_M, BLOCK_N, PROGRAMS_PER_SM, _column_part_kernel, _launch, _row_groups
from tests.conftest import aot_module

CASES = [(f"column sums {m}x{n} {str(dt).split('.')[-1]}", m, n, dt)
         for m, n in ((12032, 1536), (3840, 2304), (1024, 38400)) for dt in (torch.bfloat16, torch.float32)]


def _compile(m, n, dtype):
    x = torch.empty(m, n, dtype=dtype, device="meta")
    groups, rows = _row_groups(m, n, BLOCK_M, BLOCK_N, torch.device("meta"), PROGRAMS_PER_SM)
    part = torch.empty(groups, n, dtype=torch.float32, device="meta")
    _, args, const, opts = _launch(x, part, rows)
    return compile_sm90_like(_column_part_kernel, args, const, **opts)


pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)


@pytest.mark.parametrize("label,m,n,dtype", CASES, ids=[c[0] for c in CASES])
def test_sm90_resources(resources, label, m, n, dtype):
    check(resources[label], f"sm_90 {label}")
