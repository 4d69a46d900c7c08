"""sm_90 ahead-of-time compile of the one-pass AdamW kernels (kernels.adamw: one tensor per launch, and eight) for bf16
and fp16 weights, with and without the gradient scale, with the launchers' own block and warps (`_launch`,
`_multi_launch` on meta tensors). Asserts no spills and no local memory, and no shared memory: every load and store in
one layout, none moved through shared memory to change it (a flat block did that for the fp32 stores); `pytest -s`
prints the resource table."""
import pytest
import torch

from kernels import adamw as ad
from kernels.aot import check, compile_sm90, compile_sm90_like, specialize
from tests.conftest import aot_module

CASES = [(f"adamw{' x8' if multi else ''} {dt} {'scaled' if s else 'plain'}", dt, s, multi)
         for multi in (False, True) for dt in ("bf16", "fp16") for s in (False, True)]


def _compile(dt, scaled, multi):
    n = 1_048_579  # an odd tail
    low = torch.bfloat16 if dt == "bf16" else torch.float16
    one = torch.empty((), dtype=torch.float32, device="meta")
    if not multi:
        p = torch.empty(n, dtype=low, device="meta")
        w = torch.empty(n, dtype=torch.float32, device="meta")
        _, args, const, opts = ad._launch(p, p, w, w, w, one, one, one if scaled else None, 0.1, 0.9, 0.98, 1e-6)
        return compile_sm90_like(ad._adamw_cast_kernel, args, const, **opts)
    tensors = []
    for k in range(8):
        p = torch.empty(n + 7 * k, dtype=low, device="meta")
        w = torch.empty(n + 7 * k, dtype=torch.float32, device="meta")
        tensors.append((p, p, w, w, w, one))
    _, args, const, opts = ad._multi_launch(tensors, one, one if scaled else None, 0.1, 0.9, 0.98, 1e-6)
    sig, _, aligned = specialize(args)  # the sizes and offsets as the launcher passes them: not specialised
    sig.update({name: "i32" for name in ad._SLOT_INTS})
    return compile_sm90(ad._adamw_cast_multi_kernel, sig, const, **opts,
                        aligned=[a for a in aligned if a not in ad._SLOT_INTS])


pytestmark, compile_all, resources = aot_module(__name__, CASES, _compile)


@pytest.mark.parametrize("label,dt,scaled,multi", CASES, ids=[c[0] for c in CASES])
def test_sm90_resources(resources, label, dt, scaled, multi):
    check(resources[label], f"sm_90 {label}")
    assert resources[label].shared == 0, f"{label}: {resources[label].shared} bytes of shared memory (a layout change)"
