"""The preset table: open_clip 3.3.0's architectures, aliases, overrides, activation checkpointing."""
import dataclasses

import pytest
import torch

from clipfast.data import pack_text
from clipfast.interop import config_from_open_clip, open_clip_cfg, open_clip_name
from clipfast.loss import clip_loss
from clipfast.model import CLIP
from clipfast.presets import ALIASES, PRESETS, from_name

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

OPEN_CLIP_SAME = ["ViT-S-16", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-16", "ViT-H-14", "ViT-bigG-14",
                  "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"]
CLIPA_IMAGE = {"CLIPA-L-14": "ViT-L-14-CLIPA", "CLIPA-H-14": "ViT-H-14-CLIPA", "CLIPA-bigG-14": "ViT-bigG-14-CLIPA"}


def as_open_clip(cfg):
    """cfg in open_clip's own dataclasses, every field (defaults filled by open_clip, not by clipfast)."""
    oc = open_clip_cfg(cfg)
    return oc["embed_dim"], CLIPVisionCfg(**oc["vision_cfg"]), CLIPTextCfg(**oc["text_cfg"])


@pytest.mark.parametrize("name", OPEN_CLIP_SAME)
def test_preset_is_open_clip_architecture(name):
    js = open_clip.get_model_config(name)
    assert as_open_clip(from_name(name)) == (js["embed_dim"], CLIPVisionCfg(**js["vision_cfg"]),
                                             CLIPTextCfg(**js["text_cfg"]))
    assert not js.get("quick_gelu", False)  # clipfast's blocks use nn.GELU, as these configs do
    assert open_clip_name(from_name(name)) == (name, {})
    assert config_from_open_clip(name) == from_name(name)


@pytest.mark.parametrize("name", sorted(CLIPA_IMAGE))
def test_clipa_preset_image_tower_is_open_clips(name):
    js = open_clip.get_model_config(CLIPA_IMAGE[name])
    embed_dim, vision, text = as_open_clip(from_name(name))
    assert (embed_dim, vision) == (js["embed_dim"], CLIPVisionCfg(**js["vision_cfg"]))
    t = js["text_cfg"]  # same sizes and context; CLIP's BPE / causal / EOT-pooled text (presets.py says why)
    assert (text.width, text.heads, text.layers, text.context_length) == (
        t["width"], t["heads"], t["layers"], t["context_length"])
    assert (text.vocab_size, t["vocab_size"]) == (49408, 32000)
    with pytest.raises(ValueError, match="no_causal_mask"):
        config_from_open_clip(CLIPA_IMAGE[name])


def test_clipa_b16_l16_are_their_plain_towers_with_clipa_flags():
    for name, base in (("CLIPA-B-16", "ViT-B-16"), ("CLIPA-L-16", "ViT-L-16")):
        cfg, plain = from_name(name), from_name(base)
        assert dataclasses.replace(cfg.vision, pool="tok", final_ln_after_pool=False, no_ln_pre=False) == plain.vision
        assert (cfg.vision.pool, cfg.vision.final_ln_after_pool, cfg.vision.no_ln_pre) == ("avg", True, True)
        assert dataclasses.replace(cfg.text, context_length=77) == plain.text


def test_aliases_and_overrides():
    expected = {"S/16": "ViT-S-16", "B/32": "ViT-B-32", "B/16": "ViT-B-16", "L/14": "ViT-L-14", "L/16": "ViT-L-16",
                "H/14": "ViT-H-14", "G/14": "ViT-bigG-14", "CLIPA-B/16": "CLIPA-B-16", "CLIPA-L/16": "CLIPA-L-16",
                "CLIPA-H/14": "CLIPA-H-14", "CLIPA-G/14": "CLIPA-bigG-14"}
    for alias, key in expected.items():
        assert ALIASES[alias] == key and from_name(alias) == PRESETS[key]
    cfg = from_name("G/14", **{"vision.image_size": 112, "text.context_length": 16})
    assert (cfg.vision.num_patches, cfg.text.context_length) == (64, 16)
    assert PRESETS["ViT-bigG-14"].vision.image_size == 224  # the table is not modified
    assert int(cfg.vision.width * cfg.vision.mlp_ratio) == 8192
    with pytest.raises(KeyError, match="valid presets"):
        from_name("B/17")
    with pytest.raises(KeyError, match="valid fields"):
        from_name("B/16", **{"vision.depth": 3})
    with pytest.raises(KeyError, match="no 'visoin' there"):  # a misspelt tower: named, not an AttributeError
        from_name("B/16", **{"visoin.image_size": 112})


def test_a_model_that_cannot_run_is_refused_when_built():
    """An image size off the patch grid or a width the heads do not divide used to build, then fail at the first
    forward with a reshape's message."""
    from clipfast.model import CLIP

    for over, what in (({"vision.image_size": 36}, "vision.image_size 36 is not a multiple of vision.patch_size 8"),
                       ({"vision.heads": 3}, "vision.width 128 is not divisible by vision.heads 3"),
                       ({"text.heads": 5}, "text.width 128 is not divisible by text.heads 5")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            CLIP(from_name("demo", **over), kernels="ref")
    CLIP(from_name("demo", **{"vision.image_size": 40, "vision.heads": 4}), kernels="ref")  # 5 x 5 patches: fine
    CLIP(from_name("demo-rn", **{"vision.image_size": 40}), kernels="ref")  # a ResNet takes any size


def _step(model, images, text, cu, max_len):
    model.zero_grad()
    img, txt, scale = model(images, text, cu, max_len)
    loss = clip_loss(img, txt, scale)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_same_loss_and_grads_and_recomputes():
    cfg = from_name("demo", **{"vision.layers": 2, "text.layers": 2})
    torch.manual_seed(0)
    plain = CLIP(cfg, kernels="ref").train()
    ckpt_cfg = dataclasses.replace(cfg, grad_checkpointing=True)
    ckpt = CLIP(ckpt_cfg, kernels="ref").train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for block in (*ckpt.visual.transformer.resblocks, *ckpt.transformer.resblocks):
        # counted in forward itself: torch runs no module hooks when checkpoint recomputes a block
        block.forward = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(block.forward)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    text, cu, max_len = pack_text([[49406, 5, 49407], [49406, 7, 8, 9, 49407], [49406, 49407], [49406, 3, 49407]])
    loss_a, grads_a = _step(plain, images, text, cu, max_len)
    loss_b, grads_b = _step(ckpt, images, text, cu, max_len)
    assert len(calls) == 2 * 4  # 4 blocks, each run again in backward: checkpointing is on
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=k)
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(images, text, cu, max_len)
    assert len(calls) == 4  # no recompute outside training
