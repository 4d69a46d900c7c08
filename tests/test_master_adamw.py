"""clipfast.optim on the CPU: MasterAdamW (fp32 masters behind bf16 weights, the one-pass compiled step) against
torch.optim.AdamW, and clipped_step (gradient clipping folded into fused AdamW's step)."""
import copy

import pytest
import torch

from clipfast.optim import MasterAdamW


@pytest.mark.parametrize("fused_cast", [False, True])
def test_master_adamw_keeps_fp32_masters_and_rounds_into_bf16(fused_cast):
    torch.manual_seed(0)
    w16 = torch.nn.Parameter(torch.randn(37, 5).to(torch.bfloat16))
    w32 = torch.nn.Parameter(w16.detach().float())  # the masters start from the bf16 weights
    ref = torch.optim.AdamW([w32], lr=1e-2, weight_decay=0.1)
    opt = MasterAdamW([w16], lr=1e-2, weight_decay=0.1, fused_cast=fused_cast)
    assert opt.fused_cast is fused_cast
    for i in range(5):
        g = torch.randn(37, 5, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
        w32.grad, w16.grad = g.float(), g
        ref.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert w16.grad is None and opt.master[0].grad is None
    # the same fp32 trajectory (fused_cast: other rounding order, within a few float32 ulps)
    torch.testing.assert_close(opt.master[0], w32.detach(), rtol=1e-5, atol=1e-6 if fused_cast else 1e-7)
    assert torch.equal(w16.detach(), w32.detach().to(torch.bfloat16))  # bf16 weights = masters rounded
    assert opt.master_bytes() == 37 * 5 * 4 * (1 if fused_cast else 2) and len(opt.state) == 1  # masters (+ grads)
    before = opt.master[0].detach().clone()
    opt.step()  # no gradient this step: the master and the weight stay, though the fp32 gradient buffer is kept
    assert torch.equal(opt.master[0], before) and torch.equal(w16.detach(), before.to(torch.bfloat16))
    with pytest.raises(ValueError, match="no trainable"):
        MasterAdamW([torch.nn.Parameter(torch.zeros(2), requires_grad=False)])


def test_master_adamw_fused_cast_follows_torch_adamw_groups_schedule_and_checkpoints(monkeypatch):
    """The compiled one-pass step (opt-in on the CPU) against torch.optim.AdamW on the fp32 masters: two groups (one
    without decay), an LR that changes every step, a parameter that misses a step, and a checkpoint that the
    unfused optimizer loads and continues from."""
    torch.manual_seed(1)
    shapes = [(64, 3), (7,), (5, 4, 3)]
    w16 = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in shapes]
    w32 = [torch.nn.Parameter(w.detach().float()) for w in w16]

    def groups(ws):
        return [{"params": ws[:2], "weight_decay": 0.1}, {"params": ws[2:], "weight_decay": 0.0}]

    kw = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    ref = torch.optim.AdamW(groups(w32), **kw)
    opt = MasterAdamW(groups(w16), fused_cast=True, **kw)
    for threads in (2, 1):  # CPU parameters: unfused by default with several threads (the faster there), fused on one
        monkeypatch.setattr(torch, "get_num_threads", lambda n=threads: n)
        assert MasterAdamW(groups(w16), **kw).fused_cast == (threads == 1)
    monkeypatch.undo()
    assert not MasterAdamW(groups(w16), capturable=True, **kw).fused_cast
    with pytest.raises(ValueError, match="fused_cast"):
        MasterAdamW(groups(w16), fused_cast=True, capturable=True, **kw)
    gen = torch.Generator().manual_seed(2)
    for i in range(6):
        for o in (ref, opt):
            for g in o.param_groups:
                g["lr"] = 1e-2 * (1 - i / 6)
        for a, b in zip(w16, w32):
            g = torch.randn(a.shape, generator=gen).to(torch.bfloat16)
            a.grad, b.grad = (None, None) if (i == 3 and a is w16[1]) else (g, g.float())
        ref.step()
        opt.step()
    for m, r, w in zip(opt.master, w32, w16):
        torch.testing.assert_close(m, r.detach(), rtol=1e-5, atol=1e-7)  # same trajectory, other rounding order
        assert torch.equal(w.detach(), m.detach().to(torch.bfloat16))
    assert float(opt.state[opt.master[1]]["step"]) == 5 and float(opt.state[opt.master[0]]["step"]) == 6
    unfused = MasterAdamW(groups([torch.nn.Parameter(w.detach().clone()) for w in w16]), fused_cast=False, **kw)
    unfused.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk: torch's load aliases live tensors
    for o, ws in ((ref, w32), (opt, w16), (unfused, unfused.params)):
        for w in ws:
            w.grad = torch.ones_like(w)
        o.step()
    for m, u, r in zip(opt.master, unfused.master, w32):
        torch.testing.assert_close(u, r.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m, u, rtol=1e-6, atol=1e-7)


def test_master_adamw_fused_cast_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    import clipfast.optim as optim

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(optim, "_COMPILED_STEP", broken)
    w16 = torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    w32 = torch.nn.Parameter(w16.detach().float())
    ref, opt = torch.optim.AdamW([w32], lr=1e-2), MasterAdamW([w16], lr=1e-2, fused_cast=True)
    w16.grad, w32.grad = torch.ones_like(w16), torch.ones_like(w32)
    with caplog.at_level("WARNING", logger="clipfast.optim"):
        ref.step()
        opt.step()
    assert "running it eagerly" in caplog.text and optim._COMPILED_STEP is optim._adamw_cast
    torch.testing.assert_close(opt.master[0], w32.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.05, 1e3, 0.0])  # clipping, a bound the norm stays under, no clipping
def test_clipped_step_in_fused_adamw_equals_clip_grad_norm_then_step(max_norm):
    from clipfast.optim import clipped_step, folds_clipping

    torch.manual_seed(3)
    shapes = [(40, 6), (6,), (3, 5, 2)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b, c = ([torch.nn.Parameter(x.detach().clone()) for x in a] for _ in range(2))
    opt_a, opt_b, opt_c = (torch.optim.AdamW(ws, lr=1e-2, weight_decay=0.1, fused=True) for ws in (a, b, c))
    assert folds_clipping(opt_b) and not folds_clipping(torch.optim.AdamW(b, lr=1e-2))
    for i in range(4):
        gen = torch.Generator().manual_seed(i)
        scale = 1 + i  # gradients of changing size: clipping then changes Adam's steps, not only their scale
        gs = [scale * torch.randn(s, generator=gen) for s in shapes]
        for x, y, z, g in zip(a, b, c, gs):
            x.grad, y.grad, z.grad = g.clone(), g.clone(), g.clone()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(a, max_norm, foreach=True)
        opt_a.step()
        opt_c.step()  # never clipped
        with clipped_step(opt_b, b, max_norm):
            assert (getattr(opt_b, "grad_scale", None) is not None) == bool(max_norm)
            opt_b.step()
        assert getattr(opt_b, "grad_scale", None) is None
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
    parted = max(((x - z).abs().max() / z.abs().max()).item() for x, z in zip(a, c))
    assert (parted > 1e-3) == (max_norm == 0.05)  # clipping moved the weights elsewhere: the check above can fail


def test_clipped_step_clips_first_for_an_optimizer_it_cannot_fold_into():
    from clipfast.optim import clipped_step

    w = torch.nn.Parameter(torch.zeros(4))
    w.grad = torch.full((4,), 3.0)  # norm 6
    opt = torch.optim.SGD([w], lr=1.0)
    with clipped_step(opt, [w], 1.5):
        assert not hasattr(opt, "grad_scale")
        torch.testing.assert_close(w.grad.norm(), torch.tensor(1.5))  # clipped before the step
        opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4,), -0.75))
