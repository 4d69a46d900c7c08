"""masked_patch_embed: the Triton kernels (interpreter on CPU) against the float64 reference.

Forward and every gradient under one random dout, by the flash-attention rule
    max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + atol,
where torch_same_dtype is `masked_patch_embed_ref` run in the test dtype. Shapes are tiny and odd (odd B, K,
D not a power of two, C*p*p = 588 with a masked K-tail); the interpreter launches use 16x16x32 tiles so
each case spans several tiles.
"""
import pytest
import torch

from kernels import masked_patch_embed, masked_patch_embed_ref
from kernels import patch_embed as pe
from tests.conftest import DEVICE, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative to max|ref64|. fp32: the H200 run at 758b73d summed the 768-term dots in another order than cuBLAS
# (out error 2.0e-6 and 2.5e-6 of max ~3, against cuBLAS' 0.7e-6 and 0.9e-6): 1e-6 allows that and still fails
# a TF32 dot (~1e-3 relative)
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# name: (B, C, H, W, p, D, keep) with keep "perm" (distinct indices per row), "repeat" (duplicates), None (all)
CASES = {
    "p14-perm": (3, 3, 28, 42, 14, 20, 5, "perm"),
    "p8-repeat": (3, 2, 24, 16, 8, 37, 7, "repeat"),
    "p16-all": (1, 3, 16, 48, 16, 24, None, None),
    "p8-all-split": (5, 1, 32, 32, 8, 20, None, None),  # 80 rows: dW runs in 2 row-splits
}


def _inputs(case, dtype, param_dtype=None, seed=0):
    B, C, H, W, p, D, K, mode = CASES[case]
    g = torch.Generator().manual_seed(seed)
    N = (H // p) * (W // p)
    pd = param_dtype or dtype
    images = torch.randn(B, C, H, W, generator=g).to(dtype)
    if mode == "perm":
        keep = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)]).int()
    elif mode == "repeat":
        keep = torch.randint(0, N, (B, K), generator=g)
        keep[:, 1] = keep[:, 0]  # at least one duplicate per row
    else:
        keep = None
    scale = (C * p * p) ** -0.5
    params = [torch.randn(D, C * p * p, generator=g) * scale, torch.randn(D, generator=g),
              torch.randn(N, D, generator=g)]  # weight, bias, pos_embed
    params = [t.to(pd).to(DEVICE).requires_grad_() for t in params]
    return images.to(DEVICE), keep if keep is None else keep.to(DEVICE), params, p


def _fwd_bwd(fn, images, keep, params, p, dout, **kw):
    out = fn(images, keep, *params, p, **kw)
    grads = torch.autograd.grad(out, params, dout.to(out.dtype))
    return [out, *grads]


def _assert_close(kernel, same, ref64, dtype, names):
    for k, t, r, name in zip(kernel, same, ref64, names, strict=True):
        assert k.dtype == t.dtype, f"{name}: dtype {k.dtype}, torch gives {t.dtype}"
        assert k.shape == r.shape, f"{name}: shape {tuple(k.shape)} vs {tuple(r.shape)}"
        err = (k.double() - r).abs().max().item()
        bound = 2 * (t.double() - r).abs().max().item() + ATOL[dtype] * r.abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (torch {dtype}: {bound / 2:.3g})"


def _check_case(images, keep, params, p, dtype, **kw):
    torch.manual_seed(1)
    out_shape = (images.shape[0], keep.shape[1] if keep is not None else params[2].shape[0], params[0].shape[0])
    dout = torch.randn(out_shape, device=DEVICE)
    kernel = _fwd_bwd(masked_patch_embed, images, keep, params, p, dout, impl="triton", **kw)
    norm = {k: kw[k] for k in ("mean", "std", "out_dtype") if k in kw}
    same = _fwd_bwd(masked_patch_embed_ref, images, keep, params, p, dout, **norm)
    p64 = [t.detach().double().requires_grad_() for t in params]
    im64 = images if images.dtype == torch.uint8 else images.double()
    ref64 = _fwd_bwd(masked_patch_embed_ref, im64, keep, p64, p, dout.double(),
                     **({**norm, "out_dtype": torch.float64} if norm else {}))
    _assert_close(kernel, same, ref64, dtype, ["out", "d_weight", "d_bias", "d_pos_embed"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(case, dtype):
    images, keep, params, p = _inputs(case, dtype)
    if case == "p8-all-split":
        B, K, D, CPP = images.shape[0], params[2].shape[0], params[0].shape[0], images.shape[1] * p * p
        cfg = pe._dw_config(dtype)
        tiles = -(-D // cfg["BLOCK_N"]) * -(-CPP // cfg["BLOCK_K"])
        assert DEVICE == "cuda" or pe._dw_split(B * K, tiles, cfg["BLOCK_M"], 8)[0] > 1
    _check_case(images, keep, params, p, dtype, deterministic=case.endswith("perm"))


@pytest.mark.parametrize("deterministic", [True, False])
def test_duplicate_indices_dpos(deterministic):
    """Duplicate kept indices accumulate into one pos_embed row, by either accumulation path."""
    images, keep, params, p = _inputs("p8-repeat", torch.float32)
    _check_case(images, keep, params, p, torch.float32, deterministic=deterministic)


def test_mixed_dtype_params():
    """bf16 images with fp32 parameters (autocast style): bf16 output, fp32 gradients."""
    images, keep, params, p = _inputs("p14-perm", torch.bfloat16, param_dtype=torch.float32)
    _check_case(images, keep, params, p, torch.bfloat16)


def test_strided_images_no_bias():
    """channels-last images (stride_w = C) and bias=None (open_clip's conv1)."""
    images, keep, params, p = _inputs("p14-perm", torch.float16)
    images = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not images.is_contiguous()
    w, _, pos = params
    torch.manual_seed(1)
    dout = torch.randn(images.shape[0], keep.shape[1], w.shape[0], device=DEVICE)
    kernel = _fwd_bwd(lambda x, k, w, pos, p, **kw: masked_patch_embed(x, k, w, None, pos, p, impl="triton", **kw),
                      images, keep, [w, pos], p, dout)
    same = _fwd_bwd(lambda x, k, w, pos, p: masked_patch_embed_ref(x, k, w, None, pos, p), images, keep, [w, pos], p,
                    dout)
    p64 = [t.detach().double().requires_grad_() for t in (w, pos)]
    ref64 = _fwd_bwd(lambda x, k, w, pos, p: masked_patch_embed_ref(x, k, w, None, pos, p), images.double(), keep,
                     p64, p, dout.double())
    _assert_close(kernel, same, ref64, torch.float16, ["out", "d_weight", "d_pos_embed"])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_uint8_normalised(out_dtype):
    """uint8 images with mean/std folded into the loads: same as normalising first."""
    images, keep, params, p = _inputs("p14-perm", out_dtype)
    u8 = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    _check_case(u8.to(DEVICE), keep, params, p, out_dtype, mean=OPENAI_MEAN, std=OPENAI_STD, out_dtype=out_dtype)


def test_empty_keep():
    images, _, params, p = _inputs("p14-perm", torch.float32)
    keep = torch.zeros(images.shape[0], 0, dtype=torch.int64, device=DEVICE)
    out = masked_patch_embed(images, keep, *params, p, impl="triton")
    assert out.shape == (images.shape[0], 0, params[0].shape[0])
    grads = torch.autograd.grad(out.sum(), params)
    assert all(g.abs().sum() == 0 for g in grads)


def test_default_impl_matches_reference():
    """impl=None on CPU takes the reference (differentiable); on CUDA the kernel: both give the reference result."""
    images, keep, params, p = _inputs("p14-perm", torch.float32)
    out = masked_patch_embed(images, keep, *params, p)
    ref = masked_patch_embed_ref(images, keep, *params, p)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.requires_grad


def test_images_requires_grad_raises():
    images, keep, params, p = _inputs("p14-perm", torch.float32)
    with pytest.raises(ValueError, match="no gradient to images"):
        masked_patch_embed(images.requires_grad_(), keep, *params, p, impl="triton")


@pytest.mark.parametrize("bad", ["hw", "weight", "bias", "pos", "keep_b", "keep_dtype", "uint8_no_std", "impl"])
def test_bad_inputs_raise(bad):
    images, keep, (w, b, pos), p = _inputs("p14-perm", torch.float32)
    kw = {"impl": "triton"}
    if bad == "hw":
        images = images[:, :, :, :40]
    elif bad == "weight":
        w = w[:, :-1]
    elif bad == "bias":
        b = b[:-1]
    elif bad == "pos":
        pos = pos[:-1]
    elif bad == "keep_b":
        keep = keep[:-1]
    elif bad == "keep_dtype":
        keep = keep.float()
    elif bad == "uint8_no_std":
        images = images.to(torch.uint8)
    else:
        kw = {"impl": "cuda"}
    with pytest.raises(ValueError):
        masked_patch_embed(images, keep, w, b, pos, p, **kw)


@requires_cuda
def test_deterministic_pos_grad_is_bitwise_stable():
    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, K, D, p = 64, 256, 128, 768, 16
    images = torch.randn(B, 3, 256, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    keep = torch.randint(0, N, (B, K), device="cuda", generator=g)
    params = [torch.randn(D, 768, device="cuda", generator=g), torch.randn(D, device="cuda", generator=g),
              torch.randn(N, D, device="cuda", generator=g)]
    params = [t.requires_grad_() for t in params]
    dout = torch.randn(B, K, D, device="cuda", generator=g, dtype=torch.bfloat16)
    runs = [_fwd_bwd(masked_patch_embed, images, keep, params, p, dout, deterministic=True) for _ in range(3)]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, runs[0], strict=True))
