"""kernels.linear_gelu against F.gelu(F.linear(...)): the output and the gradients of x, weight and bias under one
random dout, over odd shapes (columns not a multiple of the 128-wide tile, rows split over several row groups) and
dtypes; the fallbacks and bad shapes."""
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import linear_gelu, linear_gelu_ref
from tests.conftest import DEVICE
from tests.test_layer_norm import _fwd_bwd  # (x, weight, bias) -> output and the three gradients
from tests.test_varlen_attention import _within_rule

# (x's shape, N): N not a multiple of the tile, a leading batch dim, rows over two row groups
CASES = [((37, 24), 200), ((2, 19, 40), 96), ((70, 16), 129)]


def _inputs(shape, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, shape[-1], generator=g) * shape[-1] ** -0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    dout = torch.randn(*shape[:-1], n, generator=g).to(DEVICE, dtype)
    return x, w, b, dout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,n", CASES)
def test_matches_reference(shape, n, dtype):
    """Against float64 with the attention tests' rule: error at most twice torch's own in the same dtype (autograd
    through F.linear and F.gelu, which rounds dh to the dtype too) plus an ulp-sized atol."""
    x, w, b, dout = _inputs(shape, n, dtype)
    got = _fwd_bwd(lambda *a: linear_gelu(*a, impl="triton"), x, w, b, dout)
    same = _fwd_bwd(linear_gelu_ref, x, w, b, dout)
    ref = _fwd_bwd(linear_gelu_ref, x.double(), w.double(), b.double(), dout.double())
    for name, a, s, r in zip(("y", "dx", "dw", "db"), got, same, ref, strict=True):
        assert a.dtype == dtype and a.shape == r.shape, name
        ok, msg = _within_rule(a, s, r, dtype)
        assert ok, f"{name}: {msg}"


def test_deterministic_and_only_needed_grads():
    x, w, b, dout = _inputs((70, 16), 129, torch.float32, seed=1)
    a = _fwd_bwd(lambda *t: linear_gelu(*t, impl="triton"), x, w, b, dout)
    c = _fwd_bwd(lambda *t: linear_gelu(*t, impl="triton"), x, w, b, dout)
    assert all(torch.equal(u, v) for u, v in zip(a, c, strict=True))
    wf = w.clone().requires_grad_()
    linear_gelu(x, wf, b, impl="triton").backward(dout)  # x and b need no gradient: only dW is made
    torch.testing.assert_close(wf.grad, a[2])


@pytest.mark.parametrize("stages", [2, 3])
def test_pipelined_backward_gives_the_same_bits(stages, monkeypatch):
    """BWD_STAGES 2 or 3 (the loads a tile or two ahead, through shared memory on a GPU) computes what 1 does: dx, dW
    and the bias gradient equal bit for bit, in bf16, over several row groups (the last one partial). The interpreter
    runs the loop as a plain one, so here this checks the switch's path; natively (the GPU suite) the pipeline."""
    ge = sys.modules["kernels.gelu"]
    x, w, b, dout = _inputs((70, 16), 129, torch.bfloat16, seed=2)
    one = _fwd_bwd(lambda *t: linear_gelu(*t, impl="triton"), x, w, b, dout)
    monkeypatch.setattr(ge, "BWD_STAGES", stages)
    for u, v in zip(_fwd_bwd(lambda *t: linear_gelu(*t, impl="triton"), x, w, b, dout), one, strict=True):
        assert torch.equal(u, v)


def test_fallbacks_and_errors():
    x, w, b, _ = _inputs((4, 8), 12, torch.float32)
    if DEVICE == "cpu":  # impl=None on a CPU tensor: the reference, bit for bit
        assert torch.equal(linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # autocast: torch's own rules
        assert torch.equal(linear_gelu(x, w, b, impl="triton"), F.gelu(F.linear(x, w, b)))
    with pytest.raises(RuntimeError):  # mixed dtypes: the reference, so torch's own error
        linear_gelu(x, w.double(), b.double(), impl="triton")
    with pytest.raises(ValueError, match=r"weight \(N, K\) and bias \(N,\)"):
        linear_gelu(x, w, b[:3])
    with pytest.raises(ValueError, match="linear_gelu needs"):
        linear_gelu(x, w[:, :5], b)
