"""The kernels' public functions on inputs a caller may hand them that the model never does: strided 1-D parameters,
empty batches, a cu_seqlens that breaks the layout, dtypes the kernels do not take. Each gives the reference's answer
or an error naming the argument, never silent wrong numbers or an access outside a tensor (interpreter on the CPU)."""
import pytest
import torch
import torch.nn.functional as F

from kernels import add_layer_norm, layer_norm, mlp, short_attention_qkvpacked, short_attention_ref, varlen_attention
from kernels.mlp import mlp_ref
from kernels.varlen_attention import _seq_bounds, varlen_attention_qkvpacked, varlen_attention_ref

N = 48


def _strided(n):
    return torch.randn(2 * n, dtype=torch.float64)[::2]  # a (n,) view with stride 2, as a slice of a packed tensor


def test_strided_one_dimensional_parameters_read_as_their_values():
    torch.manual_seed(0)
    x, r = torch.randn(5, N, dtype=torch.float64), torch.randn(5, N, dtype=torch.float64)
    w, b, rb = _strided(N), _strided(N), _strided(N)
    for weight in (w, torch.ones(1, dtype=torch.float64).expand(N)):  # stride 2, and stride 0
        # (the kernels compute in float32: a wrong element read is off by ~1, these by ~1e-7)
        assert torch.allclose(layer_norm(x, weight, b, impl="triton"), F.layer_norm(x, (N,), weight, b), atol=1e-5)
    s, y = add_layer_norm(x, r, w, b, rb=rb, impl="triton")
    assert torch.allclose(s, x + r + rb, atol=1e-5)
    assert torch.allclose(y, F.layer_norm(x + r + rb, (N,), w, b), atol=1e-5)
    qkv, bias = torch.randn(2, 5, 3, 2, 16, dtype=torch.float64), _strided(96)
    out = short_attention_qkvpacked(qkv, bias=bias, impl="triton")
    assert torch.allclose(out, short_attention_ref(qkv + bias.view(3, 2, 16)), atol=1e-5)
    x32, w1, b1, w2 = torch.randn(7, 32), torch.randn(64, 32) / 8, _strided(64).float(), torch.randn(32, 64) / 8
    assert torch.allclose(mlp(x32, w1, b1, w2, impl="triton"), mlp_ref(x32, w1, b1, w2), atol=1e-4)


def test_empty_batches_stay_in_the_autograd_graph():
    q = torch.zeros(0, 2, 16, requires_grad=True)
    cu = torch.zeros(1, dtype=torch.int32)
    qkv = torch.zeros(0, 3, 2, 16, requires_grad=True)
    img = torch.zeros(0, 5, 3, 2, 16, requires_grad=True)
    for out, leaf in ((varlen_attention(q, q, q, cu, 0, impl="triton"), q),
                      (varlen_attention_qkvpacked(qkv, cu, 0, impl="triton"), qkv),
                      (short_attention_qkvpacked(img, impl="triton"), img)):  # fmt: skip
        assert out.requires_grad and out.numel() == 0
        out.sum().backward()
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape


@pytest.mark.parametrize("cu", [[0, 3, 4, 7], [0, 3, 4, 12], [0, 5, 4, 9], [2, 3, 4, 9]])
def test_a_cu_seqlens_off_the_layout_is_an_error_on_the_host(cu):
    q = torch.randn(9, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, never decrease and end at the 9"):
        varlen_attention(q, q, q, torch.tensor(cu, dtype=torch.int32), 8, impl="triton")


@pytest.mark.parametrize("cu", [[0, 3, 4, 7], [0, 3, 4, 12], [0, 5, 4, 9], [2, 3, 4, 9], [-3, 2, 20]])
def test_sequence_bounds_stay_inside_the_tokens_whatever_cu_seqlens_holds(cu):
    """What the kernels read their key ranges from (on the device cu_seqlens is not checked: no sync)."""
    T = 9
    lo, hi = _seq_bounds(torch.tensor(cu, dtype=torch.int32), T)
    assert ((0 <= lo) & (lo <= hi) & (hi <= T)).all(), (lo.tolist(), hi.tolist())
    good, _ = _seq_bounds(torch.tensor([0, 3, 4, 9], dtype=torch.int32), T)
    assert good.tolist() == [0, 0, 0, 3, 4, 4, 4, 4, 4]


def test_dtypes_the_kernels_do_not_take():
    q = torch.randn(4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="one floating-point dtype, got torch.float32, torch.bfloat16"):
        varlen_attention(q, q.bfloat16(), q, cu, 4, impl="triton")
    with pytest.raises(TypeError, match="needs a floating-point qkv, got torch.int32"):
        short_attention_qkvpacked(torch.ones(1, 4, 3, 2, 16, dtype=torch.int32), impl="triton")
    with pytest.raises(TypeError, match="layer_norm needs a floating-point x, got torch.int32"):
        layer_norm(torch.ones(3, N, dtype=torch.int32), torch.ones(N), torch.zeros(N), impl="triton")
    x, w1, b1, w2 = (torch.randn(*s, dtype=torch.float64) for s in ((5, 16), (32, 16), (32,), (16, 32)))
    for t in (x, w1, b1, w2):
        t.requires_grad_()
    out = mlp(x, w1, b1, w2, impl="triton")  # float64: the reference (tl.dot would come back wrong)
    ref = mlp_ref(x, w1, b1, w2)
    assert torch.equal(out, ref)
    g = torch.autograd.grad(out.sum(), (x, w1, b1))
    assert all(torch.isfinite(t).all() for t in g)
    assert torch.equal(varlen_attention_ref(q, q, q, cu, 4), varlen_attention(q, q, q, cu, 4, impl="ref"))


def _double_backward_cases():
    """(name, f(*inputs) -> output, inputs): every kernel op's autograd Function, tiny, fp32."""
    from kernels import linear_bias, linear_gelu, masked_patch_embed

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    images = r(2, 3, 8, 8)
    return [
        ("layer_norm", lambda x, w, b: layer_norm(x, w, b, impl="triton"), (r(5, 16), r(16), r(16))),
        ("add_layer_norm", lambda x, y, w, b: add_layer_norm(x, y, w, b, impl="triton")[1],
         (r(5, 16), r(5, 16), r(16), r(16))),
        ("linear_gelu", lambda x, w, b: linear_gelu(x, w, b, impl="triton"), (r(5, 16), r(24, 16), r(24))),
        ("linear_bias", lambda x, w, b: linear_bias(x, w, b, impl="triton"), (r(5, 16), r(24, 16), r(24))),
        ("mlp", lambda x, w1, b1, w2: mlp(x, w1, b1, w2, impl="triton"), (r(5, 16), r(32, 16), r(32), r(16, 32))),
        ("short_attention", lambda qkv, b: short_attention_qkvpacked(qkv, bias=b, impl="triton"),
         (r(2, 5, 3, 2, 16), r(96))),
        ("varlen_attention", lambda q, k, v: varlen_attention(q, k, v, cu, 4, impl="triton"),
         (r(7, 2, 16), r(7, 2, 16), r(7, 2, 16))),
        ("varlen_attention_qkvpacked", lambda qkv: varlen_attention_qkvpacked(qkv, cu, 4, impl="triton"),
         (r(7, 3, 2, 16),)),
        ("masked_patch_embed", lambda w, b, p: masked_patch_embed(images, None, w, b, p, 4, impl="triton"),
         (r(16, 48), r(16), r(4, 16))),  # (the images are data: no gradient)
    ]


@pytest.mark.parametrize("case", _double_backward_cases(), ids=lambda c: c[0])
def test_a_double_backward_is_an_error_not_a_partial_gradient(case):
    """The kernels' gradients carry no autograd graph of their own: a second derivative through any of them is an
    error (once_differentiable), never one that silently lacks the kernels' share (kernels.linear_bias's bias
    gradient added to the weight's had given the weight's share alone)."""
    _, fn, inputs = case
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    dy = torch.randn(out.shape, requires_grad=True)
    grads = torch.autograd.grad(out, inputs, dy, create_graph=True, allow_unused=True)
    with pytest.raises(RuntimeError, match="not have been used|once_differentiable|does not require grad"):
        torch.autograd.grad(sum((t * t).sum() for t in grads if t is not None), dy)
