"""clipfast.accum (accum_steps): the micro-batch passes give the whole batch's gradient, on one rank and across two;
batch norms update once per micro-batch; the trainer's runs with and without accumulation take the same steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipfast.accum import bn_stats_frozen, cached_passes, check_accum, split_batch
from clipfast.config import TrainConfig
from clipfast.data import pack_text
from clipfast.loss import distributed_clip_loss
from clipfast.model import CLIP
from clipfast.presets import from_name
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return CLIP(from_name("demo", **{"vision.layers": 2, "text.layers": 1}), kernels="ref").to(dtype)


def _batch(n, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()  # captions of different lengths: the slicing matters
    text, cu, max_len = pack_text([[49406, *torch.randint(1, 4000, (k - 2,), generator=g).tolist(), 49407]
                                   for k in lengths])
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    keep = torch.rand(n, 16, generator=g).topk(11, dim=1).indices.sort(dim=1).values if masked else None
    return {"images": images, "views": None, "text": text, "cu_seqlens": cu, "max_len": max_len}, keep


def _forward(model):
    return lambda mb: model(mb["images"], mb["text"], mb["cu_seqlens"], mb["max_len"], keep=mb["keep"])


def _loss(outs):
    return distributed_clip_loss(*outs), {}


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _whole_and_accumulated(model, batch, keep, n):
    loss, _ = _loss(_forward(model)({**batch, "keep": keep}))
    loss.backward()
    whole = _grads(model)
    model.zero_grad(set_to_none=True)
    passes = []
    acc_loss, _ = cached_passes(model, _forward(model), split_batch(batch, keep, n), _loss,
                                lambda loss, last: (passes.append(last), loss.backward()))
    assert passes == [False] * (n - 1) + [True]
    return loss.detach(), whole, acc_loss, _grads(model)


@pytest.mark.parametrize("n", [2, 3])
def test_micro_batch_passes_give_the_whole_batchs_gradient(n):
    model = _model()
    batch, keep = _batch(12)
    loss, whole, acc_loss, acc = _whole_and_accumulated(model, batch, keep, n)
    torch.testing.assert_close(acc_loss, loss, rtol=1e-12, atol=0)
    assert whole.keys() == acc.keys() and "logit_scale" in acc  # every parameter, the logit scale once
    for k in whole:
        torch.testing.assert_close(acc[k], whole[k], rtol=1e-9, atol=1e-12, msg=k)


def test_split_batch_slices_the_packed_text_per_micro_batch():
    batch, keep = _batch(6)
    micros = split_batch(batch, keep, 3)
    cu = batch["cu_seqlens"]
    for j, mb in enumerate(micros):
        assert torch.equal(mb["text"], batch["text"][cu[2 * j]:cu[2 * j + 2]])
        assert mb["cu_seqlens"].tolist() == [int(c - cu[2 * j]) for c in cu[2 * j:2 * j + 3]]
        assert torch.equal(mb["images"], batch["images"][2 * j:2 * j + 2])
        assert torch.equal(mb["keep"], keep[2 * j:2 * j + 2])
    with pytest.raises(ValueError, match="accum_steps=4 does not divide the per-rank batch of 6"):
        split_batch(batch, keep, 4)


def test_the_first_pass_leaves_batch_norm_statistics_alone():
    bn = torch.nn.BatchNorm1d(3).train()
    x = torch.randn(8, 3) * 4 + 2
    with bn_stats_frozen(bn):
        y = bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert bn.momentum == 0.1  # restored
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))  # batch statistics
    bn(x)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(0))


def test_accum_settings_are_checked():
    check_accum(TrainConfig(batch_size=64, accum_steps=4), world=2)
    with pytest.raises(ValueError, match="batch_size 64 over 2 rank.*32 samples each"):
        check_accum(TrainConfig(batch_size=64, accum_steps=3), world=2)
    check_accum(TrainConfig(batch_size=64, accum_steps=2, cuda_graph=True), world=1)  # both passes in the graph
    with pytest.raises(ValueError, match="must be 1"):
        check_accum(TrainConfig(accum_steps=0), world=1)
    # a pass of one sample through batch norms (a ResNet tower, SLIP's head) is torch's "Expected more than 1 value
    # per channel" after the model is built: named up front; a ViT without SLIP takes it
    with pytest.raises(ValueError, match=r"leaves 1 sample per pass, and this model's batch norms \(the ResNet"):
        check_accum(TrainConfig(model="demo-rn", batch_size=16, accum_steps=8), world=2)
    with pytest.raises(ValueError, match=r"batch norms \(SLIP head\) need 2 or more"):
        check_accum(TrainConfig(batch_size=2, ssl_weight=1.0), world=2)
    check_accum(TrainConfig(model="demo-rn", batch_size=4, accum_steps=2), world=1)
    check_accum(TrainConfig(model="demo", batch_size=2), world=2)


def test_torch_engine_sums_bf16_gradients_in_float32():
    from clipfast.engine import TorchEngine

    engine = TorchEngine(_model(torch.float32), TrainConfig(), torch.device("cpu"), bf16=True)
    p = engine.module.visual.proj
    grads = [torch.randn_like(p, dtype=torch.float32) * 1e-3 for _ in range(3)]
    for i, g in enumerate(grads):
        engine.backward((p.float() * g).sum(), last=i == 2)
        assert (p.grad is None) == (i < 2)
    torch.testing.assert_close(p.grad, (grads[0].bfloat16().float() + grads[1].bfloat16().float() +
                                        grads[2].bfloat16().float()).bfloat16(), rtol=0, atol=0)


def _rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model()
    batch, keep = _batch(12)
    half = split_batch(batch, keep, 2)[rank]  # this rank's 6 samples, as 3 micro-batches of 2
    cached_passes(model, _forward(model), split_batch(half, half.pop("keep"), 3), _loss,
                  lambda loss, last: loss.backward())
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= 2  # DeepSpeed's data-parallel mean
    if rank == 0:
        torch.save(_grads(model), out)
    dist.destroy_process_group()
    os._exit(0)  # past the interpreter's teardown, where a spawned gloo rank once aborted (SIGABRT, "terminate called
    # without an active exception") after its work was done: a crash of the harness, not of what is tested


def test_two_ranks_of_micro_batches_give_the_one_rank_whole_batch_gradient(tmp_path):
    port = free_port()
    mp.spawn(_rank, args=(port, tmp_path / "g.pt"), nprocs=2)
    model = _model()
    batch, keep = _batch(12)
    _loss(_forward(model)({**batch, "keep": keep}))[0].backward()
    got = torch.load(tmp_path / "g.pt")
    for k, g in _grads(model).items():
        torch.testing.assert_close(got[k], g, rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "deepspeed-zero3", "torch", "torch-2"])
def test_runs_with_and_without_accumulation_take_the_same_steps(data, tmp_path, engine):
    """3 steps with accum_steps=4 log the losses of the plain run: two CPU ranks under DeepSpeed ZeRO-1 or ZeRO-3
    (partitioned weights gathered for every pass; micro-batches of 4), engine=torch on one (micro-batches of 8) or on
    two under torchrun (clipfast.dp: the gradients averaged after the last pass; micro-batches of 4)."""
    losses = {}
    for n in (1, 4):
        port = str(free_port())
        out = tmp_path / f"a{n}"
        launch = (["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port]
                  if engine.startswith("deepspeed") else
                  ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
                  if engine == "torch-2" else [])
        cmd = [sys.executable, *launch, "clipfast/train.py", "--config", "configs/demo.py", "steps=3", "log_every=1",
               "batch_size=32", "warmup_steps=1", "tensorboard=false", "data_threads=1", "val_data=",
               f"accum_steps={n}", f"train_data={data / 'train'}", f"out_dir={out}",
               # AdamW with eps 1 and no clipping: the update scales with the gradient (with eps 1e-6 it would not
               # see a gradient summed at a quarter of its size)
               "eps=1.0", "grad_clip=0", "lr=0.05", *(["engine=torch"] if engine.startswith("torch") else []),
               *(["zero_stage=3"] if engine == "deepspeed-zero3" else [])]
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        losses[n] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses[1]) == 3
    # float32: the same steps, summed in another order (a missed update, or passes averaged instead of summed, moves
    # steps 2 and 3's losses by far more)
    assert losses[4] == pytest.approx(losses[1], rel=2e-5)


def test_batch_norms_update_once_per_micro_batch():
    """A toy two-tower model with a batch norm in its image tower: after the two passes its running statistics are
    those of one update per micro-batch (the first pass leaves them alone)."""
    torch.manual_seed(0)
    bn, lin = torch.nn.BatchNorm1d(4).double(), torch.nn.Linear(4, 4).double()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    x, t = torch.randn(6, 4, dtype=torch.float64) * 3 + 1, torch.randn(6, 4, dtype=torch.float64)
    micros = [{"x": x[i:i + 2], "t": t[i:i + 2]} for i in (0, 2, 4)]

    def forward(mb):
        return (torch.nn.functional.normalize(bn(mb["x"]), dim=-1),
                torch.nn.functional.normalize(lin(mb["t"]), dim=-1), scale)

    cached_passes(bn, forward, micros, _loss, lambda loss, last: loss.backward())
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for mb in micros:
        mean = 0.9 * mean + 0.1 * mb["x"].mean(0)
        var = 0.9 * var + 0.1 * mb["x"].var(0, unbiased=True)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)


def test_bench_accum_reports_each_point(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    from bench.accum import main as bench_main

    rows = bench_main(["--preset", "demo", "--image-size", "32", "--text-len", "8", "--batch", "16", "--accum", "4",
                       "1", "--steps", "1", "--out", str(tmp_path)])
    assert [(r["accum_steps"], r["micro_batch"]) for r in rows] == [(4, 4), (1, 16)]
    assert all(r["peak_bytes"] > 0 and r["ms"] > 0 for r in rows)
    md = (tmp_path / "accum.md").read_text()
    assert "| 4 | 4 |" in md and json.loads((tmp_path / "accum.json").read_text())
    # the ratios are against the fewest micro-batches, whatever the order asked (--accum 4 1 made 4 the "1.00x")
    cells = [c.strip() for c in md.split("| 1 | 16 |")[1].splitlines()[0].split("|")]
    assert "| vs 1 |" in md and cells[1] == cells[4] == "1.00x", md
    for bad, said in ((["--graph"], "--graph needs a CUDA device"),
                      (["--batch", "30", "--accum", "4"], "--batch 30 does not split into 4 micro-batches"),
                      (["--accum", "0"], "--accum 0 (at least 1)")):
        with pytest.raises(SystemExit) as e:  # usage errors, before any model is built
            bench_main(["--preset", "demo", "--image-size", "32", "--text-len", "8", "--steps", "1", "--device",
                        "cpu", *bad])
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_a_cumulative_batch_norm_is_refused_and_no_momentum_is_left_changed():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2, momentum=None)).train()
    with pytest.raises(ValueError, match="momentum=None"):
        with bn_stats_frozen(model):
            pass
    assert model[0].momentum == 0.1
