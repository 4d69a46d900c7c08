"""clipfast.flops against open_clip's published profile and against a FLOP counter on the models themselves."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clipfast.flops import flops_per_sample, image_flops, text_flops
from clipfast.model import CLIP
from clipfast.presets import from_name

# open_clip's model profile (docs/model_profile.csv): forward GFLOPs per sample at 224 px and 77 text tokens
PUBLISHED = {"ViT-B-16": (35.1, 6.0), "ViT-L-14": (162.0, 13.3)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_matches_open_clip_profile_within_2_percent(name):
    img, txt = PUBLISHED[name]
    cfg = from_name(name)
    assert image_flops(cfg) / 1e9 == pytest.approx(img, rel=0.02)
    assert text_flops(cfg) / 1e9 == pytest.approx(txt, rel=0.02)
    total = flops_per_sample(name, cfg.vision.num_patches, cfg.text.context_length)
    assert total / 1e9 == pytest.approx(img + txt, rel=0.02)
    assert flops_per_sample(name, training=True) == 3 * total


def counted(fn, batch: int) -> float:
    # the math SDPA backend runs attention as matmuls the counter sees (the fused CPU kernel is not counted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / batch


@pytest.mark.parametrize("name,size,ctx,kept", [("ViT-bigG-14", 56, 16, 7), ("CLIPA-B-16", 64, 8, 5),
                                                 ("ViT-B-32", 96, 77, 4)])
def test_equals_counted_matmul_flops_of_the_model(name, size, ctx, kept):
    cfg = from_name(name, **{"vision.layers": 1, "text.layers": 1, "vision.image_size": size,
                             "text.context_length": ctx})
    model = CLIP(cfg, kernels="ref").eval()
    B, n = 2, cfg.vision.num_patches
    images = torch.randn(B, 3, size, size)
    keep = torch.stack([torch.randperm(n)[:kept] for _ in range(B)])
    tokens = torch.randint(1, 49406, (B, ctx))
    tokens[:, -1] = 49407
    assert counted(lambda: model.encode_image(images), B) == image_flops(cfg)
    assert counted(lambda: model.encode_image(images, keep), B) == image_flops(cfg, kept)
    assert counted(lambda: model.encode_text(tokens), B) == text_flops(cfg)
    assert image_flops(cfg, kept) < image_flops(cfg)  # fewer tokens, fewer FLOPs: CLIPA's point


def test_equals_counted_flops_of_open_clip():
    open_clip = pytest.importorskip("open_clip")
    import warnings

    cfg = from_name("ViT-L-14", **{"vision.layers": 1, "text.layers": 1, "vision.image_size": 56})
    js = open_clip.get_model_config("ViT-L-14")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = open_clip.create_model("ViT-L-14", vision_cfg={**js["vision_cfg"], "layers": 1, "image_size": 56},
                                     text_cfg={**js["text_cfg"], "layers": 1})
    ref.train()  # eval mode sends nn.MultiheadAttention to a fused kernel the counter does not see; no dropout here
    tokens = torch.randint(1, 49406, (2, 77))
    assert counted(lambda: ref.encode_image(torch.randn(2, 3, 56, 56)), 2) == image_flops(cfg)
    assert counted(lambda: ref.encode_text(tokens), 2) == text_flops(cfg)
