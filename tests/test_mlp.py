"""kernels.mlp (the MLP with its GELU in the matmuls' epilogues) against F.linear(F.gelu(F.linear(...))): the output
and the gradients of x, both weights and both biases under one random dout, over odd shapes (a K that is not a
multiple of BLOCK_K, partial tiles), dtypes, with and without c_proj's bias; small tiles over many tiles, one per
program and persistent; the fallbacks and bad shapes."""
import sys

import pytest
import torch

from kernels import mlp, mlp_ref
from tests.conftest import DEVICE
from tests.test_varlen_attention import _within_rule

km = sys.modules["kernels.mlp"]

# (x's shape, hidden N, c_proj's bias): K not a multiple of 64, N not of 128, a leading batch dim
CASES = [((37, 24), 200, True), ((2, 19, 40), 96, False), ((70, 64), 129, True)]
SMALL = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _inputs(shape, n, with_b2, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(shape, generator=g)
    w1 = torch.randn(n, k, generator=g) * k**-0.5
    b1 = torch.randn(n, generator=g)
    w2 = torch.randn(k, n, generator=g) * n**-0.5
    b2 = torch.randn(k, generator=g) if with_b2 else None
    dout = torch.randn(shape, generator=g)
    return [None if t is None else t.to(DEVICE, dtype) for t in (x, w1, b1, w2, b2, dout)]


def _fwd_bwd(fn, x, w1, b1, w2, b2, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, b1, w2) + ((b2,) if b2 is not None else ())]
    y = fn(*leaves[:4], leaves[4] if b2 is not None else None)
    return [y.detach(), *torch.autograd.grad(y, leaves, dout)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,n,with_b2", CASES)
def test_matches_reference(shape, n, with_b2, dtype):
    """Against float64 with the attention tests' rule: error at most twice torch's own in the same dtype (autograd
    through F.linear and F.gelu) plus an ulp-sized atol."""
    args = _inputs(shape, n, with_b2, dtype)
    got = _fwd_bwd(lambda *a: mlp(*a, impl="triton"), *args)
    same = _fwd_bwd(mlp_ref, *args)
    ref = _fwd_bwd(mlp_ref, *[None if t is None else t.double() for t in args])
    names = ("y", "dx", "dw1", "db1", "dw2", "db2")[: len(ref)]
    for name, a, s, r in zip(names, got, same, ref, strict=True):
        assert a.dtype == dtype and a.shape == r.shape, name
        ok, msg = _within_rule(a, s, r, dtype)
        assert ok, f"{name}: {msg}"


@pytest.mark.parametrize("programs", [0, 3])  # a program per tile; 3 persistent programs over 3 x 4 tiles
def test_many_tiles_one_per_program_and_persistent(monkeypatch, programs):
    """32 x 32 tiles over K in 16s: 3 row tiles by 4 column tiles (the last ones partial), K = 40 (not a multiple of
    16), the c_fc bias gradient summed over the 3 tile rows; the same results one tile per program and persistent."""
    monkeypatch.setattr(km, "_config", lambda m, n, k, dgelu=False: dict(SMALL, programs=programs))
    args = _inputs((70, 40), 110, True, torch.float32, seed=3)
    got = _fwd_bwd(lambda *a: mlp(*a, impl="triton"), *args)
    ref = _fwd_bwd(mlp_ref, *[None if t is None else t.double() for t in args])
    for name, a, r in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), got, ref, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=name)


def test_deterministic_and_only_needed_grads():
    x, w1, b1, w2, b2, dout = _inputs((70, 64), 129, True, torch.float32, seed=1)
    a = _fwd_bwd(lambda *t: mlp(*t, impl="triton"), x, w1, b1, w2, b2, dout)
    c = _fwd_bwd(lambda *t: mlp(*t, impl="triton"), x, w1, b1, w2, b2, dout)
    assert all(torch.equal(u, v) for u, v in zip(a, c, strict=True))
    w1g = w1.clone().requires_grad_()
    mlp(x, w1g, b1, w2, b2, impl="triton").backward(dout)  # only w1 needs a gradient
    torch.testing.assert_close(w1g.grad, a[2])


def test_fallbacks_and_errors():
    x, w1, b1, w2, b2, _ = _inputs((4, 8), 12, True, torch.float32)
    if DEVICE == "cpu":  # impl=None on a CPU tensor: the reference, bit for bit
        assert torch.equal(mlp(x, w1, b1, w2, b2), mlp_ref(x, w1, b1, w2, b2))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # autocast: torch's own rules
        assert torch.equal(mlp(x, w1, b1, w2, b2, impl="triton"), mlp_ref(x, w1, b1, w2, b2))
    with pytest.raises(RuntimeError):  # mixed dtypes: the reference, so torch's own error
        mlp(x, w1.double(), b1.double(), w2.double(), None, impl="triton")
    with pytest.raises(ValueError, match=r"w2 \(K2, N\)"):
        mlp(x, w1, b1, w2.t(), b2)
    with pytest.raises(ValueError, match=r"b1 \(N,\)"):
        mlp(x, w1, b1[:3], w2, b2)
