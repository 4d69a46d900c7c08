import contextlib
import sys

import pytest
import torch

from clipfast.data import pack_text
from clipfast.model import CLIP
from clipfast.presets import from_name
from clipfast.tokenizer import get_tokenizer


def tiny(**kw):
    cfg = from_name("demo", **{"vision.layers": 2, "text.layers": 2, **kw})
    torch.manual_seed(0)
    return CLIP(cfg, kernels="ref").eval()


def test_packed_text_equals_padded():
    model = tiny()
    tok = get_tokenizer()
    caps = ["a photo of the number seven", "handwritten 7", "x", "the digit three, drawn with a pen"]
    padded = tok(caps, context_length=model.context_length)
    seqs = [[int(i) for i in row[: int(row.argmax()) + 1]] for row in padded]
    text, cu, max_len = pack_text(seqs)
    with torch.no_grad():
        a = model.encode_text(padded)
        b = model.encode_text_packed(text, cu, max_len)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_masked_image_keep_all_equals_none_and_uint8_normalised():
    model = tiny()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    n = model.cfg.vision.num_patches
    keep_all = torch.arange(n).expand(3, n)
    with torch.no_grad():
        a = model.encode_image(images)
        b = model.encode_image(images, keep_all)
        c = model.encode_image(model.visual.normalize(images))
        d = model.encode_image(images, keep_all[:, :5])
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)
    assert d.shape == a.shape and not torch.allclose(a, d)


def test_avg_pool_variants_and_sincos():
    for kw in ({"vision.pool": "avg", "vision.final_ln_after_pool": True, "vision.no_ln_pre": True},
               {"vision.pool": "avg"}, {"vision.pos_embed": "sincos"}):
        model = tiny(**kw)
        out = model.encode_image(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, model.cfg.embed_dim) and torch.isfinite(out).all()
    assert not tiny(**{"vision.pos_embed": "sincos"}).visual.positional_embedding.requires_grad


def test_state_dict_layout_is_open_clips():
    model = tiny()
    sd = model.state_dict()
    assert sd["logit_scale"].shape == torch.Size([])
    assert sd["visual.conv1.weight"].shape == (128, 3, 8, 8)
    assert "transformer.resblocks.0.attn.in_proj_weight" in sd and "visual.proj" in sd and "text_projection" in sd
    assert not any(k.endswith(("mean", "std")) for k in sd)  # normalisation constants are not state
    other = tiny()
    other.load_state_dict(sd)
    assert torch.equal(other.logit_scale, model.logit_scale)
    with torch.no_grad():  # ZeRO stage 3 leaves an empty placeholder of a partitioned parameter: saved as it is
        model.logit_scale.data = torch.empty(0)
    assert model.state_dict()["logit_scale"].shape == (0,)


def test_gradients_reach_every_trainable_parameter():
    model = tiny().train()
    tok = get_tokenizer()
    sot, eot = tok.sot_token_id, tok.eot_token_id
    text, cu, max_len = pack_text([[sot, 320, 1125, eot], [sot, 539, eot]])
    img, txt, scale = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), text, cu, max_len)
    (scale * img @ txt.T).logsumexp(0).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n != "token_embedding.weight"
               and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing


def test_grad_checkpointing_same_gradients():
    ref, ckpt, ckpt_compiled = tiny().train(), tiny().train(), tiny().train()
    ckpt.set_grad_checkpointing(True)
    ckpt_compiled.set_grad_checkpointing(True)
    ckpt_compiled.compile_blocks("aot_eager")  # recomputation through the compiled blocks
    x = torch.randn(2, 3, 32, 32)
    for m in (ref, ckpt, ckpt_compiled):
        m.encode_image(x).sum().backward()
    for (n, a), (_, b), (_, c) in zip(ref.named_parameters(), ckpt.named_parameters(),
                                      ckpt_compiled.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), n
            assert torch.allclose(a.grad, c.grad, atol=1e-6), n


def test_cpu_attention_of_bf16_runs_in_float32():
    """clipfast.layers.sdpa: bf16 on the CPU is computed in float32 (torch's CPU bf16 kernel is up to ~5x slower),
    with or without autocast, and differentiably; float32 is torch's own."""
    import torch.nn.functional as F

    from clipfast.layers import sdpa

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    assert not torch.equal(want, F.scaled_dot_product_attention(q, k, v, is_causal=True))  # so this test can fail
    assert torch.equal(sdpa(q, k, v, causal=True), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sdpa(q, k, v, causal=True)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    got.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    x = torch.randn(2, 3, 5, 16)
    assert torch.equal(sdpa(x, x, x), F.scaled_dot_product_attention(x, x, x))


def _step_grads(model, images, ids, cu, max_len, keep=None):
    model.zero_grad(set_to_none=True)
    img, txt, scale = model(images, ids, cu, max_len, keep)
    (img @ txt.T * scale).logsumexp(-1).sum().backward()
    return [img, txt] + [p.grad.clone() for p in model.parameters()]


def _compile_case(backend):
    """Eager vs compile_blocks(backend) on two batches whose packed text lengths differ (dynamic token count)."""
    model = tiny().train()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    batches = [(torch.randint(1, 1000, (9,)), torch.tensor([0, 4, 9], dtype=torch.int32)),
               (torch.randint(1, 1000, (13,)), torch.tensor([0, 6, 13], dtype=torch.int32))]
    out = []
    for ids, cu in batches:
        eager = _step_grads(model.compile_blocks(None), images, ids, cu, 7)
        compiled = _step_grads(model.compile_blocks(backend), images, ids, cu, 7)
        out.append((eager, compiled))
    assert all(b.compile_backend == backend for b in model.visual.transformer.resblocks)
    return out


def test_compiled_blocks_trace_to_the_same_ops():
    """aot_eager: dynamo + AOT autograd, no code generation: the traced blocks must run exactly the eager ops."""
    for eager, compiled in _compile_case("aot_eager"):
        for a, b in zip(eager, compiled, strict=True):
            assert torch.equal(a, b)


def test_compiled_blocks_inductor_match_eager():
    """inductor (C++ on the CPU, Triton on a GPU): fused code, float32 sums in other orders, so each tensor is
    compared as a whole (an entry of a gradient that nearly cancels can part by more than its own size allows)."""
    for eager, compiled in _compile_case("inductor"):
        for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
            err, size = (b - a).norm().item(), a.norm().item()
            assert err <= 1e-5 * size + 1e-9, f"tensor {i} {tuple(a.shape)}: |diff| {err:.3g}, |eager| {size:.3g}"


def _kernel_batch():
    """A tiny model in train mode on the test device and one batch for it: 3 uint8 images, 2 packed captions."""
    from tests.conftest import DEVICE

    model = tiny().train().to(DEVICE)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, device=DEVICE)
    ids, cu = torch.randint(1, 1000, (11,), device=DEVICE), torch.tensor([0, 4, 11], dtype=torch.int32, device=DEVICE)
    return model, images, ids, cu


@contextlib.contextmanager
def _counting(fn_cls, what=lambda args: args[0].shape):
    """Within the block, every fn_cls.apply (an autograd Function's) appends what(its arguments), by default its first
    argument's shape, to the list yielded."""
    calls, real = [], fn_cls.apply
    fn_cls.apply = lambda *a: calls.append(what(a)) or real(*a)
    try:
        yield calls
    finally:
        fn_cls.apply = real


def _assert_same_step(ref, got, what="torch"):
    """Features and gradients of two steps equal to float32 rounding, each tensor compared as a whole."""
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        err, size = (b - a).norm().item(), a.norm().item()
        assert err <= 1e-5 * size + 1e-7, f"tensor {i} {tuple(a.shape)}: |diff| {err:.3g}, |{what}| {size:.3g}"


def test_triton_layer_norm_matches_torch_and_keeps_the_state_dict():
    """set_layer_norm("triton"): every layer norm through kernels.layer_norm, or kernels.add_layer_norm with the
    residual add before it (under the interpreter on the CPU, natively on a GPU): the same features and gradients as
    the add and F.layer_norm to float32 rounding, the same state_dict."""
    from clipfast.layers import LayerNorm

    model, images, ids, cu = _kernel_batch()
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert len(norms) >= 2 * 2 * 2 + 2 and all(m.impl == "torch" for m in norms)  # 2 per block, ln_post, ln_final
    ref = _step_grads(model, images, ids, cu, 7)
    keys = list(model.state_dict())
    fn = sys.modules["kernels.layer_norm"].AddLayerNormFn
    with _counting(fn) as fused, _counting(fn, lambda a: a[-1]) as biases:
        got = _step_grads(model.set_layer_norm("triton"), images, ids, cu, 7)
    # every residual add but each tower's last goes through add_layer_norm: 2 per block, less 1 per tower, each with
    # the bias of the linear layer before it (out_proj's, c_proj's), which that layer then leaves out
    assert len(fused) == 2 * (model.cfg.vision.layers + model.cfg.text.layers) - 2
    blocks = [b for t in (model.visual.transformer, model.transformer) for b in t.resblocks]
    want = [p for b in blocks for p in (b.attn.out_proj.bias, b.mlp.c_proj.bias)]
    assert sorted(map(id, biases)) == sorted(id(p) for p in want if p is not blocks[-1].mlp.c_proj.bias
                                             and p is not model.visual.transformer.resblocks[-1].mlp.c_proj.bias)
    assert all(m.impl == "triton" for m in norms) and list(model.state_dict()) == keys
    _assert_same_step(ref, got)
    with pytest.raises(ValueError, match=r"one of \('torch', 'triton'\)"):
        model.set_layer_norm("apex")


def test_triton_vision_attention_matches_sdpa():
    """set_vision_attention("triton"): the image tower's attention through kernels.short_attention (under the
    interpreter on the CPU, natively on a GPU) with the qkv projection's bias added in the kernel, full and masked
    (FLIP) token counts: the same features and gradients as SDPA to float32 rounding; the text tower and the
    state_dict are untouched."""
    import kernels.short_attention as sa
    from clipfast.layers import Attention

    model, images, ids, cu = _kernel_batch()
    keep = torch.tensor([[0, 9], [1, 15], [7, 0]], device=images.device)  # 2 of the 16 patches kept per image
    for k in (None, keep):
        with _counting(sa.ShortAttentionQKVFn) as calls:
            ref = _step_grads(model.set_vision_attention("sdpa"), images, ids, cu, 7, keep=k)
            assert not calls
            got = _step_grads(model.set_vision_attention("triton"), images, ids, cu, 7, keep=k)
        assert len(calls) == model.cfg.vision.layers and calls[0][1] == (17 if k is None else 3)
        _assert_same_step(ref, got, "sdpa")
    # the qkv projections leave their bias to the kernel, which adds it to q, k, v and sums its gradient
    with _counting(sa.ShortAttentionQKVFn, lambda a: a[-1]) as biases:
        _step_grads(model, images, ids, cu, 7)
    assert [id(b) for b in biases] == [id(b.attn.in_proj_bias) for b in model.visual.transformer.resblocks]
    text_attn = [m for m in model.transformer.modules() if isinstance(m, Attention)]
    assert text_attn and all(m.dense_impl == "sdpa" for m in text_attn)
    with pytest.raises(ValueError, match=r"one of \('sdpa', 'triton'\)"):
        model.set_vision_attention("flash")


def test_triton_mlp_matches_torch_and_keeps_the_state_dict():
    """set_mlp("triton"): every MLP's c_fc + GELU through kernels.linear_gelu (under the interpreter on the CPU,
    natively on a GPU), both towers, and each qkv projection whose bias the attention does not add through
    kernels.linear_bias: the same features and gradients as nn.Linear + nn.GELU and F.linear to float32 rounding,
    the same state_dict keys."""
    from clipfast.layers import MLP

    model, images, ids, cu = _kernel_batch()
    keys = list(model.state_dict())
    ref = _step_grads(model, images, ids, cu, 7)
    qkv_fn = sys.modules["kernels.linear"].LinearBiasFn
    with _counting(sys.modules["kernels.gelu"].LinearGELUFn) as calls, _counting(qkv_fn, lambda a: a[-1]) as qkv:
        got = _step_grads(model.set_mlp("triton"), images, ids, cu, 7)
    assert len(calls) == model.cfg.vision.layers + model.cfg.text.layers
    assert all(m.impl == "triton" for m in model.modules() if isinstance(m, MLP)) and list(model.state_dict()) == keys
    # every block's qkv projection too (kernels.linear_bias: its bias gradient by kernels.column_sums)
    blocks = [b for t in (model.visual.transformer, model.transformer) for b in t.resblocks]
    assert sorted(map(id, qkv)) == sorted(id(b.attn.in_proj_bias) for b in blocks)
    _assert_same_step(ref, got)
    # with the image tower's attention kernel adding its qkv bias itself, only the text tower's projections
    with _counting(qkv_fn, lambda a: a[-1]) as qkv:
        _assert_same_step(_step_grads(model.set_vision_attention("sdpa").set_mlp("torch"), images, ids, cu, 7),
                          _step_grads(model.set_vision_attention("triton").set_mlp("triton"), images, ids, cu, 7))
    assert sorted(map(id, qkv)) == sorted(id(b.attn.in_proj_bias) for b in model.transformer.resblocks)
    with pytest.raises(ValueError, match=r"one of \('torch', 'triton', 'triton_gemm'\)"):
        model.set_mlp("fused")


def test_triton_gemm_mlp_matches_torch_and_leaves_c_proj_bias_to_the_norm():
    """set_mlp("triton_gemm"): every MLP through kernels.mlp (the GELU in the matmuls' epilogues), both towers: the same
    features and gradients as nn.Linear + nn.GELU to float32 rounding; c_proj's bias goes to the kernel only where no
    add_layer_norm takes it (here, with torch's layer norms, everywhere)."""
    from clipfast.layers import MLP

    model, images, ids, cu = _kernel_batch()
    ref = _step_grads(model, images, ids, cu, 7)
    with _counting(sys.modules["kernels.mlp"].MLPFn, lambda a: a[4]) as b2s:
        got = _step_grads(model.set_mlp("triton_gemm"), images, ids, cu, 7)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert len(b2s) == len(mlps) == model.cfg.vision.layers + model.cfg.text.layers
    assert [id(b) for b in b2s] == [id(m.c_proj.bias) for m in mlps]
    _assert_same_step(ref, got)
