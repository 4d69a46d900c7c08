"""clipfast.resnet: open_clip parity (forward, gradients, resized attention pool), state dicts both ways, patch masks
refused, FLOPs against open_clip's profile and a counter, a tiny ResNet CLIP trained through clipfast.train."""
import dataclasses
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clipfast.flops import flops_per_sample, image_flops, resnet_image_flops, text_flops
from clipfast.interop import from_open_clip, load_open_clip_state, open_clip_name, to_open_clip
from clipfast.model import CLIP
from clipfast.presets import from_name

open_clip = pytest.importorskip("open_clip")


def rel_err(a, b) -> float:
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def open_clip_rn(name="RN50", **kw):
    """open_clip's model, one text layer (the image tower is under test), every BatchNorm's scale, shift and running
    statistics random: open_clip zero-inits each block's last norm scale, which would leave its convolutions out."""
    text = {**open_clip.get_model_config(name)["text_cfg"], "layers": 1}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = open_clip.create_model(name, text_cfg=text, **kw)
    for m in ref.visual.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return ref.eval()


def ours_like(ref, name="RN50", embed_dim=None, **over):
    cfg = from_name(name, **{"text.layers": 1, **over})
    cfg.embed_dim = embed_dim or cfg.embed_dim
    return CLIP(cfg, kernels="ref").eval()


@pytest.fixture(scope="module")
def rn50():
    ref = open_clip_rn()
    ours = ours_like(ref)
    ours.load_state_dict(from_open_clip(ref.state_dict()))  # strict: same names and shapes
    return ref, ours


def test_rn50_parity_at_224_px(rn50):
    ref, ours = rn50
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # uint8 normalised inside, as the trainer feeds it; open_clip takes the normalised floats
        err = rel_err(ours.encode_image(images), ref.encode_image(ours.visual.normalize(images)))
    print(f"\nRN50 224 px parity: {err:.2e}")
    assert err < 1e-5


def test_rn50_parity_at_128_px_with_the_attention_pool_resized(rn50):
    ref, _ = rn50  # weights for 224 px: a 7x7 grid
    ours = ours_like(ref, **{"vision.image_size": 128})
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="quick_gelu"):  # same shapes, another text activation: refused by name
        load_open_clip_state(ours, sd, open_clip_model="RN50-quickgelu")
    load_open_clip_state(ours, sd)  # resized on load to a 4x4 grid
    key = "visual.attnpool.positional_embedding"
    # open_clip's own bicubic resize of a ViT grid, given the same rows: its resize skips ResNets (no grid_size)
    want = {"visual.positional_embedding": sd[key].clone()}
    open_clip.model.resize_pos_embed(want, SimpleNamespace(visual=SimpleNamespace(grid_size=(4, 4))))
    assert ours.visual.attnpool.positional_embedding.shape == (17, 2048)
    assert torch.equal(ours.state_dict()[key], want["visual.positional_embedding"])
    ref128 = open_clip_rn(force_image_size=128)
    ref128.load_state_dict(to_open_clip(ours.state_dict()))  # strict
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = rel_err(ours.encode_image(images), ref128.encode_image(images))
    print(f"\nRN50 128 px parity: {err:.2e}")
    assert err < 1e-5


def test_training_mode_forward_gradients_and_running_statistics_match():
    # a small tower (two blocks in stage 2: a block without a shortcut convolution) at 96 px, a 3x3 grid
    vision = {"layers": [1, 2, 1, 1], "width": 16, "image_size": 96}
    ref = open_clip_rn(vision_cfg=vision, embed_dim=64).train()
    ours = ours_like(ref, **{"vision.resnet_layers": (1, 2, 1, 1), "vision.width": 16, "vision.heads": 8,
                             "vision.image_size": 96}, embed_dim=64).train()
    ours.load_state_dict(from_open_clip(ref.state_dict()))
    gen = torch.Generator().manual_seed(3)
    images, dout = torch.randn(4, 3, 96, 96, generator=gen), torch.randn(4, 64, generator=gen)
    out, want = ours.encode_image(images), ref.encode_image(images)  # batch statistics
    assert rel_err(out, want) < 1e-5
    (out * dout).sum().backward()
    (want * dout).sum().backward()
    theirs = dict(ref.visual.named_parameters())
    scale = theirs["attnpool.q_proj.bias"].grad.norm()
    for name, p in ours.visual.named_parameters():
        g, g_ref = p.grad, theirs[name].grad
        if name == "attnpool.k_proj.bias":  # adds q.b to every score of a query: softmax ignores it, true gradient 0
            assert g.norm() < 1e-4 * scale and g_ref.norm() < 1e-4 * scale
        else:
            assert (g - g_ref).norm() <= 1e-5 * g_ref.norm(), name
    bufs = dict(ref.visual.named_buffers())
    for name, b in ours.visual.state_dict().items():
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(b, bufs[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_stay_float32_in_a_bf16_model(momentum):
    """A bf16 model's batch norms (DeepSpeed's bf16 mode and clipfast.engine cast every buffer) keep float32 running
    statistics that follow a float32 batch norm over the same inputs; in bf16 they stalled (68.0 for 70.5)."""
    from clipfast.resnet import BatchNorm2d

    torch.manual_seed(0)
    ours = BatchNorm2d(8, momentum=momentum)
    ours.weight.data.uniform_(0.5, 1.5)
    ours.bias.data.normal_(0, 0.1)
    ref = torch.nn.BatchNorm2d(8, momentum=momentum)
    ref.load_state_dict(ours.state_dict())  # the same names and shapes
    ours.bfloat16()
    assert ours.weight.dtype == torch.bfloat16 and ours.running_mean.dtype == ours.running_var.dtype == torch.float32
    ref.weight.data.copy_(ours.weight.float())  # both start from the bf16 weights
    ref.bias.data.copy_(ours.bias.float())
    shift = torch.arange(8.0).view(1, 8, 1, 1) * 10  # channel means up to 70.5: bf16's spacing there is 0.5
    for _ in range(300):
        x = (torch.randn(16, 8, 4, 4) * 3 + 0.5 + shift).bfloat16()
        y, want = ours(x), ref(x.float())
        assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)  # bf16 output of the same normalisation
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-5)
    assert ours.num_batches_tracked.item() == 300
    x = (torch.randn(16, 8, 4, 4) * 3 + 0.5 + shift).bfloat16().requires_grad_()
    xf = x.detach().float().requires_grad_()
    dout = torch.randn(16, 8, 4, 4)
    (ours(x).float() * dout).sum().backward()
    (ref(xf) * dout).sum().backward()
    assert ours.weight.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours.weight.grad.float(), ref.weight.grad, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(ours.bias.grad.float(), ref.bias.grad, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(x.grad.float(), xf.grad, rtol=2e-2, atol=2e-2)
    ours.eval(), ref.eval()  # evaluation normalises with the running statistics
    x = (torch.randn(4, 8, 4, 4) * 3 + 0.5 + shift).bfloat16()
    torch.testing.assert_close(ours(x).float(), ref(x.float()), rtol=1e-2, atol=1e-2)
    assert ours.double().running_mean.dtype == torch.float64  # (casts other than to 16 bits as before)


def test_a_bf16_resnet_tower_keeps_float32_statistics_and_its_state_dict():
    model = CLIP(from_name("demo-rn"), kernels="ref")
    names = {k: v.dtype for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    stats = [(k, v.dtype) for k, v in model.visual.named_buffers() if "running" in k]
    assert len(stats) > 20 and all(d == torch.float32 for _, d in stats)
    assert {k: v.dtype for k, v in model.state_dict().items() if v.dtype == torch.float32} == \
        {k: d for k, d in names.items() if "running" in k}  # everything else is bf16
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert model.train().encode_image(images).dtype == torch.bfloat16


def test_state_dicts_both_ways_and_the_export_names(tmp_path):
    cfg = from_name("demo-rn")
    name, kwargs = open_clip_name(cfg)
    assert name == "RN50" and kwargs["vision_cfg"]["layers"] == [1, 1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = open_clip.create_model(name, **kwargs)
    torch.manual_seed(1)
    ours = CLIP(cfg, kernels="ref")
    for m in ours.visual.modules():  # running statistics and the batch counter travel too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(), m.num_batches_tracked.fill_(7)
    sd = ours.state_dict()
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    ref.load_state_dict(to_open_clip(sd))  # strict
    back = from_open_clip(ref.state_dict())
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # a clipfast model file through the export CLI's functions, and back
    from clipfast.evaluate import load_model
    from clipfast.export import export_open_clip, import_open_clip

    torch.save({"model_config": dataclasses.asdict(cfg), "state_dict": sd, "train_config": {}, "step": 1},
               tmp_path / "model.pt")
    assert export_open_clip(str(tmp_path / "model.pt"), str(tmp_path / "oc.pt")) == (name, kwargs)  # strict check
    assert json.loads((tmp_path / "oc.pt.json").read_text())["model_name"] == "RN50"
    import_open_clip(name, str(tmp_path / "oc.pt"), str(tmp_path / "back.pt"), **kwargs)
    again = load_model(str(tmp_path / "back.pt"), kernels="ref")
    assert again.cfg == cfg and all(torch.equal(v, sd[k]) for k, v in again.state_dict().items())


def test_patch_masks_and_wrong_sizes_are_refused_naming_the_resnet():
    from clipfast.config import TrainConfig
    from clipfast.reduce import mask_grid
    from clipfast.stages import expand

    model = CLIP(from_name("demo-rn"), kernels="ref").eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert model.encode_image(images).shape == (2, 64)
    with pytest.raises(ValueError, match="ResNet image tower takes no patch mask"):
        model.encode_image(images, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"64x64 px give a 2x2 final grid.*1 positions"):
        model.encode_image(torch.randn(2, 3, 64, 64))
    v = from_name("RN50").vision
    assert mask_grid("RN50", v, "resize", 0.0) == 7
    with pytest.raises(ValueError, match=r"model RN50 has a ResNet image tower: image_reduction='random'"):
        mask_grid("RN50", v, "random", 0.5)
    with pytest.raises(ValueError, match="model demo-rn has a ResNet"):  # before any stage of a run starts
        expand(TrainConfig(model="demo-rn", stages=({"steps": 1}, {"image_reduction": "grid", "mask_ratio": 0.75})))
    assert len(expand(TrainConfig(model="demo-rn", stages=({"steps": 1}, {"image_size": 64})))) == 2
    with pytest.raises(ValueError, match="keeps all 49 grid positions"):
        image_flops(from_name("RN50"), 25)
    with pytest.raises(ValueError, match="resnet_layers must be four"):
        CLIP(from_name("demo-rn", **{"vision.resnet_layers": (1, 1, 1)}))
    with pytest.raises(ValueError, match="not 31 mod 32"):
        CLIP(from_name("demo-rn", **{"vision.image_size": 63}))
    with pytest.raises(ValueError, match="vision.kind must be"):
        CLIP(from_name("demo-rn", **{"vision.kind": "cnn"}))
    # ViT-only switches leave the ResNet tower as it is
    model.set_grad_checkpointing(True).set_vision_attention("triton").compile_blocks(None).set_tower_streams(True)
    assert model.transformer.grad_checkpointing


# open_clip's model profile (docs/model_profile.csv): image GFLOPs at the config's size, given to 2 decimals
PUBLISHED = {"RN50": 12.22, "RN101": 19.54, "RN50x4": 42.56}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_flops_match_open_clips_profile(name):
    cfg = from_name(name)
    n = cfg.vision.num_patches + 1  # open_clip's pool computes every position's query; clipfast's only the first
    assert resnet_image_flops(cfg, queries=n) / 1e9 == pytest.approx(PUBLISHED[name], abs=0.005)
    assert image_flops(cfg) < resnet_image_flops(cfg, queries=n)
    assert flops_per_sample(name) == image_flops(cfg) + text_flops(cfg)


def counted(fn, batch: int) -> float:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / batch


@pytest.mark.parametrize("size", [64, 96])
def test_flops_equal_counted_flops_of_both_models(size):
    # train: MultiheadAttention as matmuls the counter sees. Stages of 2, 1, 3, 1 blocks, width 32: RN50's paths
    ref = open_clip_rn(vision_cfg={"layers": [2, 1, 3, 1], "width": 32, "image_size": size}, embed_dim=64).train()
    ours = ours_like(ref, **{"vision.resnet_layers": (2, 1, 3, 1), "vision.width": 32, "vision.heads": 16,
                             "vision.image_size": size}, embed_dim=64)
    images = torch.randn(2, 3, size, size)
    n = ours.cfg.vision.num_patches + 1
    assert counted(lambda: ours.encode_image(images), 2) == image_flops(ours.cfg)
    assert counted(lambda: ref.encode_image(images), 2) == resnet_image_flops(ours.cfg, queries=n)


def test_demo_rn_trains_through_clipfast_train(data, tmp_path):
    from clipfast.checkpoint import save_model
    from clipfast.config import TrainConfig
    from clipfast.evaluate import load_model
    from clipfast.train import train

    torch.manual_seed(0)  # starting weights saved at 64 px (a 2x2 grid): resized on load to 32 px (1x1)
    init = CLIP(from_name("demo-rn", **{"vision.image_size": 64, "text.context_length": 16}), kernels="ref")
    save_model(tmp_path / "init.pt", init, TrainConfig(), step=0)
    out = tmp_path / "run"
    cfg = TrainConfig(model="demo-rn", image_size=32, text_len=16, train_data=str(data / "train"), batch_size=32,
                      steps=8, lr=1e-3, warmup_steps=2, engine="torch", out_dir=str(out), log_every=1,
                      ckpt_every=8, tensorboard=False, data_threads=1, eval_at_end=False,
                      init_from=str(tmp_path / "init.pt"))
    res = train(cfg, torch.device("cpu"), 0, 1)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"\ndemo-rn losses: {[round(x, 3) for x in losses]}")
    assert res["step"] == 8 and len(losses) == 8 and all(0 < x < 20 for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns: the last three steps beat the first three
    model = load_model(str(out), kernels="ref")
    assert model.cfg.vision.kind == "resnet" and model.visual.layer1[0].bn1.num_batches_tracked.item() == 8
    # 1-D parameters (norm scales and shifts, biases) have no weight decay: they move only where gradients reach them
    before, after = init.visual.state_dict(), model.visual.state_dict()
    skip = "attnpool.k_proj.bias"  # its true gradient is 0 (test_training_mode_forward_gradients_...)
    vectors = [k for k, v in init.visual.named_parameters() if v.ndim == 1 and k != skip]
    assert len(vectors) > 20 and not [k for k in vectors if torch.equal(after[k], before[k])]
