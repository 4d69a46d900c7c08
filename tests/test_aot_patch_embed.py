"""sm_90 ahead-of-time compile of the patch-embed kernels at B/16 and L/14 sizes (no GPU needed).

Arguments come from the launchers themselves (`_fwd_launch`, `_dw_launch`) on meta tensors, so the tiles,
warps, stages and specialisation are the ones a real launch would use. Asserts no register spills and, for
the GEMM kernels, Hopper wgmma in the PTX. `pytest -s` prints the resource table.
Besides bf16, L/14 is also compiled with uint8 images (normalisation in the loads) and fp32.
"""
import pytest
import torch

from kernels import patch_embed as pe
from kernels.aot import check, compile_sm90_like, nvidia_tool

pytestmark = pytest.mark.skipif(nvidia_tool("ptxas") is None or nvidia_tool("cuobjdump") is None,
                                reason="ptxas/cuobjdump not found (triton/backends/nvidia/bin or PATH)")

MODELS = {"B/16": (768, 16), "L/14": (1024, 14)}  # width, patch size
B_AOT, RES = 256, 224


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _inputs(model, variant):
    """variant: "bf16" (the training path), "u8" (uint8 images normalised in-kernel, bf16 out), "fp32"."""
    D, p = MODELS[model]
    N = (RES // p) ** 2
    K = N // 2
    dt = torch.float32 if variant == "fp32" else torch.bfloat16
    norm = _meta(3, dtype=torch.float32) if variant == "u8" else None
    return dict(images=_meta(B_AOT, 3, RES, RES, dtype=torch.uint8 if variant == "u8" else dt),
                keep=_meta(B_AOT, K, dtype=torch.int64), weight=_meta(D, 3 * p * p, dtype=dt), bias=_meta(D, dtype=dt),
                pos=_meta(N, D, dtype=dt), norm=norm, dt=dt, p=p, K=K, D=D, N=N)


def _fwd(model, variant):
    x = _inputs(model, variant)
    out = _meta(B_AOT, x["K"], x["D"], dtype=x["dt"])
    _, args, const, opts = pe._fwd_launch(x["images"], x["keep"], x["weight"], x["bias"], x["pos"], x["p"],
                                          x["norm"], x["norm"], out, interpret=False)
    return compile_sm90_like(pe._patch_embed_fwd_kernel, args, const, **opts)


def _dw(model, variant):
    x = _inputs(model, variant)
    dout = _meta(B_AOT, x["K"], x["D"], dtype=x["dt"])
    dw, db = _meta(8, x["D"], 3 * x["p"] ** 2, dtype=torch.float32), _meta(8, x["D"], dtype=torch.float32)
    _, args, const, opts = pe._dw_launch(dout, x["images"], x["keep"], x["p"], x["norm"], x["norm"], True, dw, db,
                                         n_sm=132, interpret=False)
    return compile_sm90_like(pe._patch_embed_bwd_dw_kernel, args, const, **opts)


def _dpos(model, variant, deterministic):
    x = _inputs(model, variant)
    M = B_AOT * x["K"]
    keep = _meta(M, dtype=torch.int64)
    args = dict(dout=_meta(M, x["D"], dtype=x["dt"]), keep_flat=keep, order=keep, offsets=keep,
                dpos=_meta(x["N"], x["D"], dtype=x["dt"] if deterministic else torch.float32), M=M, D=x["D"])
    cfg = pe._dpos_config(interpret=False)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    const = dict(DETERMINISTIC=deterministic, INTERP_BF16=False, **cfg)
    return compile_sm90_like(pe._patch_embed_bwd_dpos_kernel, args, const, **opts)


BUILD = {"fwd": _fwd, "dw": _dw, "dpos-det": lambda m, v: _dpos(m, v, True),
         "dpos-atomic": lambda m, v: _dpos(m, v, False)}
CASES = [(m, k, "bf16") for m in MODELS for k in BUILD]
CASES += [("L/14", k, v) for v in ("u8", "fp32") for k in ("fwd", "dw")]


@pytest.mark.parametrize("model,kernel,variant", CASES)
def test_sm90_resources(model, kernel, variant):
    # exact fp32 (torch's default) has no tensor-core path
    check(BUILD[kernel](model, variant), f"sm_90 {model} {kernel} {variant}",
          wgmma=kernel in ("fwd", "dw") and variant != "fp32")  # fmt: skip
