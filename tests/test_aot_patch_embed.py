"""sm_90 ahead-of-time compile of the patch-embed kernels at B/16 and L/14 sizes (no GPU needed).

Arguments come from the launchers themselves (`_fwd_launch`, `_dw_launch`) on meta tensors, so the tiles,
warps, stages and specialisation are the ones a real launch would use. Asserts no register spills and, for
the GEMM kernels, Hopper wgmma in the PTX. `pytest -s` prints the resource table.
"""
import pytest
import torch

from kernels import patch_embed as pe
from kernels.aot import compile_sm90_like, nvidia_tool

pytestmark = pytest.mark.skipif(nvidia_tool("ptxas") is None or nvidia_tool("cuobjdump") is None,
                                reason="ptxas/cuobjdump not found (triton/backends/nvidia/bin or PATH)")

MODELS = {"B/16": (768, 16), "L/14": (1024, 14)}  # width, patch size
B_AOT, RES = 256, 224


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _inputs(model):
    D, p = MODELS[model]
    N = (RES // p) ** 2
    K = N // 2
    return dict(images=_meta(B_AOT, 3, RES, RES), keep=_meta(B_AOT, K, dtype=torch.int64), weight=_meta(D, 3 * p * p),
                bias=_meta(D), pos=_meta(N, D), p=p, K=K, D=D, N=N)


def _fwd(model):
    x = _inputs(model)
    out = _meta(B_AOT, x["K"], x["D"])
    _, args, const, opts = pe._fwd_launch(x["images"], x["keep"], x["weight"], x["bias"], x["pos"], x["p"],
                                          None, None, out, interpret=False)
    return compile_sm90_like(pe._patch_embed_fwd_kernel, args, const, **opts)


def _dw(model):
    x = _inputs(model)
    dout = _meta(B_AOT, x["K"], x["D"])
    dw, db = _meta(8, x["D"], 3 * x["p"] ** 2, dtype=torch.float32), _meta(8, x["D"], dtype=torch.float32)
    _, args, const, opts = pe._dw_launch(dout, x["images"], x["keep"], x["p"], None, None, True, dw, db, n_sm=132,
                                         interpret=False)
    return compile_sm90_like(pe._patch_embed_bwd_dw_kernel, args, const, **opts)


def _dpos(model, deterministic):
    x = _inputs(model)
    M = B_AOT * x["K"]
    keep = _meta(M, dtype=torch.int64)
    args = dict(dout=_meta(M, x["D"]), keep_flat=keep, order=keep, offsets=keep,
                dpos=_meta(x["N"], x["D"], dtype=torch.bfloat16 if deterministic else torch.float32), M=M, D=x["D"])
    cfg = pe._dpos_config(interpret=False)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    const = dict(DETERMINISTIC=deterministic, INTERP_BF16=False, **cfg)
    return compile_sm90_like(pe._patch_embed_bwd_dpos_kernel, args, const, **opts)


CASES = [(m, k) for m in MODELS for k in ("fwd", "dw", "dpos-det", "dpos-atomic")]


@pytest.mark.parametrize("model,kernel", CASES)
def test_sm90_resources(model, kernel):
    r = {"fwd": _fwd, "dw": _dw, "dpos-det": lambda m: _dpos(m, True),
         "dpos-atomic": lambda m: _dpos(m, False)}[kernel](model)
    print("\n" + r.row(f"sm_90 {model} {kernel} bf16"))
    assert r.spills == 0, f"{model} {kernel}: {r.spills} bytes of register spills"
    assert r.local == 0, f"{model} {kernel}: {r.local} bytes of local memory / stack frame"
    if kernel in ("fwd", "dw"):
        assert r.wgmma, f"{model} {kernel}: no wgmma in the PTX (tensor cores not used the Hopper way)"
