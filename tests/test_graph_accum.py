"""clipfast.graph with accum_steps > 1: the graphed step's micro-batches (one padded text layout for all of them) and
its two passes, run eagerly on the CPU (the capture itself needs CUDA: the CUDA test at the end)."""
import copy
from pathlib import Path

import pytest
import torch

from clipfast.accum import cached_passes, split_batch
from clipfast.data import pack_text
from clipfast.dp import OverlappedAverage
from clipfast.graph import GraphedTrainStep, agree_text_layout, fill_micro_text, pad_segments
from clipfast.loss import clip_loss
from clipfast.model import CLIP
from clipfast.presets import from_name
from clipfast.reduce import image_keep_indices
from tests.conftest import requires_cuda

CFG = from_name("demo", **{"vision.layers": 1, "text.layers": 1})


def _batch(n=12, mask=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [[49406, *torch.randint(1, 49406, (int(k),), generator=g).tolist(), 49407]
            for k in torch.randint(0, CFG.text.context_length - 1, (n,), generator=g)]
    text, cu, max_len = pack_text(seqs)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    keep = image_keep_indices("random", n, CFG.vision.grid, mask, device="cpu", generator=g)
    return {"images": images, "text": text, "cu_seqlens": cu, "max_len": max_len}, keep, seqs


def test_micro_batches_are_the_split_text_each_padded_to_one_layout():
    batch, _, seqs = _batch()
    n, m, bucket, ctx = 3, 4, 16, CFG.text.context_length
    cu = batch["cu_seqlens"]
    bounds = cu[::m].tolist()
    cap, ends = agree_text_layout([b - a for a, b in zip(bounds, bounds[1:])], bucket, ctx)
    p = len(ends[0])
    assert p >= pad_segments(bucket, ctx) and all(len(e) == p and e[-1] == cap for e in ends)
    text_out = torch.full((n, cap), -1, dtype=batch["text"].dtype)
    cu_out = torch.full((n, m + 1 + p), -1, dtype=cu.dtype)
    fill_micro_text(text_out, cu_out, batch["text"], cu, bounds, ends)
    for j in range(n):
        want_text, want_cu, _ = pack_text(seqs[j * m:(j + 1) * m])
        t = want_text.numel()
        assert torch.equal(text_out[j, :t], want_text) and not text_out[j, t:].any()
        assert torch.equal(cu_out[j, : m + 1], want_cu) and cu_out[j, m + 1:].tolist() == ends[j]
        lens = torch.diff(cu_out[j])
        assert lens.min() >= 1 and lens.max() <= ctx


def _graph_step(model, opt, accum, bucket=16, world=1, host_group=None):
    """A GraphedTrainStep whose inputs and step run eagerly (its constructor needs CUDA; _inputs and _step do not);
    world > 1: its all-reduce inside the last pass's backward (OverlappedAverage), as the constructor makes it."""
    s = GraphedTrainStep.__new__(GraphedTrainStep)
    s.model, s.opt, s.autocast_dtype, s.bucket, s.clip = model, opt, None, bucket, None
    s.world, s.params, s.accum, s.host_group, s.overlap = world, list(model.parameters()), accum, host_group, False
    s.reducer = OverlappedAverage(s.params, world) if world > 1 else None
    s.ctx, s.graphs, s.captures = model.context_length, {}, 0
    return s


@pytest.mark.parametrize("mask", [0.0, 0.5])
def test_the_graphed_steps_micro_batches_take_clipfast_accums_step(mask):
    """Three micro-batches through GraphedTrainStep's step body (padded text) against clipfast.accum's eager passes on
    the unpadded micro-batches and against one pass over the whole batch: the same loss, gradients and update."""
    batch, keep, _ = _batch(mask=mask)
    torch.manual_seed(0)
    base = CLIP(CFG, kernels="ref").train()

    def run(kind):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3)
        if kind == "graph":
            _, g = _graph_step(model, opt, 3)._inputs(batch["images"], batch["text"], batch["cu_seqlens"], keep,
                                                       batch["cu_seqlens"])
            grads = {}
            step = opt.step

            def keep_grads(*a, **kw):  # the gradients as the optimizer sees them
                grads.update({k: p.grad.clone() for k, p in model.named_parameters()})
                return step(*a, **kw)

            opt.step = keep_grads
            loss = _graph_step(model, opt, 3)._step(g)
        else:
            def forward(mb):
                return model(mb["images"], mb["text"], mb["cu_seqlens"], mb["max_len"], keep=mb["keep"])

            if kind == "accum":
                loss, _ = cached_passes(model, forward, split_batch(batch, keep, 3),
                                        lambda outs: (clip_loss(*outs), {}), lambda loss, last: loss.backward())
            else:
                loss = clip_loss(*forward({**batch, "keep": keep}))
                loss.backward()
            grads = {k: p.grad.clone() for k, p in model.named_parameters()}
            opt.step()
        return loss.item(), grads, model.state_dict()

    want = run("accum")
    for kind in ("graph", "whole"):
        got = run(kind)
        assert got[0] == pytest.approx(want[0], rel=1e-5), kind
        for k, g in want[1].items():  # float32 sums in other orders; a micro-batch missed or taken twice is O(1) off
            torch.testing.assert_close(got[1][k], g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-8,
                                       msg=lambda m, k=k, kind=kind: f"{kind} {k}: {m}")
        for k, v in want[2].items():
            torch.testing.assert_close(got[2][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k, kind=kind: f"{kind} {k}")


@requires_cuda
def test_a_graph_of_micro_batches_replays_eager_accumulation():
    """The whole accumulated step captured as one graph (both passes over 3 micro-batches, the optimizer) and replayed:
    float32 losses and weights follow clipfast.accum's eager steps over four batches in two text buckets."""
    torch.backends.cuda.matmul.allow_tf32 = False
    batches = [_batch(seed=s) for s in (1, 2, 3, 4)]
    torch.manual_seed(0)
    base = CLIP(CFG).cuda().train()

    def on_cuda(b):
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}

    eager_model = copy.deepcopy(base)
    opt = torch.optim.AdamW(eager_model.parameters(), lr=1e-3, eps=1e-3, fused=True, capturable=True)
    eager = []
    for batch, _, _ in batches:
        b = on_cuda(batch)
        loss, _ = cached_passes(
            eager_model, lambda mb: eager_model(mb["images"], mb["text"], mb["cu_seqlens"], mb["max_len"]),
            split_batch(b, None, 3), lambda outs: (clip_loss(*outs), {}), lambda loss, last: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
        eager.append(loss.item())
    model = copy.deepcopy(base)
    step = GraphedTrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, fused=True,
                                                     capturable=True), autocast_dtype=None, text_bucket=64,
                            accum_steps=3)
    graphed = [step(b["images"], b["text"], b["cu_seqlens"], None, cu_host=batch["cu_seqlens"]).item()
               for batch, _, _ in batches for b in [on_cuda(batch)]]
    assert step.captures == len(step.graphs) == 2  # text buckets of 128, 64, 64 and 64 tokens
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager_model.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@requires_cuda
def test_bench_accum_times_the_graphed_points(tmp_path):
    """bench/accum.py --graph: a row per point for the CUDA graph too, with its pool's size and its time."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.accum import main as bench_main

    rows = bench_main(["--preset", "demo", "--image-size", "32", "--text-len", "8", "--batch", "16", "--accum", "1",
                       "4", "--steps", "2", "--graph", "--out", str(tmp_path)])
    assert [(r["accum_steps"], r["graph"]) for r in rows] == [(1, False), (4, False), (1, True), (4, True)]
    assert all(r["peak_bytes"] > 0 and r["ms"] > 0 for r in rows)
    assert "| graph 4 | 4 |" in (tmp_path / "accum.md").read_text()


def _uneven_batch(n=12):
    """The first half's captions short, the second half's long: two ranks' own text layouts differ."""
    g = torch.Generator().manual_seed(5)
    ks = [int(k) for k in torch.randint(0, 3, (n // 2,), generator=g)] + \
         [int(k) for k in torch.randint(10, CFG.text.context_length - 1, (n // 2,), generator=g)]
    seqs = [[49406, *torch.randint(1, 49406, (k,), generator=g).tolist(), 49407] for k in ks]
    text, cu, max_len = pack_text(seqs)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return {"images": images, "text": text, "cu_seqlens": cu, "max_len": max_len}


def _dp_rank(rank, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CLIP(CFG, kernels="ref").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3)
    half = split_batch(_uneven_batch(), None, 2)[rank]  # this rank's 6 samples
    s = _graph_step(model, opt, 3, world=2, host_group=dist.new_group(backend="gloo"))  # 3 micro-batches of 2
    _, g = s._inputs(half["images"], half["text"], half["cu_seqlens"], None, half["cu_seqlens"])
    loss = s._step(g)
    own = agree_text_layout([int(b - a) for a, b in zip(half["cu_seqlens"][::2], half["cu_seqlens"][2::2])], 16,
                            CFG.text.context_length)
    torch.save({"loss": loss.item(), "shapes": (tuple(g["text"].shape), tuple(g["cu_seqlens"].shape)),
                "own": (own[0], len(own[1][0])), "params": model.state_dict()}, out / f"{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


def test_two_ranks_graphed_step_bodies_take_the_whole_batch_step(tmp_path):
    """GraphedTrainStep's body (run eagerly) on 2 gloo ranks, each with half of a batch whose halves pad differently
    on their own, 3 micro-batches each: the ranks agree on one text layout (the same static shapes), and their mean
    loss and updated weights are one rank's whole-batch step's (float32)."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.spawn(_dp_rank, args=(free_port(), tmp_path), nprocs=2)
    got = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    assert got[0]["own"] != got[1]["own"]  # alone, the two ranks would have padded to different shapes
    assert got[0]["shapes"] == got[1]["shapes"]
    torch.manual_seed(0)
    model = CLIP(CFG, kernels="ref").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3)
    b = _uneven_batch()
    loss = clip_loss(*model(b["images"], b["text"], b["cu_seqlens"], b["max_len"]))
    loss.backward()
    opt.step()
    assert (got[0]["loss"] + got[1]["loss"]) / 2 == pytest.approx(loss.item(), rel=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(got[0]["params"][k], got[1]["params"][k]), k
        torch.testing.assert_close(got[0]["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
