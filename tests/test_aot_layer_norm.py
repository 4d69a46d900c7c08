"""sm_90 ahead-of-time compile of the layer-norm kernels in bf16 (no GPU needed), at the widths of the presets'
towers (S 384, B text 512, B 768, L 1024, H 1280, G 1664), with the launchers' own tiles and warps (`_fwd_launch`,
`_bwd_launch` on meta tensors), plain and with the residual add and its bias fused in (add_layer_norm with rb, the
blocks' path: "+res"), and the backward with its loads pipelined two tiles deep ("/2": BWD_STAGES = 2). Asserts
no spills and no local memory; `pytest -s` prints the resource table."""
import sys

import pytest
import torch

from kernels import layer_norm as _public  # noqa: F401 (kernels/__init__ shadows the module name)
from kernels.aot import check, compile_sm90_like
from tests.conftest import aot_module

ln = sys.modules["kernels.layer_norm"]

M_AOT = 51203  # B/16's 1024 x 50 tokens, plus an odd tail
WIDTHS = [384, 512, 768, 1024, 1280, 1664]
CASES = [(f"{kind} N={n}", kind, n) for n in WIDTHS for kind in ("fwd", "bwd", "fwd+res", "bwd+res", "bwd+res/2")]


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _compile(kind, n):
    x, y, w = _meta(M_AOT, n), _meta(M_AOT, n), _meta(n)
    stats = _meta(M_AOT, dtype=torch.float32)
    res = (_meta(M_AOT, n), _meta(M_AOT, n)) if "+res" in kind else ()
    if kind.startswith("fwd"):
        _, args, const, opts = ln._fwd_launch(x, w, w, y, stats, stats, 1e-5, *res, *((w,) if res else ()))
        return compile_sm90_like(ln._layer_norm_fwd_kernel, args, const, **opts)
    part = _meta(1056, 3 if res else 2, n, dtype=torch.float32)  # 8 programs on each of an H100's 132 SMs
    _, args, const, opts = ln._bwd_launch(x, w, y, y, stats, stats, part, 52, *res[:1])
    if kind.endswith("/2"):
        const["STAGES"] = 2
    return compile_sm90_like(ln._layer_norm_bwd_kernel, args, const, **opts)


pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)


@pytest.mark.parametrize("label,kind,n", CASES, ids=[c[0] for c in CASES])
def test_sm90_resources(resources, label, kind, n):
    check(resources[label], f"sm_90 bf16 layer norm {label}")
