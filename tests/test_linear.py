"""kernels.column_sums (a gradient's column sums in one pass of fp32 partials per row group, finished in a fixed order)
against a float64 sum, and kernels.linear_bias (F.linear whose backward makes the bias gradient with it) against
autograd through F.linear; under the interpreter here, natively on a GPU."""
import pytest
import torch
import torch.nn.functional as F

import kernels.linear as lin
from kernels import column_sums, linear_bias
from tests.conftest import DEVICE
from tests.test_layer_norm import _fwd_bwd  # (x, weight, bias) -> output and the three gradients
from tests.test_varlen_attention import _within_rule

# rows not a multiple of the 32-row tile and over several row groups; columns not a multiple of the 128-wide block
SHAPES = [(1, 5), (37, 200), (300, 17), (129, 130)]


def _x(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_column_sums_equal_a_float64_sum(shape, dtype):
    """The sum over the rows in fp32, rounded once: fp32 within fp32 rounding of the float64 sum; bf16 within one
    bf16 step of the float64 sum's rounding."""
    x = _x(shape, dtype, seed=sum(shape))
    groups, _ = lin._row_groups(*shape, lin.BLOCK_M, lin.BLOCK_N, x.device, lin.PROGRAMS_PER_SM)
    out = column_sums(x, impl="triton")
    ref = x.double().sum(0)
    assert out.shape == (shape[1],) and out.dtype == dtype and out.device == x.device
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6 * x.abs().double().sum(0).max().item())
    else:
        torch.testing.assert_close(out.double(), ref.float().to(dtype).double(), rtol=2**-8, atol=0)
    if shape[0] > lin.BLOCK_M:
        assert groups > 1  # the case splits the rows over programs: the partials and their finish are exercised


def test_column_sums_dtype_strides_and_bad_input():
    """A result dtype other than the input's, a strided (non-contiguous rows) input, zero rows; a 1-D or 3-D input
    is an error naming its shape."""
    x = _x((70, 48), torch.bfloat16, seed=3)
    torch.testing.assert_close(column_sums(x, torch.float32, impl="triton"), x.float().sum(0), rtol=1e-6, atol=1e-5)
    wide = _x((70, 96), torch.float32, seed=4)
    view = wide[:, ::2]  # column stride 2: copied first
    torch.testing.assert_close(column_sums(view, impl="triton"), view.sum(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(column_sums(wide[:, 10:58], impl="triton"), wide[:, 10:58].sum(0), rtol=1e-6,
                               atol=1e-5)  # fmt: skip
    assert torch.equal(column_sums(x[:0], impl="triton"), torch.zeros(48, dtype=x.dtype, device=x.device))
    for bad in (x[0], x.view(7, 10, 48)):
        with pytest.raises(ValueError, match=rf"2-D .*{tuple(bad.shape)}"):
            column_sums(bad)


def test_column_sums_deterministic_and_the_torch_switch(monkeypatch):
    """The same bits on every run; SUMS="torch" (the throughput --knob) is torch's sum, without the kernel."""
    x = _x((300, 130), torch.float32, seed=5)
    a = column_sums(x, impl="triton")
    assert torch.equal(a, column_sums(x, impl="triton"))
    monkeypatch.setattr(lin, "SUMS", "torch")
    monkeypatch.setattr(lin, "_column_part_kernel", None)  # would fail if launched
    assert torch.equal(column_sums(x, impl="triton"), x.sum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,n", [((37, 24), 200), ((2, 19, 40), 96)])
def test_linear_bias_matches_f_linear(shape, n, dtype):
    """Output and the gradients of x, weight and bias under one random dout, against F.linear in float64 with the
    attention tests' rule (at most twice the error of autograd through F.linear in the same dtype, plus an ulp-sized
    atol); the bias gradient came from column_sums (counted)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, shape[-1], generator=g) * shape[-1] ** -0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    dout = torch.randn(*shape[:-1], n, generator=g).to(DEVICE, dtype)
    calls, real = [], lin.column_sums
    lin.column_sums = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    try:
        got = _fwd_bwd(lambda *a: linear_bias(*a, impl="triton"), x, w, b, dout)
    finally:
        lin.column_sums = real
    assert calls == [(x.numel() // shape[-1], n)]
    same = _fwd_bwd(F.linear, x, w, b, dout)
    ref = _fwd_bwd(F.linear, x.double(), w.double(), b.double(), dout.double())
    for name, a, s, r in zip(("y", "dx", "dw", "db"), got, same, ref, strict=True):
        assert a.dtype == dtype and a.shape == r.shape, name
        ok, msg = _within_rule(a, s, r, dtype)
        assert ok, f"{name}: {msg}"


def test_linear_bias_only_needed_grads_and_fallbacks():
    """Only the gradients asked for are made; a CPU tensor without impl, or mixed dtypes, is F.linear itself (with its
    errors); bad shapes are errors naming them."""
    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(9, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    x, w, b = x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)
    xs, wf, bs = x.clone(), w.clone().requires_grad_(), b.clone()
    calls, real = [], lin.column_sums
    lin.column_sums = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    try:
        linear_bias(xs, wf, bs, impl="triton").sum().backward()
    finally:
        lin.column_sums = real
    torch.testing.assert_close(wf.grad, torch.ones(24, 9, device=x.device) @ x)
    assert xs.grad is None and bs.grad is None and not calls  # no bias gradient made: no column sums
    # a double backward is an error (the kernel's bias gradient has no graph), not a silently partial gradient
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    dy = torch.randn(9, 24, device=x.device, requires_grad=True)
    grads = torch.autograd.grad(linear_bias(xg, wg, bg, impl="triton"), (xg, wg, bg), dy, create_graph=True)
    with pytest.raises(RuntimeError, match="not have been used|once_differentiable"):  # (without: dW's share alone)
        torch.autograd.grad((grads[2] ** 2).sum() + (grads[1] ** 2).sum(), dy)
    # float64 and an empty weight: F.linear itself
    assert "LinearBiasFn" not in linear_bias(xg.double(), wg.double(), bg.double(), impl="triton").grad_fn.name()
    w0, b0 = torch.zeros(0, 16, device=x.device, requires_grad=True), torch.zeros(0, device=x.device)
    linear_bias(xg, w0, b0, impl="triton").sum().backward()
    assert w0.grad.shape == (0, 16)
    wc = w.cpu().requires_grad_()
    assert "LinearBiasFn" not in linear_bias(x.cpu(), wc, b.cpu()).grad_fn.name()  # F.linear's own
    assert "LinearBiasFn" in linear_bias(x, wc.to(DEVICE), b, impl="triton").grad_fn.name()
    xb = x.to(torch.bfloat16)
    with pytest.raises(RuntimeError):  # mixed dtypes: F.linear's own error, not the kernel's
        linear_bias(xb, w, b, impl="triton")
    with pytest.raises(ValueError, match=r"weight \(N, K\) and bias \(N,\).*\(24, 15\)"):
        linear_bias(x, w[:, :15], b)
    with pytest.raises(ValueError, match=r"None"):
        linear_bias(x, w, None)
