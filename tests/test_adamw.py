"""kernels.adamw (one-pass AdamW over fp32 masters of bf16/fp16 weights) against torch.optim.AdamW, and MasterAdamW's
Triton step (what the CUDA-graph step runs): groups, an LR schedule held in a device tensor, a parameter that skips a
step, checkpoints that the other steps load, clipping folded into the kernel. On CPU under the Triton interpreter."""
import copy

import pytest
import torch

from clipfast.graph import lr_on_device
from clipfast.optim import MasterAdamW, clipped_step, folds_clipping
from kernels.adamw import BLOCK, adamw_cast_, adamw_cast_multi_
from tests.conftest import DEVICE

HP = dict(weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-6)


def _one(x):
    return torch.tensor(float(x), dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
def test_kernel_follows_torch_adamw(dtype, scaled):
    """Five steps over 2 blocks and an odd tail: the fp32 master within float32 rounding of torch.optim.AdamW's (fed
    the same gradients, divided by the scale), the low-precision weight exactly the master rounded to nearest."""
    n = 2 * BLOCK + 5
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(n, generator=gen)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
    p, w = w0.to(DEVICE, dtype), w0.clone().to(DEVICE)
    m, v, step, lr = torch.zeros_like(w), torch.zeros_like(w), _one(0), _one(1e-2)
    scale = _one(3.0) if scaled else None
    for _ in range(5):
        g = (torch.randn(n, generator=gen) * 0.1).to(dtype)
        ref.grad = g.float() / 3.0 if scaled else g.float()
        opt.step()
        step += 1
        adamw_cast_(p, g.to(DEVICE), w, m, v, step, lr, **HP, grad_scale=scale, impl="triton")
    torch.testing.assert_close(w.cpu(), ref.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(m.cpu(), opt.state[ref]["exp_avg"], rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(v.cpu(), opt.state[ref]["exp_avg_sq"], rtol=2e-6, atol=1e-10)
    assert torch.equal(p, w.to(dtype))
    assert (w.cpu() - w0).abs().max() > 1e-2  # it moved: the checks above can fail


def test_kernel_rounds_to_nearest_even_and_keeps_nan_and_inf():
    """lr 0 leaves the master as it was, so the bf16 weight must be exactly the master rounded: halfway cases (to even,
    up and down), just under and over, NaN and +-inf (the interpreter's own fp32 -> bf16 cast truncates)."""
    base = torch.tensor([1.0, 1.0078125, -1.0, 3.0, 1e-3], dtype=torch.float32)  # 1.0078125: an odd bf16 mantissa
    half = torch.tensor([2.0**-8, 2.0**-7 * 1.0078125 / 2, -(2.0**-8), 3.0 * 2.0**-8, 0.0])
    vals = torch.cat([base + half, base + half * 0.999, base + half * 1.001, base,
                      torch.tensor([float("nan"), float("inf"), -float("inf")])])
    vals = torch.cat([vals, torch.zeros(BLOCK + 1 - vals.numel())])
    w = vals.to(DEVICE)
    p = torch.zeros_like(w, dtype=torch.bfloat16)
    g = torch.ones_like(p)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    adamw_cast_(p, g, w, m, v, _one(1), _one(0.0), **HP, impl="triton")
    expect = vals.to(torch.bfloat16)  # torch: round to nearest even
    same = (p.cpu() == expect) | (p.cpu().isnan() & expect.isnan())
    assert same.all(), (vals[~same], p.cpu()[~same], expect[~same])
    assert not torch.equal(expect, vals.view(torch.int32).bitwise_and(-65536).view(torch.float32).to(torch.bfloat16))


def test_kernel_errors():
    w = torch.zeros(8, device=DEVICE)
    p = torch.zeros(8, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="fp32 master"):
        adamw_cast_(p, p, w.double(), w, w, _one(1), _one(1e-3), **HP, impl="triton")
    with pytest.raises(ValueError, match="one size"):
        adamw_cast_(p, p[:4], w, w, w, _one(1), _one(1e-3), **HP, impl="triton")
    with pytest.raises(ValueError, match="lr must be a one-element tensor"):
        adamw_cast_(p, p, w, w, w, _one(1), 1e-3, **HP, impl="triton")
    with pytest.raises(ValueError, match="contiguous"):
        adamw_cast_(p[::2], p[::2], w[::2], w[::2], w[::2], _one(1), _one(1e-3), **HP, impl="triton")


@pytest.mark.parametrize("slots", [8, 3])
@pytest.mark.parametrize("scaled", [False, True])
def test_multi_tensor_launches_equal_one_launch_per_tensor(slots, scaled):
    """adamw_cast_multi_ (up to `slots` tensors per launch: 11 tensors of 0 to 2 blocks and a tail, each with its own
    step count) gives every tensor exactly what adamw_cast_ gives it alone: the same arithmetic on the same
    elements. A tensor that reads another's blocks or step count, or that is skipped, breaks the equality."""
    gen = torch.Generator().manual_seed(5)
    sizes = [2 * BLOCK + 5, 1, 0, 7, BLOCK, BLOCK + 1, 3, 2 * BLOCK, 64, 5, BLOCK - 1]

    def state():
        gen.manual_seed(5)
        out = []
        for i, n in enumerate(sizes):
            w = torch.randn(n, generator=gen)
            out.append((w.to(torch.bfloat16).to(DEVICE), (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
                        .to(DEVICE), w.to(DEVICE), (0.01 * torch.randn(n, generator=gen)).to(DEVICE),
                        (1e-4 * torch.rand(n, generator=gen)).to(DEVICE), _one(1 + i % 4)))
        return out

    lr, scale = _one(1e-2), (_one(2.5) if scaled else None)
    one, multi = state(), state()
    for t in one:
        adamw_cast_(*t, lr, **HP, grad_scale=scale, impl="triton")
    adamw_cast_multi_(multi, lr, **HP, grad_scale=scale, impl="triton", slots=slots)
    for i, (a, b) in enumerate(zip(one, multi, strict=True)):
        for name, x, y in zip("pgwmv", a[:5], b[:5]):
            assert torch.equal(x, y), (i, sizes[i], name)
    moved = [(a[2].cpu() - s[2].cpu()).abs().max() for a, s in zip(multi, state()) if a[2].numel()]
    assert min(moved) > 0  # every non-empty tensor was updated: the equality above can fail


def test_multi_tensor_errors():
    w = torch.zeros(8, device=DEVICE)
    p = torch.zeros(8, dtype=torch.bfloat16, device=DEVICE)
    h = torch.zeros(8, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="slots must be 1 to 8"):
        adamw_cast_multi_([(p, p, w, w, w, _one(1))], _one(1e-3), **HP, impl="triton", slots=9)
    with pytest.raises(ValueError, match="one size"):
        adamw_cast_multi_([(p, p[:4], w, w, w, _one(1))], _one(1e-3), **HP, impl="triton")
    with pytest.raises(ValueError, match="one weight dtype"):
        adamw_cast_multi_([(p, p, w, w.clone(), w.clone(), _one(1)), (h, h, w.clone(), w.clone(), w.clone(), _one(1))],
                          _one(1e-3), **HP, impl="triton")


def _params(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    w16 = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16)) for s in shapes]
    return w16, [torch.nn.Parameter(w.detach().float().cpu()) for w in w16]  # the reference on the CPU


def _groups(ws):
    return [{"params": ws[:2], "weight_decay": 0.1}, {"params": ws[2:], "weight_decay": 0.0}]


def test_master_adamw_triton_step_follows_torch_adamw_and_checkpoints():
    """MasterAdamW(capturable=True, impl="triton") against torch.optim.AdamW on fp32 weights: two groups (one without
    decay), an LR schedule through the device tensors a CUDA graph reads (lr_on_device, filled by LambdaLR), a
    parameter that misses a step; then its checkpoint loaded by the unfused and by the compiled optimizers, which
    continue on the same trajectory."""
    shapes = [(64, 3), (7,), (5, 4, 3)]
    w16, w32 = _params(shapes, 1)
    kw = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    ref = torch.optim.AdamW(_groups(w32), **kw)
    opt = MasterAdamW(_groups(w16), capturable=True, impl="triton", **kw)
    assert opt.fused_cast and opt.triton and folds_clipping(opt)
    lr_on_device(opt, DEVICE)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1 - i / 6) for o in (ref, opt.opt)]
    gen = torch.Generator().manual_seed(2)
    for i in range(6):
        for a, b in zip(w16, w32):
            g = torch.randn(a.shape, generator=gen).to(torch.bfloat16)
            a.grad, b.grad = (None, None) if (i == 3 and a is w16[1]) else (g.to(DEVICE), g.float())
        ref.step()
        opt.step()
        for s in scheds:
            s.step()
    for m, r, w in zip(opt.master, w32, w16):
        torch.testing.assert_close(m.cpu(), r.detach(), rtol=1e-5, atol=1e-7)
        assert torch.equal(w.detach(), m.detach().to(torch.bfloat16))
    steps = [opt.state[m]["step"] for m in opt.master]
    assert [float(s) for s in steps] == [6, 5, 6] and all(s.device == w16[0].device for s in steps)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    saved = copy.deepcopy(opt.state_dict())  # as from disk: torch's load aliases live tensors
    assert saved["opt"]["param_groups"][0]["capturable"] and isinstance(saved["opt"]["param_groups"][0]["lr"],
                                                                        torch.Tensor)
    others = []
    for fused in (False, DEVICE == "cpu"):  # unfused (torch's AdamW, CPU step counts); on the CPU the compiled pass
        o = MasterAdamW(_groups([torch.nn.Parameter(w.detach().clone()) for w in w16]), fused_cast=fused, **kw)
        o.load_state_dict(copy.deepcopy(saved))  # its own flags and a float lr, the saved state
        assert not o.param_groups[0]["capturable"] and isinstance(o.param_groups[0]["lr"], float)
        others.append(o)
    for o, ws in ((ref, w32), (opt, w16), *((o, o.params) for o in others)):
        for w in ws:
            w.grad = torch.ones_like(w)
        o.step()
    for i, r in enumerate(w32):
        for o in (opt, *others):
            torch.testing.assert_close(o.master[i].cpu(), r.detach(), rtol=1e-5, atol=1e-7)
    # a checkpoint with CPU step counts (the unfused optimizer's) loaded into the Triton step: counts move to the device
    back = MasterAdamW(_groups([torch.nn.Parameter(w.detach().clone()) for w in w16]), capturable=True,
                       impl="triton", **kw)
    back.load_state_dict(copy.deepcopy(others[0].state_dict()))
    for w in back.params:
        w.grad = torch.ones_like(w)
    back.step()
    assert float(back.state[back.master[1]]["step"]) == 7


@pytest.mark.parametrize("max_norm", [0.05, 0.0])
def test_clipping_folds_into_the_triton_step(max_norm):
    """clipped_step hands MasterAdamW's Triton step a grad_scale (the fp32 global norm over max_norm); the result equals
    clip_grad_norm_ on fp32 gradients, then torch's AdamW."""
    shapes = [(40, 6), (6,), (3, 5, 2)]
    w16, w32 = _params(shapes, 3)
    never = [torch.nn.Parameter(w.detach().clone()) for w in w32]
    ref, unclipped = torch.optim.AdamW(_groups(w32), lr=1e-2), torch.optim.AdamW(_groups(never), lr=1e-2)
    opt = MasterAdamW(_groups(w16), lr=1e-2, capturable=True, impl="triton")
    for i in range(3):
        gen = torch.Generator().manual_seed(10 + i)
        for a, b, c in zip(w16, w32, never):
            g = ((1 + i) * torch.randn(a.shape, generator=gen)).to(torch.bfloat16)  # changing size: clipping matters
            a.grad, b.grad, c.grad = g.to(DEVICE), g.float(), g.float()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(w32, max_norm)
        ref.step()
        unclipped.step()
        before = [a.grad.clone() for a in w16]
        with clipped_step(opt, w16, max_norm):
            assert (opt.grad_scale is not None) == bool(max_norm)
            opt.step()
        assert opt.grad_scale is None
        assert all(torch.equal(a.grad, b) for a, b in zip(w16, before))  # the kernel divides; no pass rewrote them
    for m, r in zip(opt.master, w32):  # (multiplying by the inverse, as clip_grad_norm_ does, rounds differently)
        torch.testing.assert_close(m.cpu(), r.detach(), rtol=1e-5, atol=1e-6)
    parted = max(((r - c).abs().max() / c.abs().max()).item() for r, c in zip(w32, never))
    assert (parted > 1e-3) == bool(max_norm)  # clipping changed the trajectory: the check above can fail


def test_defaults_and_errors():
    w16, _ = _params([(4, 3)], 4)
    if DEVICE == "cpu":  # CPU: the compiled pass on one thread, else unfused; capturable fused only with Triton
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert MasterAdamW(w16).fused_cast and not MasterAdamW(w16).triton
            assert not MasterAdamW(w16, capturable=True).fused_cast
            torch.set_num_threads(2)
            assert not MasterAdamW(w16).fused_cast and not MasterAdamW(w16, capturable=True).fused_cast
        finally:
            torch.set_num_threads(threads)
        assert MasterAdamW(w16, fused_cast=True).fused_cast and not MasterAdamW(w16, fused_cast=True).triton
        with pytest.raises(ValueError, match="capturable only with the Triton kernel"):
            MasterAdamW(w16, fused_cast=True, capturable=True)
    else:  # CUDA: the kernel for the capturable (CUDA-graph) step, torch's multi-tensor AdamW for the eager one
        assert MasterAdamW(w16, capturable=True).triton and not MasterAdamW(w16).fused_cast
    with pytest.raises(ValueError, match="amsgrad"):
        MasterAdamW(w16, fused_cast=True, impl="triton", amsgrad=True)
