"""short_attention_qkvpacked: the Triton kernels (interpreter on CPU) against float64 attention, output and qkv's
gradient under one random dout, with tests/test_varlen_attention.py's tolerance rule (flash-attn's: at most twice
torch's own error in the same dtype, plus an ulp-sized atol). Both backward kernels are covered: the one-tile kernel
(N <= 64) and the per-window kernel (N > 64)."""
import pytest
import torch

from kernels.short_attention import TILE_MAX, _bwd_config, _fwd_config, short_attention_qkvpacked, short_attention_ref
from tests.conftest import DEVICE, requires_cuda
from tests.test_varlen_attention import _run, _within_rule


def attention_dense(qkv, causal, scale=None):
    """Plain attention of qkv (B, N, 3, H, d) in its own dtype -> (B, N, H, d): the truth when fed float64."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, N, d)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def _check(B, N, H, d, dtype, causal, scale=None, seed=0, qkv=None):
    torch.manual_seed(seed)
    if qkv is None:
        qkv = torch.randn(B, N, 3, H, d, dtype=dtype, device=DEVICE)
    dout = torch.randn(B, N, H, d, dtype=dtype, device=DEVICE)
    got = _run(lambda x: short_attention_qkvpacked(x, causal, scale, impl="triton"), [qkv], dout)
    same = _run(lambda x: attention_dense(x, causal, scale), [qkv], dout)
    ref = _run(lambda x: attention_dense(x, causal, scale), [qkv.double()], dout.double())
    for name, g, s, r in zip(("out", "dqkv"), got, same, ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        ok, msg = _within_rule(g, s, r, dtype)
        assert ok, f"{name}: {msg}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 17, 50, 64])
def test_one_tile_matches_float64(n, causal, dtype):
    assert "TILE" in _bwd_config(n, 64)
    _check(2, n, 2, 32, dtype, causal, seed=n)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [65, 99])
def test_windows_match_float64(n, causal):
    """N > 64: 64 x 64 forward blocks and the per-window backward (two windows, the second partial)."""
    assert "WIN" in _bwd_config(n, 32) and _fwd_config(n, 32)["BLOCK_M"] == 64
    _check(1, n, 2, 32, torch.float32, causal, seed=n)


@pytest.mark.parametrize("head_dim", [40, 64, 80, 128])
def test_head_dims(head_dim):
    """Head dims that are not powers of two (padded tiles) and the widest; both backward kernels at 128."""
    _check(1, 37, 1, head_dim, torch.bfloat16, False, seed=head_dim)
    if head_dim == 128:
        _check(1, 70, 1, head_dim, torch.float32, True, seed=1)


def test_projection_view_and_scale():
    """qkv as the (B, N, 3*H*d) projection output viewed in place (token stride 3*H*d), a custom scale; the
    gradient is one tensor of qkv's layout written by the kernel, not a stack of three."""
    torch.manual_seed(4)
    proj = torch.randn(3, 21, 3 * 2 * 48, dtype=torch.bfloat16, device=DEVICE)
    qkv = proj.view(3, 21, 3, 2, 48)
    assert qkv.stride(1) == 3 * 2 * 48
    _check(3, 21, 2, 48, torch.bfloat16, False, scale=0.3, qkv=qkv)
    x = proj.clone().requires_grad_()
    o = short_attention_qkvpacked(x.view(3, 21, 3, 2, 48), impl="triton")
    assert type(o.grad_fn).__name__ == "ShortAttentionQKVFnBackward"
    assert o.is_contiguous() and o.shape == (3, 21, 2, 48)


def _check_bias(n, causal, dtype, seed, B=3, H=2, d=32):
    """short_attention_qkvpacked(qkv, bias=...) against float64 attention of qkv + bias by the tolerance rule: output,
    dqkv and dbias; returns (qkv, bias)."""
    torch.manual_seed(seed)
    qkv = torch.randn(B, n, 3, H, d, dtype=dtype, device=DEVICE)
    bias = torch.randn(3 * H * d, dtype=dtype, device=DEVICE)
    dout = torch.randn(B, n, H, d, dtype=dtype, device=DEVICE)
    got = _run(lambda x, b: short_attention_qkvpacked(x, causal, bias=b, impl="triton"), [qkv, bias], dout)

    def dense(x, b):
        return attention_dense(x + b.view(3, H, d), causal)

    same = _run(dense, [qkv, bias], dout)
    ref = _run(dense, [qkv.double(), bias.double()], dout.double())
    for name, g, sm, r in zip(("out", "dqkv", "dbias"), got, same, ref, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        ok, msg = _within_rule(g, sm, r, dtype)
        assert ok, f"{name}: {msg}"
    return qkv, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,n", [(False, 50), (True, 17), (False, 70)])
def test_projection_bias_in_the_kernel(n, causal, dtype):
    """bias=: the qkv projection's bias added to q, k, v inside the kernels and its gradient from the backward
    kernel's column sums (N <= 64), or added first (N > 64, the per-window backward): output, dqkv and dbias against
    float64 attention of qkv + bias, by the tolerance rule."""
    qkv, bias = _check_bias(n, causal, dtype, seed=n)
    if n <= TILE_MAX:  # the bias went into the kernel (not a torch add before it)
        x = qkv.clone().requires_grad_()
        o = short_attention_qkvpacked(x, causal, bias=bias, impl="triton")
        assert type(o.grad_fn).__name__ == "ShortAttentionQKVFnBackward"
    with pytest.raises(ValueError, match=r"bias must be \(192,\)"):
        short_attention_qkvpacked(qkv, causal, bias=bias[:5], impl="triton")


@pytest.mark.parametrize("fwd_heads,bwd_heads", [(0, 1), (1, 2), (2, 4), (4, 1)])
@pytest.mark.parametrize("causal,n,dtype", [(False, 50, torch.bfloat16), (True, 17, torch.float32),
                                            (False, 37, torch.float16)])
def test_pairs_per_program(fwd_heads, bwd_heads, causal, n, dtype, monkeypatch):
    """The one-tile forward kernel and the backward looping over several (sequence, head) pairs per program
    (FWD_HEADS, BWD_HEADS; B * H = 6 pairs: 4 halves to 2, so no program runs past the last pair), or the forward
    with its key loop (FWD_HEADS 0), with the projection's bias in the kernels: output, dqkv and dbias against
    float64 by the tolerance rule, and the launch grids as asked."""
    import sys

    import kernels.short_attention  # noqa: F401 (kernels/__init__ re-exports functions under the module names)

    sa = sys.modules["kernels.short_attention"]
    monkeypatch.setattr(sa, "FWD_HEADS", fwd_heads)
    monkeypatch.setattr(sa, "BWD_HEADS", bwd_heads)
    launched = []
    real = sa._launch

    def launch(kernel, grid, *a):
        launched.append((kernel, grid))
        real(kernel, grid, *a)

    monkeypatch.setattr(sa, "_launch", launch)
    _check_bias(n, causal, dtype, seed=n + fwd_heads)  # B * H = 3 * 2
    per = {1: 6, 2: 3, 4: 3}  # programs for 6 pairs
    if fwd_heads:
        assert (sa._short_attn_fwd_tile_kernel, (per[fwd_heads],)) in launched
    else:  # one query block (N <= 64) per pair
        assert (sa._short_attn_fwd_kernel, (1, 6)) in launched
    assert (sa._short_attn_bwd_tile_kernel, (per[bwd_heads],)) in launched


def test_rule_rejects_wrong_answer():
    """The tolerance can fail: the non-causal kernel output is not accepted as the causal answer."""
    torch.manual_seed(5)
    qkv = torch.randn(2, 30, 3, 2, 32, dtype=torch.float16, device=DEVICE)
    wrong = short_attention_qkvpacked(qkv, causal=False, impl="triton")
    ok, _ = _within_rule(wrong, attention_dense(qkv, True), attention_dense(qkv.double(), True), torch.float16)
    assert not ok


def test_reference_dispatch_and_errors():
    torch.manual_seed(6)
    qkv = torch.randn(2, 9, 3, 2, 16, dtype=torch.bfloat16, device=DEVICE)
    up = short_attention_ref(qkv, True, upcast=True)
    assert up.dtype == torch.bfloat16 and up.shape == (2, 9, 2, 16)
    torch.testing.assert_close(short_attention_ref(qkv.double(), True), attention_dense(qkv.double(), True),
                               rtol=0, atol=1e-12)  # fmt: skip
    if DEVICE == "cpu":  # impl=None on a CPU tensor: the reference, in float32 for bf16, autocast or not
        assert torch.equal(short_attention_qkvpacked(qkv, True), up)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(short_attention_qkvpacked(qkv, True), up)
    with pytest.raises(ValueError, match=r"\(batch, tokens, 3, heads, head_dim\)"):
        short_attention_qkvpacked(qkv.view(2, 9, 6, 16), impl="triton")
    with pytest.raises(ValueError, match="head_dim 256"):
        short_attention_qkvpacked(torch.zeros(1, 2, 3, 1, 256, device=DEVICE), impl="triton")
    assert short_attention_qkvpacked(qkv[:0], impl="triton").shape == (0, 9, 2, 16)


def test_tile_rule():
    """One tile of next_pow2(N) in [16, 64] up to TILE_MAX tokens, 64 x 64 blocks above (the docstring's numbers)."""
    assert TILE_MAX == 64
    assert [_fwd_config(n, 64)["BLOCK_M"] for n in (1, 17, 37, 50, 64, 65, 197)] == [16, 32, 64, 64, 64, 64, 64]
    assert [_bwd_config(n, 64).get("TILE") for n in (16, 33, 50, 64, 65)] == [16, 64, 64, 64, None]


@requires_cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [37, 50, 99, 197])
def test_cuda_bf16_vit_batch(n, causal):
    """On a GPU: ViT shapes (B/16 at 96, 112, 160 px and 224 px; 12 heads x 64) against float64."""
    _check(64, n, 12, 64, torch.bfloat16, causal, seed=n)
