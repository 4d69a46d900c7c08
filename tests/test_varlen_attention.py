"""varlen_attention: the Triton kernel (interpreter on CPU) and the padded-SDPA reference against a float64
per-sequence loop; outputs and all gradients under one random dout.

Tolerance (flash-attention's rule): |kernel - ref64| <= 2 * |torch_same_dtype - ref64| + atol, max over the
tensor, where torch_same_dtype is plain PyTorch attention in the input dtype (the per-sequence loop, like
flash-attn's `attention_ref(upcast=False)`) and atol = ATOL[dtype] * max|ref64| (see ATOL). A test below shows
the rule rejects a wrong answer.
"""
import math

import pytest
import torch

from kernels.varlen_attention import _fwd_config, varlen_attention, varlen_attention_ref
from tests.conftest import DEVICE, requires_cuda

# relative to max|ref64| (floored at 0.5, like flash-attn Hopper tests' `ref + 0.3 - 0.3`): fp16 half an ulp;
# bf16 one ulp (delta = rowsum(dO * O) from the bf16-rounded O, as flash-attn does, puts dk at up to 1.13x the
# bound with half an ulp); fp32 ~8 ulp (P recomputed from the log-sum-exp: dq up to ~3x torch's 5e-7)
ATOL = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 8e-3}
MIX = [1, 7, 13, 1, 31, 2, 40, 5]  # odd lengths, single tokens, one sequence longer than a 32-row window


def _cu(lens, device=DEVICE):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def attention_loop(q, k, v, cu, causal, scale=None):
    """Plain per-sequence attention in the inputs' dtype (the test's ground truth when fed float64)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (H, L, d)
        s = (qs @ ks.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        outs.append((s.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _run(fn, inputs, dout):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    return [out.detach(), *torch.autograd.grad(out, xs, dout)]


def _within_rule(got, same, ref64, dtype):
    """(ok, message) for the tolerance rule on one tensor."""
    err = (got.double() - ref64).abs().max().item()
    err_pt = (same.double() - ref64).abs().max().item()
    atol = ATOL[dtype] * max(ref64.abs().max().item(), 0.5)  # floor: an all-zero dq (single tokens) has no scale
    return err <= 2 * err_pt + atol, f"err {err:.3e} > 2 * torch {err_pt:.3e} + atol {atol:.3e}"


def _compare(kernel_fn, torch_fn, inputs, dout, dtype):
    """Kernel vs torch in `dtype` vs torch in float64: the output and the gradient of every input."""
    got = _run(kernel_fn, inputs, dout)
    same = _run(torch_fn, inputs, dout)
    ref = _run(torch_fn, [x.double() for x in inputs], dout.double())
    for i, (g, s, r) in enumerate(zip(got, same, ref)):
        name = "out" if i == 0 else f"grad {i - 1}"
        assert g.dtype == dtype and g.shape == r.shape, name
        ok, msg = _within_rule(g, s, r, dtype)
        assert ok, f"{name}: {msg}"


def _check_all(kernel_fn, lens, heads, d, dtype, causal, seed=0):
    torch.manual_seed(seed)
    cu = _cu(lens)
    inputs = [torch.randn(sum(lens), heads, d, dtype=dtype, device=DEVICE) for _ in range(3)]
    dout = torch.randn_like(inputs[0])
    _compare(lambda q, k, v: kernel_fn(q, k, v, cu), lambda q, k, v: attention_loop(q, k, v, cu, causal),
             inputs, dout, dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128])
def test_kernel_matches_float64(head_dim, causal, dtype):
    _check_all(
        lambda q, k, v, cu: varlen_attention(q, k, v, cu, max(MIX), causal, impl="triton"),
        MIX, 2, head_dim, dtype, causal, seed=head_dim,
    )  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_kernel_every_window_size(block_m, causal):
    # MIX by itself picks 32; force the other windows the launcher can pick (sequences straddle all of them)
    lens = [3, 17, 1, 70, 9, 33]
    _check_all(
        lambda q, k, v, cu: varlen_attention(q, k, v, cu, max(lens), causal, impl="triton", _block_m=block_m),
        lens, 1, 32, torch.float32, causal,
    )  # fmt: skip


@pytest.mark.parametrize(
    "lens", [[1] * 9, [5, 0, 3, 0], [77], [0, 2, 1, 64, 1]], ids=["single-tokens", "empty-seqs", "one-77", "mixed"]
)
def test_kernel_edge_lengths(lens):
    _check_all(lambda q, k, v, cu: varlen_attention(q, k, v, cu, max(lens), True, impl="triton"),
               lens, 2, 16, torch.float16, True)  # fmt: skip


def test_kernel_strided_qkv_and_scale():
    """q, k, v as views of one (T, 3, H, d) projection (token stride 3*H*d), a custom softmax scale."""
    torch.manual_seed(1)
    cu = _cu(MIX)
    qkv = torch.randn(sum(MIX), 3, 2, 48, device=DEVICE, dtype=torch.bfloat16)
    dout = torch.randn(sum(MIX), 2, 48, device=DEVICE, dtype=torch.bfloat16)

    def kernel(x):
        q, k, v = x.unbind(1)
        assert q.stride(0) == 3 * 2 * 48 and not q.is_contiguous()
        return varlen_attention(q, k, v, cu, 40, False, 0.3, impl="triton")

    _compare(kernel, lambda x: attention_loop(*x.unbind(1), cu, False, 0.3), [qkv], dout, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked_equals_three_views(causal, dtype):
    """varlen_attention_qkvpacked: the same kernels on views of one qkv, so the output and qkv's gradient equal the
    three-view call's bit for bit; its gradient is one tensor of qkv's own layout, written by the kernel."""
    from kernels import varlen_attention_qkvpacked

    torch.manual_seed(3)
    cu = _cu(MIX)
    base = torch.randn(sum(MIX), 3 * 2 * 48, device=DEVICE, dtype=dtype)
    dout = torch.randn(sum(MIX), 2, 48, device=DEVICE, dtype=dtype)
    outs = []
    for packed in (True, False):
        x = base.clone().requires_grad_()
        qkv = x.view(-1, 3, 2, 48)
        if packed:
            o = varlen_attention_qkvpacked(qkv, cu, 40, causal, impl="triton")
            assert type(o.grad_fn).__name__ == "VarlenAttentionQKVFnBackward"  # not unbind + three gradients
        else:
            o = varlen_attention(*qkv.unbind(1), cu, 40, causal, impl="triton")
        o.backward(dout)
        outs.append((o.detach(), x.grad))
    (o1, g1), (o2, g2) = outs
    assert torch.equal(o1, o2) and torch.equal(g1, g2)
    assert g1.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(T_total, 3, heads, head_dim\)"):
        varlen_attention_qkvpacked(base.view(-1, 6, 48), cu, 40, impl="triton")


def test_rule_rejects_wrong_answer():
    """The tolerance can fail: the non-causal kernel output is not accepted as the causal answer."""
    torch.manual_seed(2)
    cu = _cu(MIX)
    q, k, v = (torch.randn(sum(MIX), 2, 32, dtype=torch.float16, device=DEVICE) for _ in range(3))
    wrong = varlen_attention(q, k, v, cu, 40, causal=False, impl="triton")
    ok, _ = _within_rule(wrong, attention_loop(q, k, v, cu, True), attention_loop(*(x.double() for x in (q, k, v)),
                         cu, True), torch.float16)  # fmt: skip
    assert not ok


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_loop(causal):
    """The padded-SDPA CPU path against the per-sequence loop, float64: empty sequences, max_seqlen > longest."""
    torch.manual_seed(3)
    lens = [4, 0, 1, 19, 7, 0, 12]
    cu = _cu(lens)
    inputs = [torch.randn(sum(lens), 3, 24, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    dout = torch.randn_like(inputs[0])
    got = _run(lambda q, k, v: varlen_attention_ref(q, k, v, cu, 23, causal), inputs, dout)
    ref = _run(lambda q, k, v: attention_loop(q, k, v, cu, causal), inputs, dout)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12, msg=name)


def test_reference_upcast_and_dispatch():
    torch.manual_seed(4)
    cu = _cu(MIX)
    q, k, v = (torch.randn(sum(MIX), 2, 32, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    up = varlen_attention_ref(q, k, v, cu, 40, True, upcast=True)
    assert up.dtype == torch.bfloat16
    assert torch.equal(up, varlen_attention_ref(q.float(), k.float(), v.float(), cu, 40, True).bfloat16())
    if DEVICE == "cpu":  # impl=None on a CPU tensor is the reference, in float32 for bf16 (torch's CPU bf16 SDPA
        # is the slow one), autocast or not
        assert torch.equal(varlen_attention(q, k, v, cu, 40, True), up)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(varlen_attention(q, k, v, cu, 40, True), up)
        assert not torch.equal(up, varlen_attention_ref(q, k, v, cu, 40, True))  # so the two checks above can fail
    with pytest.raises(ValueError):
        varlen_attention(q, k, v, cu, 40, impl="cuda")
    with pytest.raises(ValueError):
        varlen_attention(q, k, v, cu.long(), 40, impl="triton")
    empty = q[:0]
    assert varlen_attention(empty, empty, empty, _cu([0, 0]), 1, True, impl="triton").shape == (0, 2, 32)


def test_block_rule():
    """BLOCK_M = next_pow2(2 * mean length) in [16, 128]: the numbers the header docstring argues from."""
    assert _fwd_config(4096 * 8, 4096, 64)["BLOCK_M"] == 16
    assert _fwd_config(58278, 4096, 64)["BLOCK_M"] == 32  # log-normal captions, mean 14.2
    assert _fwd_config(4096 * 32, 4096, 64)["BLOCK_M"] == 64
    assert _fwd_config(4096 * 77, 4096, 64)["BLOCK_M"] == 128
    assert _fwd_config(5, 5, 64) == {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 2}


@requires_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_bf16_caption_batch(causal):
    """On a GPU: a realistic batch (512 log-normal captions, 8 heads x 64) against float64."""
    g = torch.Generator().manual_seed(5)
    lens = torch.exp(math.log(12) + 0.6 * torch.randn(512, generator=g)).round().clamp(2, 77).int().tolist()
    _check_all(lambda q, k, v, cu: varlen_attention(q, k, v, cu, max(lens), causal), lens, 8, 64, torch.bfloat16,
               causal)  # fmt: skip
