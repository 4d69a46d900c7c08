"""sm_90 ahead-of-time compile of the varlen attention kernels in bf16 (no GPU needed).

Every head dim 32..128 with each forward window the launcher can pick (BLOCK_M 16/32/64/128) and the backward
config, causal (the text tower) plus non-causal at d=64. Arguments come from the launchers (`_fwd_launch`,
`_bwd_launch`) on meta tensors, so tiles, warps, stages and specialisation are a real launch's. Asserts no
spills and no local memory; asserts wgmma where the tile allows it (>= 64 rows on 4+ warps). All configurations
compile in one child process without the interpreter (one Python start instead of ~30). `pytest -s` prints
the resource table.
"""
import sys

import pytest
import torch

from kernels import varlen_attention as _public  # noqa: F401 (kernels/__init__ shadows the module name)
from kernels.aot import check, compile_sm90_like
from tests.conftest import aot_module

va = sys.modules["kernels.varlen_attention"]

T_AOT, H_AOT, S_AOT = 14003, 8, 1000  # ~1000 captions of ~14 tokens; T not a multiple of 16 (no hint)
HEAD_DIMS = [32, 64, 80, 96, 128]
CASES = [(f"fwd d={d} BLOCK_M={bm}", "fwd", d, bm, True) for d in HEAD_DIMS for bm in (16, 32, 64, 128)]
CASES += [(f"bwd d={d}", "bwd", d, None, True) for d in HEAD_DIMS]
CASES += [("fwd d=64 BLOCK_M=32 non-causal", "fwd", 64, 32, False), ("bwd d=64 non-causal", "bwd", 64, None, False)]
CASES += [(f"bwd-preprocess d={d}", "pre", d, None, True) for d in (64, 128)]
CASES += [("seq-bounds", "bounds", 64, None, True)]


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _compile(kind, d, block_m, causal):
    x = [_meta(T_AOT, H_AOT, d) for _ in range(7)]
    lse, lo = _meta(H_AOT, T_AOT, dtype=torch.float32), _meta(T_AOT, dtype=torch.int32)
    if kind == "fwd":
        cfg = va._fwd_config(T_AOT, S_AOT, d, block_m)
        _, args, const, opts = va._fwd_launch(*x[:4], lse, lo, lo, causal, d**-0.5, cfg, interpret=False)
        return compile_sm90_like(va._varlen_attn_fwd_kernel, args, const, **opts)
    if kind == "bwd":
        _, args, const, opts = va._bwd_launch(*x, lse, lse, lo, lo, causal, d**-0.5, va._bwd_config(d),
                                              interpret=False)  # fmt: skip
        return compile_sm90_like(va._varlen_attn_bwd_kernel, args, const, **opts)
    if kind == "pre":
        args = dict(O=x[0], DO=x[1], DELTA=lse, stride_ot=H_AOT * d, stride_oh=d, stride_dt=H_AOT * d, stride_dh=d,
                    T=T_AOT, D=d)  # fmt: skip
        return compile_sm90_like(va._varlen_attn_bwd_preprocess_kernel, args, dict(BLOCK_M=64, BLOCK_D=va._bd(d)))
    args = dict(CU=_meta(S_AOT + 1, dtype=torch.int32), LO=lo, HI=lo, S=S_AOT, T=T_AOT)
    return compile_sm90_like(va._seq_bounds_kernel, args, dict(BLOCK=64), num_warps=4)


pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)


@pytest.mark.parametrize("label,kind,d,block_m,causal", CASES, ids=[c[0] for c in CASES])
def test_sm90_resources(resources, label, kind, d, block_m, causal):
    check(resources[label], f"sm_90 bf16 {label}", wgmma=kind == "bwd" or (kind == "fwd" and block_m >= 64))
