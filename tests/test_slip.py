"""SLIP and CLIP + data augmentation: the SimCLR loss, the head, the augmented views from DALI, a run end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipfast.config import TrainConfig
from clipfast.data import DaliLoader, pack_text
from clipfast.flops import ssl_flops
from clipfast.loss import simclr_loss
from clipfast.model import CLIP
from clipfast.presets import from_name
from clipfast.reduce import TextReducer
from clipfast.slip import check_ssl, without_head

ROOT = Path(__file__).resolve().parents[1]


def _nt_xent_ref(z1, z2, t):
    """SimCLR's NT-Xent written out over the 2B samples, in float64: anchor k's positive is its other view, its
    candidates every sample but itself; the mean over all 2B anchors."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=-1)
    n = z1.shape[0]
    total = 0.0
    for k in range(2 * n):
        pos = (k + n) % (2 * n)
        others = [j for j in range(2 * n) if j != k]
        sims = torch.stack([z[k] @ z[j] / t for j in others])
        total += -(z[k] @ z[pos] / t - torch.logsumexp(sims, 0))
    return total / (2 * n)


@pytest.mark.parametrize("n,d,t", [(5, 7, 0.1), (8, 3, 0.5)])
def test_simclr_loss_is_nt_xent(n, d, t):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert simclr_loss(z1, z2, t).double().item() == pytest.approx(_nt_xent_ref(z1, z2, t).item(), rel=1e-5)


def test_simclr_loss_split_over_ranks_is_the_whole_batchs():
    """Two 'ranks' of 3 rows each, with every rank's features gathered: the mean of their local losses (what the
    data-parallel gradient averages) is the one-rank loss of all 6 rows."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    local = [simclr_loss(z1[r * 3:(r + 1) * 3], z2[r * 3:(r + 1) * 3], 0.2, z1, z2, offset=r * 3) for r in (0, 1)]
    assert (0.5 * (local[0] + local[1])).item() == pytest.approx(simclr_loss(z1, z2, 0.2).item(), rel=1e-6)


def _model(ssl=True):
    torch.manual_seed(0)
    m = CLIP(from_name("demo", **{"vision.layers": 1, "text.layers": 1}), kernels="ref")
    return m.add_ssl_head(32, 8) if ssl else m


def _batch(n=4):
    text, cu, max_len = pack_text([[49406, 5 + i, 49407] for i in range(n)])
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    return images, text, cu, max_len


def test_forward_with_views_runs_the_head_per_view():
    m = _model()
    images, text, cu, max_len = _batch()
    views = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    img, txt, scale, z = m(images, text, cu, max_len, views=views)
    assert z.shape == (2, 4, 8) and img.shape == (4, 64)
    # training mode: the head's batch norms normalise over one view's batch, as SLIP's (not over both views at once)
    z_alone = m.ssl_head(m.visual(views[1], project=False))
    torch.testing.assert_close(z[1], z_alone)
    with pytest.raises(ValueError, match="no SSL head"):
        _model(ssl=False)(images, text, cu, max_len, views=views)


def test_the_head_trains_with_bf16_weights_beside_float32_statistics():
    """DeepSpeed's bf16 engine casts the parameters and keeps the buffers float32: the head's batch norms were torch's,
    which refuse bf16 weights with float32 statistics (a dtype error at the first SLIP step under DeepSpeed in bf16,
    configs/strategies.py:slip). Now they compute as under autocast; the statistics stay float32 and move; the
    engine=torch cast of everything leaves them float32 too."""
    m = _model()
    for p in m.parameters():  # as DeepSpeed's engine: parameters only
        p.data = p.data.to(torch.bfloat16)
    bn = m.ssl_head[1]
    assert bn.weight.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    before = bn.running_mean.clone()
    x = torch.randn(6, m.ssl_head[0].in_features, dtype=torch.bfloat16)
    z = m.ssl_head(x)
    z.float().sum().backward()
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()
    assert bn.weight.grad is not None and bn.weight.grad.dtype == torch.bfloat16
    assert not torch.equal(bn.running_mean, before) and bn.running_mean.dtype == torch.float32
    m2 = _model().to(torch.bfloat16)  # engine=torch: the whole model cast, the statistics kept float32
    assert m2.ssl_head[1].running_var.dtype == torch.float32 and m2.ssl_head[1].weight.dtype == torch.bfloat16
    assert m2.ssl_head(x).dtype == torch.bfloat16


def test_model_pt_leaves_the_head_out_and_init_from_takes_either(tmp_path):
    from clipfast.checkpoint import load_weights, save_model

    slip = _model()
    save_model(tmp_path / "model.pt", slip, TrainConfig(), step=3)
    saved = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
    assert not [k for k in saved if k.startswith("ssl_head")]
    assert set(saved) == set(_model(ssl=False).state_dict())
    plain = _model(ssl=False)
    load_weights(plain, str(tmp_path))
    torch.testing.assert_close(plain.visual.proj, slip.visual.proj)
    fresh = _model()
    head_before = {k: v.clone() for k, v in fresh.ssl_head.state_dict().items()}
    load_weights(fresh, str(tmp_path / "model.pt"))  # a SLIP run started from plain weights keeps its new head
    torch.testing.assert_close(fresh.ssl_head.state_dict(), head_before)
    assert without_head({"ssl_head.0.weight": 1, "visual.proj": 2}) == {"visual.proj": 2}


def test_ssl_settings_are_checked(caplog):
    import logging

    check_ssl(TrainConfig(ssl_weight=1.0))
    with caplog.at_level(logging.WARNING, logger="clipfast.config"):
        check_ssl(TrainConfig(ssl_crop_scale=[0.08, 1.0]))  # the default, as JSON's list: nothing to say
        assert not caplog.text
        check_ssl(TrainConfig(ssl_hidden=64, ssl_dim=16))
    assert "ssl_hidden, ssl_dim set, but ssl_weight is 0" in caplog.text
    for bad, msg in [(dict(ssl_weight=-1.0), "ssl_weight must be >= 0"),
                     (dict(ssl_weight=1.0, ssl_temperature=0.0), "ssl_temperature must be > 0"),
                     (dict(ssl_weight=1.0, cuda_graph=True), "cuda_graph=false"),
                     (dict(ssl_weight=1.0, ssl_crop_scale=(0.5, 0.2)), "ssl_crop_scale"),
                     (dict(ssl_weight=1.0, ssl_temperature=float("nan")), "ssl_temperature must be > 0"),
                     (dict(ssl_weight=1.0, ssl_hidden=0), "ssl_hidden must be >= 1"),
                     (dict(ssl_weight=1.0, ssl_dim=0), "ssl_dim must be >= 1")]:
        with pytest.raises(ValueError, match=msg):
            check_ssl(TrainConfig(**bad))


@pytest.mark.parametrize("preset", ["demo", "demo-rn"])
def test_ssl_flops_counts_the_towers_and_the_head(preset):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    m = CLIP(from_name(preset, **{"text.layers": 1}), kernels="ref").add_ssl_head(32, 8).eval()
    size = m.cfg.vision.image_size
    x = torch.randn(3, 3, size, size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # (as test_flops)
        m.ssl_head(m.ssl_features(x))
    assert ssl_flops(m.cfg, 32, 8, views=1) * 3 == fc.get_total_flops()


def test_slip_with_a_resnet_tower_reads_the_pools_output():
    torch.manual_seed(0)
    m = CLIP(from_name("demo-rn", **{"text.layers": 1}), kernels="ref").add_ssl_head(32, 8)
    images, text, cu, max_len = _batch()
    views = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    assert m(images, text, cu, max_len, views=views)[3].shape == (2, 4, 8)
    m.eval()  # (the tower's own batch norms, in training mode, see both views' batch at once)
    z = m(images, text, cu, max_len, views=views)[3]
    torch.testing.assert_close(z[0], m.ssl_head(m.visual(views[0])))


def _loader(data, **kw):
    return DaliLoader(str(data / "train"), 8, 32, TextReducer("truncate", 16), train=True, seed=3, threads=1, **kw)


def test_augment_and_views_from_the_pipeline(data):
    plain, again = next(_loader(data)), next(_loader(data))
    torch.testing.assert_close(plain["images"], again["images"])  # the seed fixes the crops
    assert plain["views"] is None
    aug = next(_loader(data, augment="simclr"))
    assert aug["keys"] == plain["keys"] and aug["images"].shape == plain["images"].shape
    assert not torch.equal(aug["images"], plain["images"]), "the augmentations changed nothing"
    torch.testing.assert_close(next(_loader(data, augment="simclr"))["images"], aug["images"])  # reproducible
    noflip = next(_loader(data, augment="simclr_noflip"))
    assert not torch.equal(noflip["images"], plain["images"]) and not torch.equal(noflip["images"], aug["images"])
    slip = next(_loader(data, views=2))
    assert slip["views"].shape == (2, 8, 3, 32, 32) and slip["views"].dtype == torch.uint8
    assert not torch.equal(slip["views"][0], slip["views"][1]), "each view is its own crop"
    torch.testing.assert_close(next(_loader(data, views=2))["views"], slip["views"])  # the seed fixes them too
    with pytest.raises(ValueError, match="augment must be one of"):
        _loader(data, augment="autoaugment")
    with pytest.raises(ValueError, match="views must be 0"):
        DaliLoader(str(data / "val"), 8, 32, TextReducer("truncate", 16), train=False, views=2)


def test_no_flip_holds_for_the_ssl_views_too(tmp_path):
    """augment=simclr_noflip (for data a mirror changes): the SLIP views were still flipped half the time. Images
    bright on the left, dark on the right; views cropped wide, so a mirror shows as the dark side on the left."""
    import io

    import numpy as np
    from PIL import Image

    from clipfast.data import write_shard

    px = np.zeros((32, 32, 3), dtype=np.uint8)
    px[:, :16] = 230
    px[:, 16:] = 20
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=95)
    write_shard(tmp_path / "lr-0000.tar", [{"__key__": f"k{i}", "jpg": buf.getvalue(), "txt": "left"}
                                           for i in range(16)])

    def mirrored(augment):
        batch = next(DaliLoader(str(tmp_path), 16, 32, TextReducer("truncate", 8), train=True, seed=1, threads=1,
                                augment=augment, views=2, view_crop_scale=(0.9, 1.0)))
        v = batch["views"].float()  # (2, B, 3, H, W)
        return int((v[..., :8].mean(dim=(2, 3, 4)) < v[..., -8:].mean(dim=(2, 3, 4))).sum())

    assert mirrored("simclr_noflip") == 0
    assert 0 < mirrored("simclr") < 32  # SimCLR's own flip, half the time


@pytest.mark.slow
def test_slip_run_end_to_end(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "clipfast/train.py", "--config", "configs/demo.py", "engine=torch", "steps=4",
           "log_every=2", "batch_size=16", "warmup_steps=1", "tensorboard=false", "data_threads=1", "ssl_weight=0.5",
           "ssl_hidden=64", "ssl_dim=16", "augment=simclr", f"train_data={data / 'train'}",
           f"val_data={data / 'val'}", f"out_dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in m] == [2, 4]
    for x in m:
        assert x["loss"] == pytest.approx(x["clip_loss"] + 0.5 * x["ssl_loss"], rel=1e-5)
        assert x["ssl_loss"] > 0 and x["clip_loss"] > 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["samples"] == 359
    # resumed without SLIP: the checkpoint holds the head, the model made has none; said as such (it was torch's
    # "Error(s) in loading state_dict" traceback)
    r = subprocess.run([*cmd, "steps=6", "ssl_weight=0", "resume=true"], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0 and "holds another model than this run's config makes: SLIP's head" in r.stderr, \
        r.stderr[-3000:]
    assert f"init_from={out / 'model.pt'}" in r.stderr


def test_strategies_bench_overrides_parse_and_report(tmp_path):
    """bench/strategies.py: each strategy's overrides are valid config keys of configs/demo.py; the table and plot."""
    sys.path.insert(0, str(ROOT / "bench"))
    import strategies

    from clipfast.config import apply_overrides, load_config

    demo = load_config(str(ROOT / "configs/demo.py"))
    assert apply_overrides(demo, strategies.STRATEGIES["slip"]).ssl_weight == 1.0
    for overrides in strategies.STRATEGIES.values():
        apply_overrides(demo, overrides)
    rows = [dict(strategy=s, data=d, train_shards=3, seed=0, top1=0.9 + i / 100, top5=1.0, final_loss=1.5,
                 samples_per_s=400.0, wall_s=60.0) for i, (s, d) in enumerate([("clip", "all"), ("clip", "half")])]
    md = strategies.table(rows)
    assert "| clip | half (3 shards) | 0 | 91.00% |" in md and len(md.splitlines()) == 4
    strategies.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
