"""clipfast.engine.TorchEngine: one-rank training without DeepSpeed; checkpoints; CUDA graphs on a GPU."""
import pytest
import torch

from clipfast.build import lr_lambda
from clipfast.checkpoint import apply_settings
from clipfast.config import TrainConfig
from clipfast.data import pack_text
from clipfast.engine import TorchEngine, check_engine
from clipfast.loss import clip_loss
from clipfast.model import CLIP
from clipfast.presets import from_name
from tests.conftest import requires_cuda


def _batch(device, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [[49406, *torch.randint(1, 49406, (int(k),), generator=g).tolist(), 49407]
            for k in torch.randint(0, 10, (n,), generator=g)]
    text, cu, max_len = pack_text(seqs)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images.to(device), text.to(device), cu.to(device), max_len


def _engine(device, bf16=False, cuda_graph=False, world=1, seed_offset=0, **kw):
    cfg = TrainConfig(batch_size=6 * world, steps=10, warmup_steps=2, **{"lr": 1e-3, **kw})
    torch.manual_seed(seed_offset)
    model = CLIP(from_name("demo", **{"vision.layers": 1, "text.layers": 1}), kernels="ref")
    return TorchEngine(model, cfg, torch.device(device), bf16=bf16, cuda_graph=cuda_graph, world=world)


def _eager_step(engine, b):
    images, text, cu, max_len = b
    img, txt, scale = engine(images, text, cu, max_len)
    loss = clip_loss(img, txt, scale)
    engine.backward(loss)
    engine.step()
    return loss.item()


def test_check_engine_names_the_bad_setting():
    check_engine(TrainConfig(engine="torch", cuda_graph=True), 1)
    with pytest.raises(ValueError, match="engine must be"):
        check_engine(TrainConfig(engine="jax"), 1)
    check_engine(TrainConfig(engine="torch"), 2)  # data parallel (clipfast.dp)
    with pytest.raises(ValueError, match="needs engine=torch"):
        check_engine(TrainConfig(cuda_graph=True), 1)
    with pytest.raises(ValueError, match="CUDA"):
        _engine("cpu", cuda_graph=True)


@pytest.mark.parametrize("bf16", [False, True])
def test_steps_follow_the_schedule_and_a_checkpoint_resumes_exactly(bf16, tmp_path):
    e = _engine("cpu", bf16=bf16)
    assert next(e.module.parameters()).dtype == (torch.bfloat16 if bf16 else torch.float32)
    b = _batch("cpu")
    losses = [_eager_step(e, b) for _ in range(3)]
    assert e.scheduler.last_epoch == 3
    if not bf16:  # the same step written out with torch: param groups, clipping, fused AdamW, warmup schedule
        from clipfast.build import param_groups

        ref = _engine("cpu").module  # same seed, same weights
        opt = torch.optim.AdamW(param_groups(ref, e.cfg.weight_decay), lr=1e-3, betas=e.cfg.betas, eps=e.cfg.eps,
                                fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(e.cfg))
        for want in losses:
            loss = clip_loss(*ref(*b))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), e.cfg.grad_clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            assert loss.item() == pytest.approx(want, rel=1e-6)
    e.save_checkpoint(str(tmp_path), tag="step3", client_state={"step": 3})
    after = [_eager_step(e, b) for _ in range(2)]

    f = _engine("cpu", bf16=bf16)
    path, client = f.load_checkpoint(str(tmp_path))
    assert client == {"step": 3} and path.endswith("step3/state.pt") and f.scheduler.last_epoch == 3
    apply_settings(f.optimizer, f.scheduler, f.cfg)  # (as clipfast.checkpoint.resume does: the same settings)
    assert [_eager_step(f, b) for _ in range(2)] == after  # bit for bit: weights, masters, moments, lr restored

    # resumed with other settings (lr lowered after a spike): the config's, not the checkpoint's
    g = _engine("cpu", bf16=bf16, lr=1e-4, weight_decay=0.0, betas=(0.8, 0.95), eps=1e-6)
    g.load_checkpoint(str(tmp_path))
    assert g.scheduler.base_lrs == [1e-3, 1e-3] and g.optimizer.param_groups[0]["weight_decay"] == e.cfg.weight_decay
    apply_settings(g.optimizer, g.scheduler, g.cfg)
    assert g.scheduler.base_lrs == [1e-4, 1e-4] and g.scheduler.get_last_lr() == [1e-4 * lr_lambda(g.cfg)(3)] * 2
    for group in g.optimizer.param_groups:
        assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (
            1e-4 * lr_lambda(g.cfg)(3), 0.0, (0.8, 0.95), 1e-6)
    _eager_step(g, b)
    assert g.scheduler.get_last_lr() == [1e-4 * lr_lambda(g.cfg)(4)] * 2


def test_a_missing_checkpoint_file_is_named(tmp_path):
    (tmp_path / "latest").write_text("global_step9")
    with pytest.raises(FileNotFoundError, match="global_step9"):
        _engine("cpu").load_checkpoint(str(tmp_path))


def test_a_graphed_steps_float32_checkpoint_loads_into_an_eager_engine_as_it_runs():
    """A float32 checkpoint of the CUDA-graph step (capturable AdamW, lr a device tensor) into an eager engine: its
    own run flags and a float lr stay, the saved state and hyper-parameters come (clipfast.optim.run_as_own). torch's
    load_state_dict alone had taken capturable=True and the tensor lr."""
    engine = _engine("cpu")
    _eager_step(engine, _batch("cpu"))
    state = {"module": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict(),
             "scheduler": engine.scheduler.state_dict()}
    for g in state["optimizer"]["param_groups"]:
        g.update(capturable=True, lr=torch.tensor(g["lr"]), weight_decay=0.25)
    other = _engine("cpu")
    other.load_state(state)
    g = other.optimizer.param_groups[0]
    assert g["capturable"] is False and g["fused"] is True and isinstance(g["lr"], float)
    assert g["weight_decay"] == 0.25  # a hyper-parameter: the checkpoint's
    st = other.optimizer.state[g["params"][0]]
    assert torch.equal(st["exp_avg"], engine.optimizer.state[engine.optimizer.param_groups[0]["params"][0]]["exp_avg"])


@requires_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graph_engine_follows_the_eager_engine(bf16):
    torch.backends.cuda.matmul.allow_tf32 = False
    eager, graphed = _engine("cuda", bf16=bf16, eps=1e-3), _engine("cuda", bf16=bf16, cuda_graph=True, eps=1e-3)
    batches = [_batch("cuda", seed=i % 2) for i in range(5)]
    a = [_eager_step(eager, b) for b in batches]
    g = [graphed.graph_step(*b[:3]).item() for b in batches]
    tol = dict(rtol=1e-4, atol=1e-5) if not bf16 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(torch.tensor(g), torch.tensor(a), **tol)
    assert graphed.scheduler.last_epoch == eager.scheduler.last_epoch == 5
    lr_g = graphed.optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr_g) and abs(float(lr_g) - eager.scheduler.get_last_lr()[0]) < 1e-9


def test_auto_kernels_only_where_the_step_is_a_cuda_graph():
    """layer_norm / vision_attention / mlp = "auto" (the default): the Triton kernels on CUDA with cuda_graph=true, the
    plain ops eager or on the CPU; an explicit choice passes through; a bad one is an error that lists the choices."""
    from clipfast.engine import resolve_kernels

    plain = {"layer_norm": "torch", "vision_attention": "sdpa", "mlp": "torch"}
    kernels = {"layer_norm": "triton", "vision_attention": "triton", "mlp": "triton"}
    assert TrainConfig().layer_norm == TrainConfig().vision_attention == TrainConfig().mlp == "auto"
    assert resolve_kernels(TrainConfig(engine="torch", cuda_graph=True), "cuda") == kernels
    assert resolve_kernels(TrainConfig(engine="torch", cuda_graph=True), "cpu") == plain
    assert resolve_kernels(TrainConfig(engine="torch"), "cuda") == plain
    assert resolve_kernels(TrainConfig(), torch.device("cuda", 0)) == plain
    assert resolve_kernels(TrainConfig(layer_norm="triton"), "cpu") == dict(plain, layer_norm="triton")
    graphed_torch_mlp = TrainConfig(engine="torch", cuda_graph=True, mlp="torch")
    assert resolve_kernels(graphed_torch_mlp, "cuda") == dict(kernels, mlp="torch")
    with pytest.raises(ValueError, match=r"vision_attention must be one of \('auto', 'sdpa', 'triton'\), got 'flash'"):
        resolve_kernels(TrainConfig(vision_attention="flash"), "cpu")
    # kernels.mlp (CLIP.set_mlp("triton_gemm"), slower than cuBLAS on an H100) is the benchmarks' only, not a choice
    with pytest.raises(ValueError, match=r"mlp must be one of \('auto', 'torch', 'triton'\), got 'triton_gemm'"):
        resolve_kernels(TrainConfig(mlp="triton_gemm"), "cpu")


def test_tower_streams_auto_with_the_torch_engine_on_cuda(caplog):
    """tower_streams="auto" (the default): the text tower on its own stream with engine=torch on CUDA, eager or
    graphed; not under DeepSpeed unless asked ("on"); never on the CPU (an "on" there says so); a bad value lists the
    choices."""
    import logging

    from clipfast.engine import resolve_tower_streams

    assert TrainConfig().tower_streams == "auto"
    assert resolve_tower_streams(TrainConfig(engine="torch"), "cuda")
    assert resolve_tower_streams(TrainConfig(engine="torch", cuda_graph=True), torch.device("cuda", 0))
    assert not resolve_tower_streams(TrainConfig(), "cuda")
    assert resolve_tower_streams(TrainConfig(tower_streams="on"), "cuda")
    assert not resolve_tower_streams(TrainConfig(engine="torch", tower_streams="off"), "cuda")
    with caplog.at_level(logging.WARNING, logger="clipfast.engine"):
        assert not resolve_tower_streams(TrainConfig(engine="torch", tower_streams="on"), "cpu")
    assert "tower_streams=on is off on cpu" in caplog.text
    with pytest.raises(ValueError, match=r"tower_streams must be one of \('auto', 'off', 'on'\), got 'yes'"):
        resolve_tower_streams(TrainConfig(tower_streams="yes"), "cpu")


def test_overlap_optimizer_auto_on_and_off():
    """overlap_optimizer="auto" (the default) leaves it to GraphedTrainStep (on where it can be); "on" where it cannot
    be is an error naming each key to change; "off" is off; a bad value lists the choices."""
    from clipfast.engine import resolve_overlap_optimizer

    assert TrainConfig().overlap_optimizer == "auto" and resolve_overlap_optimizer(TrainConfig(), "cuda") is None
    graphed = dict(engine="torch", cuda_graph=True, grad_clip=0.0)
    assert resolve_overlap_optimizer(TrainConfig(overlap_optimizer="on", **graphed), "cuda") is True
    assert resolve_overlap_optimizer(TrainConfig(overlap_optimizer="off", **graphed), "cuda") is False
    with pytest.raises(ValueError, match=r"needs grad_clip=0 \(is 1.0"):
        resolve_overlap_optimizer(TrainConfig(overlap_optimizer="on", engine="torch", cuda_graph=True), "cuda")
    with pytest.raises(ValueError, match=r"needs engine=torch cuda_graph=true; bf16 weights"):
        resolve_overlap_optimizer(TrainConfig(overlap_optimizer="on", grad_clip=0.0), "cpu")
    with pytest.raises(ValueError, match=r"needs bf16 weights"):
        resolve_overlap_optimizer(TrainConfig(overlap_optimizer="on", precision="fp32", **graphed), "cuda")
    with pytest.raises(ValueError, match=r"needs accum_steps=1 \(is 4"):
        resolve_overlap_optimizer(TrainConfig(overlap_optimizer="on", accum_steps=4, **graphed), "cuda")
    assert resolve_overlap_optimizer(TrainConfig(overlap_optimizer="auto", **graphed), "cuda", world=2) is None
    with pytest.raises(ValueError, match=r"needs one rank \(this launch has 2"):
        resolve_overlap_optimizer(TrainConfig(overlap_optimizer="on", **graphed), "cuda", world=2)
    with pytest.raises(ValueError, match=r"overlap_optimizer must be one of \('auto', 'off', 'on'\), got 'yes'"):
        resolve_overlap_optimizer(TrainConfig(overlap_optimizer="yes"), "cpu")
