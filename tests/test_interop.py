"""clipfast.interop: open_clip parity per preset, state dict round trips, resize on load, the export CLI."""
import pytest
import torch

from clipfast.interop import resize_state_dict
from clipfast.model import CLIP, sincos_2d
from clipfast.presets import from_name


def _tiny(size=96, ctx=8, **kw):
    over = {"vision.image_size": size, "vision.patch_size": 16, "text.context_length": ctx}
    over.update(kw)
    return from_name("demo", **over)


@pytest.mark.parametrize("size,ctx", [(224, 32), (336, 77), (64, 4)])
def test_resize_on_load_keeps_class_slot_and_first_positions(size, ctx):
    torch.manual_seed(0)
    sd = CLIP(_tiny(), kernels="ref").state_dict()  # 96 px (6x6 grid), 8 text positions
    cfg = _tiny(size, ctx)
    new = resize_state_dict(sd, cfg)
    model = CLIP(cfg, kernels="ref")
    model.load_state_dict(new)  # strict: every shape fits
    vp, tp = new["visual.positional_embedding"], new["positional_embedding"]
    assert vp.shape == (cfg.vision.num_patches + 1, cfg.vision.width)
    assert torch.equal(vp[0], sd["visual.positional_embedding"][0])
    keep = min(8, ctx)
    assert torch.equal(tp[:keep], sd["positional_embedding"][:keep])
    if ctx > 8:  # new rows copy the last trained row
        assert torch.equal(tp[8:], sd["positional_embedding"][7:8].expand(ctx - 8, -1))
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    assert torch.isfinite(model.encode_image(images)).all()
    assert torch.isfinite(model.encode_text(torch.randint(1, 100, (2, ctx)))).all()


def test_resize_learned_grid_is_bicubic_and_smooth():
    # a linear ramp over the grid stays a ramp (bicubic reproduces linear functions away from the border)
    torch.manual_seed(0)
    sd = CLIP(_tiny(), kernels="ref").state_dict()
    g = torch.arange(6, dtype=torch.float32)
    ramp = (g[:, None] + 2 * g[None, :]).reshape(36, 1).expand(36, 128)
    sd["visual.positional_embedding"] = torch.cat([sd["visual.positional_embedding"][:1], ramp])
    new = resize_state_dict(sd, _tiny(192))["visual.positional_embedding"][1:].reshape(12, 12, 128)[..., 0]
    c = (torch.arange(12) + 0.5) / 2 - 0.5  # new cell centres in old grid units
    want = c[:, None] + 2 * c[None, :]
    assert torch.allclose(new[3:9, 3:9], want[3:9, 3:9], atol=1e-4)  # border cells clamp, so only the interior


def test_resize_sincos_is_recomputed():
    sd = CLIP(_tiny(**{"vision.pos_embed": "sincos"}), kernels="ref").state_dict()
    cfg = _tiny(224, 32, **{"vision.pos_embed": "sincos"})
    new = resize_state_dict(sd, cfg)
    assert torch.equal(new["visual.positional_embedding"], sincos_2d(128, 14))
    CLIP(cfg, kernels="ref").load_state_dict(new)


def test_resize_same_shape_is_identity_and_rejects_patch_change():
    sd = CLIP(_tiny(), kernels="ref").state_dict()
    new = resize_state_dict(sd, _tiny())
    assert all(new[k] is sd[k] for k in sd)
    with pytest.raises(ValueError, match="patch size"):
        resize_state_dict(sd, _tiny(224, **{"vision.patch_size": 14}))
