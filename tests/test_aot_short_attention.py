"""sm_90 ahead-of-time compile of the short-sequence attention kernels in bf16 (no GPU needed).

The ViT token counts of the CLIPA goal points and around them (N = 37, 50: one 64-token tile; 17: a 32-token tile;
99: 64 x 64 blocks and the per-window backward), head dims 64 (B/16, L/16), 80 (H/14) and 128, plus causal, plus the
projection's bias added in the kernels (the model's path). Arguments
come from the launchers (`_fwd_launch`, `_bwd_launch`) on meta tensors of the model's layout (qkv a view of the
(B, N, 3*H*d) projection), so tiles, warps, stages and specialisation are a real launch's. Asserts no spills and no
local memory; asserts wgmma where the tile allows it (64 rows on 4+ warps). The looped one-tile kernels (several
(sequence, head) pairs per program, software-pipelined: FWD_HEADS, BWD_HEADS) are compiled with the model's bias path
at the goal points. `pytest -s` prints the resource table.
"""
import sys

import pytest
import torch

from kernels.aot import check, compile_sm90_like
from kernels.short_attention import short_attention_qkvpacked as _public  # noqa: F401
from tests.conftest import aot_module

sa = sys.modules["kernels.short_attention"]

B_AOT, H_AOT = 512, 12
CASES = [(f"{kind} N={n} d={d}", kind, n, d, False) for kind in ("fwd", "bwd") for n in (17, 37, 50, 99)
         for d in (64, 80, 128)]  # fmt: skip
CASES += [(f"{kind} N={n} d=64 causal", kind, n, 64, True) for kind in ("fwd", "bwd") for n in (50, 99)]
# the model's path (clipfast.layers.Attention.fuses_qkv_bias): the projection's bias added in the kernels, its gradient
# summed in the one-tile backward
CASES += [(f"{kind} N={n} d={d} bias", kind, n, d, "bias") for kind in ("fwd", "bwd") for n in (37, 50)
          for d in (64, 128)]  # fmt: skip

# the one-tile forward (the default for N <= 64 since the H200 runs of 2026-11-27: FWD_HEADS 1, FWD_STAGES 1) at
# every head size, and the looped one-tile kernels (FWD_HEADS / BWD_HEADS > 1): pairs per program x pipelining stages
# (the backward at 2+ pairs per program took 238-255 registers, with spills at 2 stages: left out)
LOOPED = [(f"fwd_tile N={n} d={d} {tag} x1 stages=1", "fwd_tile", n, d, (causal, 1, 1))
          for n in (17, 50) for d in (64, 80, 128) for tag, causal in (("bias", "bias"), ("causal", True))]
LOOPED += [(f"fwd_tile N={n} d=64 bias x{hpp} stages={st}", "fwd_tile", n, 64, ("bias", hpp, st))
           for n in (37, 50) for hpp in (2, 4) for st in (1, 2)]  # fmt: skip
# (a register cap of 128 on the one-tile backward with the bias, for 4 programs per SM, compiled without spills on
# Triton 3.8 but spilled 112 bytes on 3.6, the GPU image's: not offered)
CASES += LOOPED


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _compile(kind, n, d, causal):
    loop = {}
    if isinstance(causal, tuple):
        causal, hpp, stages = causal
        loop = dict(HPP=hpp, STAGES=stages)
    bias, causal = (_meta(3, H_AOT, d), False) if causal == "bias" else (None, causal)
    part = None if bias is None else _meta(B_AOT, 3, H_AOT, d, dtype=torch.float32)
    qkv = _meta(B_AOT, n, 3 * H_AOT * d).view(B_AOT, n, 3, H_AOT, d)
    o, do, dqkv = _meta(B_AOT, n, H_AOT, d), _meta(B_AOT, n, H_AOT, d), _meta(B_AOT, n, 3, H_AOT, d)
    lse = _meta(B_AOT * H_AOT, n, dtype=torch.float32)
    if kind == "fwd_tile":
        cfg = dict(sa._fwd_config(n, d), **loop)
        _, args, const, opts = sa._fwd_tile_launch(qkv, o, lse, causal, d**-0.5, cfg, interpret=False, bias=bias)
        return compile_sm90_like(sa._short_attn_fwd_tile_kernel, args, const, **opts)
    if kind == "fwd":
        _, args, const, opts = sa._fwd_launch(qkv, o, lse, causal, d**-0.5, sa._fwd_config(n, d), interpret=False,
                                              bias=bias)  # fmt: skip
        return compile_sm90_like(sa._short_attn_fwd_kernel, args, const, **opts)
    kernel, _, args, const, opts = sa._bwd_launch(qkv, o, do, dqkv, lse, lse, causal, d**-0.5,
                                                  dict(sa._bwd_config(n, d), **loop), interpret=False, bias=bias,
                                                  dbias_part=part)  # fmt: skip
    return compile_sm90_like(kernel, args, const, **opts)


pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)


@pytest.mark.parametrize("label,kind,n,d,causal", CASES, ids=[c[0] for c in CASES])
def test_sm90_resources(resources, label, kind, n, d, causal):
    r = resources[label]
    rows = sa._fwd_config(n, d)["BLOCK_M"] if kind.startswith("fwd") else sa._bwd_config(n, d).get("TILE", 64)
    check(r, f"sm_90 bf16 {label}", wgmma=rows >= 64 and r.num_warps >= 4)
