"""clipfast.dp and engine=torch on several ranks: data parallelism without DeepSpeed, on gloo ranks of this CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipfast.data import pack_text
from clipfast.dp import OverlappedAverage, average_gradients, broadcast_module, buckets
from clipfast.graph import agree_text_layout, pad_ends, pad_segments, padded_text_layout, shared_text_layout
from clipfast.loss import GatherWithGrad, clip_loss, distributed_clip_loss
from tests.conftest import free_port, requires_cuda
from tests.test_engine import _engine
from tests.test_train import ROOT, _deepspeed, _metrics


def test_buckets_keep_the_order_and_split_by_dtype_and_size():
    a, b, d = torch.zeros(10), torch.zeros(10), torch.zeros(100)  # 40, 40, 400 bytes
    c = torch.zeros(5, dtype=torch.bfloat16)
    got = buckets([a, b, c, d, a], bucket_bytes=80)
    assert [[id(t) for t in g] for g in got] == [[id(a), id(b)], [id(c)], [id(d)], [id(a)]]
    assert buckets([]) == []


def _grad(rank: int, i: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * i + rank)
    return torch.randn(shape, generator=g).to(dtype)


SHAPES = [((5,), torch.float32), ((3, 4), torch.bfloat16), ((7,), torch.float32), ((2,), torch.float32),
          ((6,), torch.bfloat16)]


def _init(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)


def _average_rank(rank, port, out):
    _init(rank, port)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=t)) for s, t in SHAPES]
    for i, p in enumerate(params):
        p.grad = None if i == 3 else _grad(rank, i, *SHAPES[i])  # parameter 3: no gradient on either rank
    average_gradients(params, 2, bucket_bytes=24)  # buckets of one or two tensors
    torch.manual_seed(rank)  # each rank its own initialisation, as clipfast.train seeds them
    module = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        module.weight.normal_()
        module.running_mean.normal_()
    broadcast_module(module)
    torch.save({"grads": [p.grad for p in params], "module": module.state_dict()}, out / f"{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # (past the interpreter's teardown, where a spawned gloo rank once aborted after its work was done)


def test_average_gradients_and_broadcast_on_two_ranks(tmp_path):
    mp.spawn(_average_rank, args=(free_port(), tmp_path), nprocs=2)
    got = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    for i, (shape, dtype) in enumerate(SHAPES):
        if i == 3:
            want = torch.zeros(shape)
        else:
            want = (_grad(0, i, shape, dtype) + _grad(1, i, shape, dtype)) / 2
        for r in (0, 1):
            assert got[r]["grads"][i].dtype == dtype
            torch.testing.assert_close(got[r]["grads"][i], want.to(dtype), rtol=0, atol=0, msg=f"rank {r}, grad {i}")
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.normal_()
        bn.running_mean.normal_()
    for r in (0, 1):
        for k, v in bn.state_dict().items():
            assert torch.equal(got[r]["module"][k], v), (r, k)


class _Chain(torch.nn.Module):
    """x -> b -> a -> ... (registered a, b: the backward completes a's gradients before b's), then `layers` in
    order; `unused` gets no gradient."""

    def __init__(self, dtype):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
        self.a, self.b = torch.nn.Linear(6, 4).to(dtype), torch.nn.Linear(4, 6).to(dtype)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4).to(dtype) for _ in range(3))

    def forward(self, x):
        x = torch.tanh(self.a(torch.tanh(self.b(x))))
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.float().square().sum()


class _Probe(torch.autograd.Function):
    """Identity; its backward (the backward's last node but the first layer's weight) records fn()."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.fn()
        return g, None


class _Raise(torch.autograd.Function):
    """Identity whose backward raises (the backward's last node but the first layer's)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise ValueError("a backward that fails midway")


def _overlap_case(rank, dtype) -> dict:
    torch.manual_seed(0)
    model = _Chain(dtype)
    params = list(model.parameters())
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(rank)).to(dtype)
    model(x).backward()
    average_gradients(params, 2)
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    sizes, at_probe = [], []
    all_reduce = dist.all_reduce

    def recorded(t, *a, **kw):
        sizes.append(t.numel())
        return all_reduce(t, *a, **kw)

    reducer = OverlappedAverage(params, 2, bucket_bytes=1)  # a bucket per tensor
    dist.all_reduce = recorded
    try:
        reducer.begin()
        model(_Probe.apply(x.requires_grad_(), lambda: at_probe.append(reducer.launched))).backward()
        reducer.finish()
        res = {"want": want, "got": [p.grad.clone() for p in params], "sizes": list(sizes), "at_probe": at_probe,
               "order": [p.numel() for p in params[::-1]], "buckets": len(reducer.buckets)}
        model(x).backward()  # not armed: a backward without begin() launches nothing
        res["idle"] = len(sizes) - len(res["sizes"])
        for call in (reducer.finish, reducer.begin, reducer.begin):  # without begin(); begin() twice
            try:
                call()
            except RuntimeError as e:
                res.setdefault("errors", []).append(str(e))
        reducer.abort()  # (armed by the second begin()): a backward that raises midway, then a whole one
        for p in params:
            p.grad = None
        reducer.begin()
        with pytest.raises(ValueError, match="midway"):
            model(_Raise.apply(x)).backward()
        res["launched_before_raise"] = reducer.launched
        reducer.abort()
        for p in params:
            p.grad = None
        reducer.begin()
        model(x).backward()
        reducer.finish()
        res["after_abort"] = [p.grad.clone() for p in params]
    finally:
        dist.all_reduce = all_reduce
    return res


def _overlap_rank(rank, port, out):
    _init(rank, port)
    torch.save({str(dtype): _overlap_case(rank, dtype) for dtype in (torch.float32, torch.bfloat16)},
               out / f"overlap{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


def test_the_overlapped_average_is_average_gradients_launched_during_the_backward(tmp_path):
    """OverlappedAverage on 2 gloo ranks (float32, bf16; a bucket per tensor): the gradients after finish() equal
    average_gradients' bit for bit (the unused parameter's a zero); the last layers' buckets were launched before the
    backward reached the first layer (the probe); the all-reduces came in bucket order (reverse registration), though
    the backward completed `a`'s gradients before `b`'s, registered after it; finish() without begin(), and begin()
    twice, are errors."""
    mp.spawn(_overlap_rank, args=(free_port(), tmp_path), nprocs=2)
    for r in (0, 1):
        for dtype, res in torch.load(tmp_path / f"overlap{r}.pt").items():
            for i, (g, w) in enumerate(zip(res["got"], res["want"])):
                assert g.dtype == w.dtype and torch.equal(g, w), (r, dtype, i)
            assert torch.count_nonzero(res["got"][0]) == 0  # `unused`
            assert res["sizes"] == res["order"], (r, dtype)  # b's bias and weight before a's
            assert res["buckets"] == len(res["order"])
            (launched,) = res["at_probe"]
            assert 6 <= launched < res["buckets"], (r, dtype, launched)  # the 3 layers' 6 tensors, not `unused`
            assert res["idle"] == 0
            assert len(res["errors"]) == 2 and "without begin()" in res["errors"][0] and "twice" in res["errors"][1]
            assert res["launched_before_raise"] >= 6  # the last layers' buckets were out when it raised
            for i, (g, w) in enumerate(zip(res["after_abort"], res["want"])):  # abort(): the next step as ever
                assert torch.equal(g, w), (r, dtype, i)


def _halves(n=12, seed=0):
    """Images and caption id lists of a batch of n, and its two halves' (images, text, cu_seqlens, max_len)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [[49406, *torch.randint(1, 49406, (int(k),), generator=g).tolist(), 49407]
            for k in torch.randint(0, 10, (n,), generator=g)]
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    whole = (images, *pack_text(seqs))
    h = n // 2
    return whole, [(images[i * h:(i + 1) * h], *pack_text(seqs[i * h:(i + 1) * h])) for i in (0, 1)]


STEPS = 3


def _engine_rank(rank, port, out, bf16, overlap):
    _init(rank, port)
    # every rank its own initialisation: broadcast fixes it
    e = _engine("cpu", bf16=bf16, world=2, seed_offset=rank, overlap_reduce=overlap)
    _, halves = _halves()
    losses, grads = [], None
    for _ in range(STEPS):
        loss = distributed_clip_loss(*e(*halves[rank]))
        e.backward(loss)
        grads = grads or {k: p.grad.float().clone() for k, p in e.module.named_parameters()}  # the first step's
        e.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / 2)
    e.save_checkpoint(str(out / f"ckpt{rank}"), tag="step3", client_state={"step": STEPS})
    overlapped = e.reducer is not None and e.reducer.launched == len(e.reducer.buckets)
    torch.save({"losses": losses, "grads": grads, "params": {k: v.float() for k, v in e.module.state_dict().items()},
                "overlapped": overlapped}, out / f"{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("bf16,overlap", [(False, True), (True, True), (False, False)])
def test_two_ranks_step_as_one_rank_on_the_whole_batch(tmp_path, bf16, overlap):
    """TorchEngine on 2 gloo ranks, each on half the batch (the loss over both ranks' features, the gradients averaged
    during the backward, overlap_reduce, or after it): the ranks stay equal bit for bit, and in float32 follow one rank
    that trains on the whole batch (bf16: the averaged bf16 gradients round otherwise than one rank's, so only the
    ranks' agreement is checked). Rank 0 alone writes the checkpoint, in one rank's layout."""
    mp.spawn(_engine_rank, args=(free_port(), tmp_path, bf16, overlap), nprocs=2)
    got = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    assert got[0]["overlapped"] == got[1]["overlapped"] == overlap
    assert got[0]["losses"] == got[1]["losses"]
    for k, v in got[0]["params"].items():
        assert torch.equal(v, got[1]["params"][k]), k
    assert (tmp_path / "ckpt0" / "step3" / "state.pt").is_file() and not (tmp_path / "ckpt1").exists()
    if bf16:
        return
    e = _engine("cpu")
    whole, _ = _halves()
    want, grads = [], None
    for _ in range(STEPS):
        loss = clip_loss(*e(*whole))
        e.backward(loss)
        grads = grads or {k: p.grad.clone() for k, p in e.module.named_parameters()}
        e.step()
        want.append(loss.item())
    assert got[0]["losses"] == pytest.approx(want, rel=1e-5)
    for k, g in grads.items():  # float32 sums in another order: ~1e-6 apart on gradients up to ~3
        torch.testing.assert_close(got[0]["grads"][k], g, rtol=1e-4, atol=1e-5, msg=k)
    for k, v in e.module.state_dict().items():  # atol: the attention's key bias has a zero gradient but for rounding,
        # which AdamW scales up to its step size: 1.3e-6 apart after three steps
        torch.testing.assert_close(got[0]["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    f = _engine("cpu")  # the two ranks' checkpoint resumes on one
    _, client = f.load_checkpoint(str(tmp_path / "ckpt0"))
    assert client == {"step": STEPS}
    for k, v in f.module.state_dict().items():
        assert torch.equal(v.float(), got[0]["params"][k]), k


@pytest.mark.parametrize("ctx", [2, 3, 8, 16, 77])
@pytest.mark.parametrize("bucket", [64, 100, 256])
def test_the_ranks_text_layout_fits_every_rank(bucket, ctx):
    """shared_text_layout: one (T_cap, P) for all ranks, from which every rank's padding splits into P captions of
    1..ctx tokens; the one-rank layout where the ranks' counts sit in one bucket; growth where they are far apart."""
    g = torch.Generator().manual_seed(bucket * 100 + ctx)
    p_min = pad_segments(bucket, ctx)
    grew = 0
    for trial in range(301):
        world = int(torch.randint(2, 9, (), generator=g))
        base = int(torch.randint(0, 20 * bucket, (), generator=g))
        spread = [0, bucket // 4, bucket, 8 * bucket][trial % 4]
        totals = [base + int(torch.randint(0, spread + 1, (), generator=g)) for _ in range(world)]
        if trial == 300:  # one rank full to its own layout's limit, one empty: P captions no longer fit without growth
            totals = [0, 10 * bucket - p_min]
        own = max(padded_text_layout(t, 0, bucket, ctx)[0] for t in totals)
        cap, p = shared_text_layout(own, min(totals), max(totals), bucket, ctx)
        assert cap % bucket == 0 and cap >= own and p >= p_min
        grew += cap > own
        for t in totals:
            ends = pad_ends(t, cap, p, ctx)  # asserts 1..ctx tokens a padding caption
            assert len(ends) == p and ends[-1] == cap
        if len(set(totals)) == 1:
            assert (cap, p) == (own, p_min) and pad_ends(totals[0], cap, p, ctx) == \
                padded_text_layout(totals[0], 0, bucket, ctx)[1]
    assert grew  # the far-apart cases reach the loop that grows T_cap


def _agree_rank(rank, port, out):
    _init(rank, port)
    totals = [[100, 140], [1333, 700]][rank]  # two micro-batches each
    torch.save(agree_text_layout(totals, 64, 16, dist.group.WORLD), out / f"{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


def _skipped_rank(rank, port, out):
    from collections import Counter
    from types import SimpleNamespace

    from clipfast.train import skipped_so_far

    _init(rank, port)
    loader = SimpleNamespace(skipped=Counter({"empty caption": [9, 12][rank], "no image": rank}))
    torch.save(skipped_so_far(loader, 2, torch.device("cpu")), out / f"s{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


def test_the_logged_skip_count_is_every_ranks(tmp_path):
    """metrics.jsonl's skipped_samples on several ranks: the sum over the ranks (it was rank 0's loader's alone)."""
    mp.spawn(_skipped_rank, args=(free_port(), tmp_path), nprocs=2)
    assert [torch.load(tmp_path / f"s{r}.pt") for r in (0, 1)] == [22, 22]


def test_two_ranks_agree_on_one_text_layout(tmp_path):
    mp.spawn(_agree_rank, args=(free_port(), tmp_path), nprocs=2)
    (cap0, ends0), (cap1, ends1) = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    want = shared_text_layout(padded_text_layout(1333, 0, 64, 16)[0], 100, 1333, 64, 16)
    assert cap0 == cap1 and [len(e) for e in ends0 + ends1] == [want[1]] * 4 and (cap0, len(ends0[0])) == want
    assert all(e[-1] == cap0 for e in ends0 + ends1)
    assert agree_text_layout([1333], 64, 16) == padded_text_layout(1333, 0, 64, 16)[:1] + ([
        padded_text_layout(1333, 0, 64, 16)[1]],)  # one text, no group: one rank's layout


def _torchrun(ranks, *overrides, timeout=900):
    """`torchrun --nproc_per_node ranks clipfast/train.py --config configs/demo.py engine=torch ...`, without DeepSpeed
    importable."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", port,
           "clipfast/train.py", "--config", "configs/demo.py", "engine=torch", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="two CPU ranks; on a GPU machine both would take its one GPU")
def test_torchrun_two_ranks_take_deepspeeds_zero1_steps_and_resume(data, tmp_path):
    """The trainer with engine=torch on 2 ranks logs the losses of DeepSpeed ZeRO-1 on 2 ranks (the same shards, seeds
    and schedule), writes one state.pt a checkpoint and resumes from it."""
    pytest.importorskip("deepspeed")
    common = [f"train_data={data / 'train'}", "batch_size=16", "log_every=1", "ckpt_every=2", "warmup_steps=2",
              "tensorboard=false", "data_threads=1", "eval_at_end=false", "precision=fp32"]
    ds, tr = tmp_path / "ds", tmp_path / "torch"
    r = _deepspeed(2, "steps=4", f"out_dir={ds}", *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _torchrun(2, "steps=4", f"out_dir={tr}", *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want, got = _metrics(ds), _metrics(tr)
    assert [x["step"] for x in got] == [1, 2, 3, 4]
    assert [x["loss"] for x in got] == pytest.approx([x["loss"] for x in want], rel=1e-5)
    assert sorted(p.name for p in (tr / "ckpt" / "step4").iterdir()) == ["state.pt"]
    r = _torchrun(2, "steps=6", "resume=true", f"out_dir={tr}", *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "at step 4" in r.stdout + r.stderr
    assert [x["step"] for x in _metrics(tr)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tr / "config.json").read_text())["engine"] == "torch"


def _graph_rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=1)
    torch.cuda.set_device(0)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=t, device="cuda")) for s, t in SHAPES]
    for i, p in enumerate(params):
        p.grad = _grad(0, i, *SHAPES[i]).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the communicator is made outside the capture
        average_gradients(params, 2, bucket_bytes=24)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        average_gradients(params, 2, bucket_bytes=24)  # world 2 on a group of 1: the all-reduce keeps, the mean halves
    new = [_grad(1, i, *SHAPES[i]).cuda() for i in range(len(SHAPES))]
    for p, g in zip(params, new):
        p.grad.copy_(g)
    graph.replay()
    torch.cuda.synchronize()
    x = torch.randn(4, 3, device="cuda", requires_grad=True)  # the loss's gather on NCCL: reduce-scatter backward
    w = torch.randn(4, 3, device="cuda")
    (GatherWithGrad.apply(x) * w).sum().backward()
    torch.save({"got": [p.grad.cpu() for p in params], "want": [(g / 2).cpu() for g in new],
                "gather_grad": x.grad.cpu(), "w": w.cpu()}, out / "graph.pt")
    dist.destroy_process_group()
    os._exit(0)


@requires_cuda
def test_the_gradient_all_reduce_replays_in_a_cuda_graph(tmp_path):
    """NCCL's all-reduce captured in a CUDA graph (as GraphedTrainStep does on several ranks), on a one-rank group with
    world=2 so the replay's result shows: each gradient, rewritten after the capture, comes back halved. And the
    loss's feature gather on NCCL (its backward a reduce-scatter) passes the gradient through on one rank."""
    mp.spawn(_graph_rank, args=(free_port(), tmp_path), nprocs=1)
    r = torch.load(tmp_path / "graph.pt")
    for got, want in zip(r["got"], r["want"]):
        assert torch.equal(got, want)
    assert torch.equal(r["gather_grad"], r["w"])


def _graphed_rank(rank, port, out, overlap):
    from clipfast.graph import GraphedTrainStep
    from clipfast.model import CLIP
    from clipfast.presets import from_name

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=1)
    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = from_name("demo", **{"vision.layers": 1, "text.layers": 1})
    gen = torch.Generator().manual_seed(0)
    batches = []
    for hi in (3, 3, cfg.text.context_length - 1, 3):  # two text buckets: a capture, replays, a second capture
        seqs = [[49406, *torch.randint(1, 49406, (int(n),), generator=gen).tolist(), 49407]
                for n in torch.randint(0, hi, (8,), generator=gen)]
        text, cu, _ = pack_text(seqs)
        images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen)
        batches.append((images.cuda(), text.cuda(), cu.cuda()))

    def build():
        torch.manual_seed(0)
        model = CLIP(cfg).cuda().train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, fused=True, capturable=True)

    model, opt = build()
    eager = []
    for images, text, cu in batches:  # what world=2 means on a group of one: the all-reduce keeps, the mean halves
        loss = clip_loss(*model(images, text, cu, cfg.text.context_length))
        loss.backward()
        for p in model.parameters():
            p.grad /= 2
        opt.step()
        opt.zero_grad(set_to_none=True)
        eager.append(loss.item())
    model_g, opt_g = build()
    model_g.set_tower_streams(overlap)  # overlap: each bucket's gradients made on one or both towers' streams
    step = GraphedTrainStep(model_g, opt_g, autocast_dtype=None, text_bucket=64, world=2, overlap_reduce=overlap)
    graphed = [step(*b).item() for b in batches]
    torch.save({"eager": eager, "graphed": graphed, "captures": step.captures,
                "a": {k: v.cpu() for k, v in model.state_dict().items()},
                "b": {k: v.cpu() for k, v in model_g.state_dict().items()}}, out / "graphed.pt")
    dist.destroy_process_group()
    os._exit(0)


@requires_cuda
@pytest.mark.parametrize("overlap", [True, False])
def test_a_graphed_step_of_several_ranks_replays_its_collectives(tmp_path, overlap):
    """GraphedTrainStep(world=2) on a one-rank NCCL group: the ranks' text layout agreed over gloo, the gradient
    all-reduce captured with the step (inside the backward, bucket by bucket, with the towers on streams of their own;
    or after it); its losses and weights follow eager steps whose gradients are halved (the mean over a world of 2 on
    a group of 1), through two text buckets."""
    mp.spawn(_graphed_rank, args=(free_port(), tmp_path, overlap), nprocs=1)
    r = torch.load(tmp_path / "graphed.pt")
    assert r["captures"] == 2
    torch.testing.assert_close(torch.tensor(r["graphed"]), torch.tensor(r["eager"]), rtol=1e-4, atol=1e-5)
    for name, a in r["a"].items():
        torch.testing.assert_close(r["b"][name], a, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_backward_that_raises_leaves_the_reducer_disarmed():
    """TorchEngine.backward and GraphedTrainStep's (run eagerly) abort the reducer when the backward raises, so the
    next step's begin() starts afresh (it raised "begin() twice", and a plain backward "accumulated twice")."""
    from clipfast.model import CLIP
    from clipfast.presets import from_name
    from tests.test_graph_accum import _graph_step

    calls = []

    class Recorder:
        def begin(self):
            calls.append("begin")

        def abort(self):
            calls.append("abort")

        def finish(self):
            calls.append("finish")

    e = _engine("cpu")
    e.reducer = Recorder()  # (one rank has none: a stand-in that records)
    w = next(e.module.parameters())
    with pytest.raises(ValueError, match="midway"):
        e.backward(_Raise.apply(w).sum())
    e.backward((w * 2).sum())
    assert calls == ["begin", "abort", "begin", "finish"]
    calls.clear()
    model = CLIP(from_name("demo", **{"vision.layers": 1, "text.layers": 1}), kernels="ref")
    s = _graph_step(model, torch.optim.AdamW(model.parameters()), 2)
    s.reducer = Recorder()
    w = next(model.parameters())
    s._backward((w * 2).sum(), False)  # not the last pass: not armed
    with pytest.raises(ValueError, match="midway"):
        s._backward(_Raise.apply(w).sum(), True)
    assert calls == ["begin", "abort"]
