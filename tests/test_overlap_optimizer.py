"""MasterAdamW.set_overlap: each parameter's update inside the backward, once its gradient is complete, on a stream
of its own, against the step after the backward (bit for bit); the queue's waits on the streams its gradients came
from; in a CUDA graph (CUDA only). On CPU under the Triton interpreter."""
import contextlib

import pytest
import torch

from clipfast.optim import MasterAdamW, clipped_step
from tests.conftest import DEVICE
from tests.test_adamw import _params


def _tiny_clip_batches(n, B=6):
    from clipfast.data import pack_text
    from clipfast.presets import from_name

    cfg = from_name("demo", **{"vision.layers": 2, "text.layers": 2, "text.vocab_size": 1000})
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        seqs = [[1, *torch.randint(2, 999, (int(k),), generator=gen).tolist(), 999]
                for k in torch.randint(0, cfg.text.context_length - 2, (B,), generator=gen)]
        text, cu, _ = pack_text(seqs)
        images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=gen).to(DEVICE)
        out.append((images, text.to(DEVICE), cu.to(DEVICE)))
    return cfg, out


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_step_inside_the_backward_equals_the_step_after_it(grad_checkpointing):
    """MasterAdamW.set_overlap + begin_step (the step each parameter gets once its gradient is complete, inside the
    backward) against step() after the backward, on a bf16 CLIP whose MLP output bias is used by the next block:
    three steps, two groups, one parameter frozen, equal weights, masters and moments bit for bit. Parameters are
    seen updated before step() is called, so the overlap is real; recomputing blocks in the backward (gradient
    checkpointing) reads no weight already updated."""
    from clipfast.build import param_groups
    from clipfast.loss import clip_loss
    from clipfast.model import CLIP

    cfg, batches = _tiny_clip_batches(3)
    runs = []
    for overlap in (False, True):
        torch.manual_seed(0)
        model = CLIP(cfg).to(DEVICE, torch.bfloat16).train().set_grad_checkpointing(grad_checkpointing)
        model.visual.class_embedding.requires_grad_(False)
        opt = MasterAdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, capturable=True,
                          impl="triton")
        opt.set_overlap(overlap)
        assert opt.overlap == overlap
        moved_early = []
        for images, text, cu in batches:
            if overlap:
                opt.begin_step()
            before = [p.detach().clone() for p in opt.params]
            img, txt, scale = model(images, text, cu, cfg.text.context_length)
            clip_loss(img, txt, scale).float().backward()
            moved_early.append(sum(not torch.equal(a, p) for a, p in zip(before, opt.params)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append((model, opt, moved_early))
    (m0, o0, early0), (m1, o1, early1) = runs
    assert early0 == [0, 0, 0] and all(k >= len(o1.params) // 2 for k in early1), (early0, early1)
    for (name, a), b in zip(m0.state_dict().items(), m1.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(o0.master, o1.master, strict=True):
        assert torch.equal(a, b)
        sa, sb = o0.state[a], o1.state[b]
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert float(o1.state[o1.master[0]]["step"]) == 3


def test_step_inside_the_backward_waits_on_every_queued_gradients_stream(monkeypatch):
    """A group's queue fills from hooks on several streams (the towers' gradients are made on streams of their own);
    its launch on the optimizer's stream must come after the work on every one of them, not only on the stream of the
    hook that filled it: waiting on that one alone let the update read image-tower gradients not yet written
    (non-finite losses on an H200). Streams stand in here as names; the launches are recorded, not run."""
    import kernels.adamw as ka

    w16, _ = _params([(4, 3)] * 5, 7)
    opt = MasterAdamW(w16, lr=1e-2, capturable=True, impl="triton").set_overlap()
    inner = opt.opt
    events = []

    class Stream:
        device = torch.device("cpu")

        def __init__(self, name):
            self.name = name

        def __eq__(self, other):
            return self.name == other.name

        def __hash__(self):
            return hash(self.name)

        def wait_stream(self, other):
            events.append(("wait", other.name))

    current = [Stream("main")]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(type(inner), "_launch", lambda self, group, todo: events.append(("launch", len(todo))))
    monkeypatch.setattr(ka, "SLOTS", 3)
    opt.begin_step()
    inner._stream = Stream("optimizer")
    for p, stream in zip(w16, ["main", "text", "main", "main", "text"], strict=True):
        current[0] = Stream(stream)
        p.grad = torch.ones_like(p)
        inner._on_grad(p)
    # the first launch holds gradients from "main" and "text" and is filled in a "main" hook; the second queue
    # (two tensors, not launched before step()) has seen both streams again but is not waited on here
    assert events == [("wait", "main"), ("wait", "text"), ("launch", 3)], events
    assert inner._pending and inner._streams == {0: [Stream("main"), Stream("text")]}
    inner._armed = False  # (step() would launch the rest on the current stream after joining the optimizer's)


def test_step_inside_the_backward_errors():
    w16, _ = _params([(4, 3)], 6)
    with pytest.raises(ValueError, match="Triton step only"):
        MasterAdamW(w16, fused_cast=False).set_overlap()
    assert not MasterAdamW(w16, fused_cast=False).set_overlap(False).overlap
    opt = MasterAdamW(w16, capturable=True, impl="triton")
    with pytest.raises(ValueError, match="overlap is off"):
        opt.begin_step()
    opt.set_overlap()
    opt.begin_step()
    (w16[0].float() ** 2).sum().backward()
    with pytest.raises(ValueError, match="cannot be clipped"):  # the update happened before the norm was known
        with clipped_step(opt, w16, 1e-3):
            opt.step()
    opt.set_overlap(False)
    assert not opt.overlap
    before = w16[0].detach().clone()
    (w16[0].float() ** 2).sum().backward()  # no hook any more: nothing moves before step()
    assert torch.equal(before, w16[0])


@pytest.mark.parametrize("shapes", [[(4, 3), (5,)], [(64, 64)] * 9])
def test_step_inside_the_backward_in_a_cuda_graph(shapes):
    """An eager step, then a captured one replayed three times, with and without the step inside the backward: equal
    weights. Two small tensors never fill a launch before step() (nothing runs on the optimizer's stream, which the
    capture must then not wait on); nine fill one (a fork and a join inside the capture). CUDA only."""
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs")
    runs = []
    for overlap in (False, True):
        gen = torch.Generator().manual_seed(7)
        ws = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16)) for s in shapes]
        first = [w.detach().clone() for w in ws]
        opt = MasterAdamW(ws, lr=1e-2, capturable=True).set_overlap(overlap)

        def step(opt=opt, ws=ws, overlap=overlap):
            if overlap:
                opt.begin_step()
            sum((w.float() ** 3).sum() for w in ws).backward()
            opt.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(3):
            graph.replay()
        runs.append([w.detach().clone() for w in ws])
        assert not any(torch.equal(a, b) for a, b in zip(first, runs[-1]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
