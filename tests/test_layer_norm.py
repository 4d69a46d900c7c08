"""kernels.layer_norm against F.layer_norm: forward and all three gradients under one random dout, over odd shapes
and dtypes, rows split over several backward programs, strided rows, and the fallbacks."""
import pytest
import torch
import torch.nn.functional as F

from kernels import layer_norm, layer_norm_ref
from tests.conftest import DEVICE

# (x's shape): rows not a multiple of the tile, N not a power of two, a leading batch dim
SHAPES = [(5, 33), (37, 96), (2, 19, 130), (64, 768)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(DEVICE, dtype)
    b = (0.1 * torch.randn(N, generator=g)).to(DEVICE, dtype)
    dout = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return x, w, b, dout


def _fwd_bwd(fn, x, w, b, dout):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(dout)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype):
    x, w, b, dout = _inputs(shape, dtype)
    got = _fwd_bwd(lambda *a: layer_norm(*a, impl="triton"), x, w, b, dout)
    # the reference in fp32 from the same (rounded) inputs, then rounded once: what an fp32-accumulating kernel
    # should match to within one rounding of the output dtype
    ref = _fwd_bwd(lambda x, w, b: layer_norm_ref(x.float(), w.float(), b.float()), x, w, b, dout.float())
    for name, a, r in zip(("y", "dx", "dw", "db"), got, ref, strict=True):
        assert a.dtype == dtype and a.shape == r.shape, name
        torch.testing.assert_close(a.float(), r.to(dtype).float(), **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


def test_rows_strided_and_dout_not_contiguous():
    big = torch.randn(23, 80, device=DEVICE)
    x = big[:, 3:67]  # row stride 80, unit last stride: read in place
    w, b = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)
    dout = torch.randn(64, 23, device=DEVICE).t()  # last stride 23: copied
    got = _fwd_bwd(lambda *a: layer_norm(*a, impl="triton"), x, w, b, dout)
    ref = _fwd_bwd(layer_norm_ref, x, w, b, dout)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic_and_splits_rows():
    # 37 rows of N=96 (tiles of 16 rows) over the interpreter's 4 programs: 3 programs, the last one partial
    x, w, b, dout = _inputs((37, 96), torch.float32, seed=1)
    a = _fwd_bwd(lambda *t: layer_norm(*t, impl="triton"), x, w, b, dout)
    c = _fwd_bwd(lambda *t: layer_norm(*t, impl="triton"), x, w, b, dout)
    for u, v in zip(a, c, strict=True):
        assert torch.equal(u, v)


def test_default_and_fallbacks_take_the_reference():
    x, w, b, _ = _inputs((4, 8), torch.float32)
    if DEVICE == "cpu":  # impl=None on a CPU tensor: the reference, bit for bit
        assert torch.equal(layer_norm(x, w, b), F.layer_norm(x, (8,), w, b))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # autocast keeps torch's own rules for layer norm
        assert torch.equal(layer_norm(x.bfloat16(), w, b, impl="triton"), F.layer_norm(x.bfloat16(), (8,), w, b))
    wide = torch.randn(2, 2049, device=DEVICE)  # past the widest tile compiled and checked: the reference
    ww, bw = torch.randn(2049, device=DEVICE), torch.randn(2049, device=DEVICE)
    assert torch.equal(layer_norm(wide, ww, bw, impl="triton"), F.layer_norm(wide, (2049,), ww, bw))
    with pytest.raises(ValueError, match=r"weight and bias of shape \(8,\)"):
        layer_norm(x, w[:4], b)
    with pytest.raises(ValueError, match="impl"):
        layer_norm(x, w, b, impl="cuda")
