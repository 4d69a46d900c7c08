"""kernels.layer_norm against F.layer_norm: forward and all three gradients under one random dout, over odd shapes
and dtypes, rows split over several backward programs, strided rows, and the fallbacks; kernels.add_layer_norm (the
residual add fused in) against the add followed by F.layer_norm."""
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import add_layer_norm, layer_norm, layer_norm_ref
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


@pytest.mark.parametrize("stages", [0, 2, 3])
def test_pipelined_backward_gives_the_same_bits(stages, monkeypatch):
    """BWD_STAGES 2 or 3 (the row loop's loads a tile or two ahead, through shared memory on a GPU), or 0 (the default:
    3 for long loops) computes what 1 does, in the same order: dx, dr, dW, dB and the residual bias's gradient equal
    bit for bit, in bf16, with rows split over several programs, the last program's run partial (47 rows here; on a
    GPU 70,001, so that each of 4 programs per SM loops over 67 tiles, as at B/16 112 px). The interpreter runs the
    loop as a plain one, so here this checks the switch's path; natively (the GPU suite runs this file) the
    pipeline."""
    ln = sys.modules["kernels.layer_norm"]
    rows = 70001 if DEVICE == "cuda" else 47
    x, w, b, dy = _inputs((rows, 130), torch.bfloat16, seed=7)
    r, _, rb, ds = _inputs((rows, 130), torch.bfloat16, seed=8)

    def run():
        t = [v.detach().clone().requires_grad_() for v in (x, r, w, b, rb)]
        s, y = add_layer_norm(*t[:4], rb=t[4], impl="triton")
        torch.autograd.backward((s, y), (ds, dy))
        return [v.grad for v in t]

    monkeypatch.setattr(ln, "BWD_STAGES", 1)
    one = run()
    monkeypatch.setattr(ln, "BWD_STAGES", stages)
    for name, a, e in zip(("dx", "dr", "dw", "db", "drb"), run(), one, strict=True):
        assert torch.equal(a, e), name

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


def _add_fwd_bwd(fn, x, r, w, b, ds, dy):
    x, r, w, b = (t.detach().clone().requires_grad_() for t in (x, r, w, b))
    s, y = fn(x, r, w, b)
    torch.autograd.backward((s, y), (ds, dy))
    return s.detach(), y.detach(), x.grad, r.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_layer_norm_matches_add_then_norm(shape, dtype):
    """s = x + r rounded as torch's add rounds it (bit for bit), y = LN(s); dx = dr = ds + LN's dx, dW, dB: against the
    fp32 reference of the norm of the kernel's own s, rounded once."""
    x, w, b, dy = _inputs(shape, dtype, seed=2)
    r, _, _, ds = _inputs(shape, dtype, seed=3)
    got = _add_fwd_bwd(lambda *a: add_layer_norm(*a, impl="triton"), x, r, w, b, ds, dy)
    s = x + r  # in dtype, as the unfused model adds
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(got[0], s)  # the same rounding as torch's add
    else:  # triton 3.8's interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest even): within one ulp
        ulp = 2.0 ** (torch.floor(torch.log2(s.float().abs().clamp_min(1e-30))) - 7)
        assert ((got[0].float() - s.float()).abs() <= ulp).all()

    def ref_fn(x, r, w, b):  # the norm of the kernel's s in fp32 (exactly its value; gradients flow to x and r)
        s32 = x.float() + r.float()
        s32 = s32 + (got[0].float() - s32).detach()
        return s32, layer_norm_ref(s32, w.float(), b.float())

    ref = _add_fwd_bwd(ref_fn, x, r, w, b, ds.float(), dy.float())
    for name, a, e in zip(("y", "dx", "dr", "dw", "db"), got[1:], ref[1:], strict=True):
        assert a.dtype == dtype and a.shape == e.shape, name
        torch.testing.assert_close(a.float(), e.to(dtype).float(), **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(got[2], got[3])  # one gradient for both addends


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 96), (2, 19, 130)])
def test_add_layer_norm_with_the_residual_bias(shape, dtype):
    """rb, the bias of the linear layer that made r: s = x + r + rb summed in fp32 and rounded once; its gradient the
    sum over the rows of dr (rows split over several backward programs), against the fp32 reference; the reference
    path (impl "ref") gives the same as the kernel in fp32."""
    x, w, b, dy = _inputs(shape, dtype, seed=5)
    r, _, rb, ds = _inputs(shape, dtype, seed=6)

    def run(fn):
        t = [v.detach().clone().requires_grad_() for v in (x, r, w, b, rb)]
        s, y = fn(*t)
        torch.autograd.backward((s, y), (ds, dy))
        return s.detach(), y.detach(), *(v.grad for v in t)

    got = run(lambda x, r, w, b, rb: add_layer_norm(x, r, w, b, rb=rb, impl="triton"))
    s32 = (x.float() + r.float()) + rb.float()  # the kernel's order, in fp32
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(got[0], s32.to(dtype))
    else:  # the interpreter's truncating cast: within one ulp
        ulp = 2.0 ** (torch.floor(torch.log2(s32.abs().clamp_min(1e-30))) - 7)
        assert ((got[0].float() - s32).abs() <= ulp).all()

    def ref_fn(x, r, w, b, rb):  # the norm of the kernel's s, in fp32; gradients flow to x, r and rb
        s = x.float() + r.float() + rb.float()
        s = s + (got[0].float() - s).detach()
        return s, layer_norm_ref(s, w.float(), b.float())

    ref = run(ref_fn)
    for name, a, e in zip(("y", "dx", "dr", "dw", "db", "drb"), got[1:], ref[1:], strict=True):
        assert a.dtype == dtype and a.shape == e.shape, name
        torch.testing.assert_close(a.float(), e.to(dtype).float(), **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")
    if dtype == torch.float32:  # in bf16 drb sums the unrounded dr, so rounding each of the rows' dr first differs
        torch.testing.assert_close(got[6], got[3].reshape(-1, shape[-1]).sum(0), rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:  # the reference path: the same sums (in bf16 it rounds r + rb first, then + x)
        plain = run(lambda x, r, w, b, rb: add_layer_norm(x, r, w, b, rb=rb, impl="ref"))
        for name, a, e in zip(("s", "y", "dx", "dr", "dw", "db", "drb"), got, plain, strict=True):
            torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(ValueError, match=r"rb of shape \(%d,\)" % shape[-1]):
        add_layer_norm(x, r, w, b, rb=rb[:3], impl="triton")


def test_add_layer_norm_unused_sum_and_fallbacks():
    """Only y used (autograd hands the backward a zero ds); the reference path off the kernel; bad inputs."""
    x, w, b, dy = _inputs((9, 40), torch.float32, seed=4)
    r = torch.randn_like(x)
    for impl in ("triton", "ref"):
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        _, y = add_layer_norm(xs, rs, w, b, impl=impl)
        y.backward(dy)
        ref_x = x.clone().requires_grad_()
        layer_norm_ref(ref_x + r, w, b).backward(dy)
        torch.testing.assert_close(xs.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rs.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    if DEVICE == "cpu":
        s, y = add_layer_norm(x, r, w, b)
        assert torch.equal(s, x + r) and torch.equal(y, F.layer_norm(x + r, (40,), w, b))
    with pytest.raises(ValueError, match="one shape"):
        add_layer_norm(x, r[:3], w, b)
    s, y = add_layer_norm(x, r.bfloat16(), w, b, impl="triton")  # dtypes differ: torch's promotion, the reference
    assert s.dtype == torch.float32 and torch.equal(s, x + r.bfloat16())
    with pytest.raises(ValueError, match=r"add_layer_norm needs weight and bias of shape \(40,\)"):
        add_layer_norm(x, r, w[:4], b)


def test_backward_launch_config_is_read_at_each_launch(monkeypatch):
    """The backward's programs per SM and pipeline depth are read when it launches (bench/throughput.py --knob sets
    them in a whole step): 4 programs per SM; BWD_STAGES=0 pipelines 3 tiles deep where a program's loop runs 32 tiles
    or more (B/16 112 px, batch 1024: 49), else not (L/16 96 px, batch 512: 18); a set BWD_STAGES wins."""
    ln = sys.modules["kernels.layer_norm"]
    monkeypatch.setattr(ln, "_sm_count", lambda index: 132)  # an H100's SMs; no GPU needed to count programs
    cuda = torch.device("cuda", 0)
    b16, l16 = ln._bwd_programs(51200, 2, cuda), ln._bwd_programs(18944, 2, cuda)
    assert b16 == (523, 98) and l16 == (527, 36)
    assert (ln._bwd_stages(98, 2), ln._bwd_stages(36, 2)) == (3, 1)
    assert (ln._bwd_stages(64, 2), ln._bwd_stages(62, 2)) == (3, 1)  # PIPELINE_TILES = 32 tiles
    monkeypatch.setattr(ln, "PROGRAMS_PER_SM", 8)
    assert ln._bwd_programs(51200, 2, cuda) == (1024, 50)
    monkeypatch.setattr(ln, "BWD_STAGES", 2)
    assert (ln._bwd_stages(98, 2), ln._bwd_stages(36, 2)) == (2, 2)
    x = torch.zeros(47, 130)
    *_, const, _ = ln._bwd_launch(x, torch.ones(130), x, x.clone(), torch.zeros(47), torch.ones(47),
                                  torch.zeros(4, 2, 130), 12)
    assert const["STAGES"] == 2
