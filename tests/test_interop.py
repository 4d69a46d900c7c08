"""clipfast.interop: open_clip parity per preset, state dict round trips, resize on load, the export CLI."""
import copy
import warnings

import pytest
import torch

from clipfast.data import pack_text
from clipfast.interop import from_open_clip, load_open_clip_state, open_clip_name, resize_state_dict, to_open_clip
from clipfast.model import CLIP, sincos_2d
from clipfast.presets import from_name

open_clip = pytest.importorskip("open_clip")

# clipfast preset -> (open_clip config of its image tower, of its text tower). The CLIPA-* text towers are CLIP's
# (presets.py says why), so their text side is the plain ViT config's at CLIPA's 32-token context.
PAIRS = {
    "ViT-S-16": ("ViT-S-16", "ViT-S-16"), "ViT-B-32": ("ViT-B-32", "ViT-B-32"), "ViT-B-16": ("ViT-B-16", "ViT-B-16"),
    "ViT-L-14": ("ViT-L-14", "ViT-L-14"), "ViT-L-16": ("ViT-L-16", "ViT-L-16"), "ViT-H-14": ("ViT-H-14", "ViT-H-14"),
    "ViT-bigG-14": ("ViT-bigG-14", "ViT-bigG-14"),
    "CLIPA-L-14": ("ViT-L-14-CLIPA", "ViT-L-14"), "CLIPA-H-14": ("ViT-H-14-CLIPA", "ViT-H-14"),
    "CLIPA-bigG-14": ("ViT-bigG-14-CLIPA", "ViT-bigG-14"),
    # open_clip has no B/16 or L/16 CLIPA config: the plain tower plus the flags of its ViT-H-14-CLIPA config
    "CLIPA-B-16": ("ViT-B-16+CLIPA", "ViT-B-16"), "CLIPA-L-16": ("ViT-L-16+CLIPA", "ViT-L-16"),
}
V_LAYERS, T_LAYERS = 2, 1  # reduced depth, full widths and heads


def open_clip_json(preset: str) -> dict:
    """open_clip's own config for `preset` (from its json files, not from clipfast.interop)."""
    vname, tname = PAIRS[preset]
    base = vname.split("+")[0]
    oc = copy.deepcopy(open_clip.get_model_config(base))
    if vname.endswith("+CLIPA"):
        flags = open_clip.get_model_config("ViT-H-14-CLIPA")["vision_cfg"]
        oc["vision_cfg"].update({k: flags[k] for k in ("no_ln_pre", "pool_type", "final_ln_after_pool")})
    oc["text_cfg"] = copy.deepcopy(open_clip.get_model_config(tname)["text_cfg"])
    if preset.startswith("CLIPA"):
        oc["text_cfg"]["context_length"] = open_clip.get_model_config("ViT-H-14-CLIPA")["text_cfg"]["context_length"]
    return oc


def rel_err(a, b) -> float:
    """max over samples of |a - b| / |b| (L2 norms of the feature vectors)."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def random_text(n: int, ctx: int, gen) -> torch.Tensor:
    """(n, ctx) open_clip-style token rows: start, random BPE ids, end-of-text (the highest id), zero padding."""
    rows = torch.zeros(n, ctx, dtype=torch.long)
    for i, length in enumerate(torch.linspace(2, ctx, n).long().tolist()):
        rows[i, 0] = 49406
        rows[i, 1:length - 1] = torch.randint(1, 49406, (length - 2,), generator=gen)
        rows[i, length - 1] = 49407
    return rows


def build_pair(preset: str, size: int, **extra):
    oc = open_clip_json(preset)
    oc["vision_cfg"].update(layers=V_LAYERS, image_size=size, **extra)
    oc["text_cfg"].update(layers=T_LAYERS)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = open_clip.create_model(PAIRS[preset][0].split("+")[0], vision_cfg=oc["vision_cfg"],
                                     text_cfg=oc["text_cfg"], embed_dim=oc["embed_dim"]).eval()
    over = {"vision.layers": V_LAYERS, "text.layers": T_LAYERS, "vision.image_size": size}
    if extra.get("pos_embed_type") == "sin_cos_2d":
        over["vision.pos_embed"] = "sincos"
    cfg = from_name(preset, **over)
    ours = CLIP(cfg, kernels="ref").eval()
    ours.load_state_dict(from_open_clip(ref.state_dict()))  # strict: same names and shapes
    return ref, ours


@pytest.mark.parametrize("preset,extra", [pytest.param(p, {}, id=p) for p in PAIRS] + [
    pytest.param("CLIPA-B-16", {"pos_embed_type": "sin_cos_2d"}, id="CLIPA-B-16-sincos")])
def test_open_clip_parity(preset, extra):
    size = 4 * from_name(preset).vision.patch_size  # a 4x4 patch grid
    ref, ours = build_pair(preset, size, **extra)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, size, size, generator=gen)
    tokens = random_text(4, ours.context_length, gen)
    text, cu, max_len = pack_text([row[: int(row.argmax()) + 1].tolist() for row in tokens])
    with torch.no_grad():
        errs = (rel_err(ours.encode_image(images), ref.encode_image(images)),
                rel_err(ours.encode_text(tokens), ref.encode_text(tokens)),
                rel_err(ours.encode_text_packed(text, cu, max_len), ref.encode_text(tokens)))
    print(f"\nparity {preset}{'+sincos' if extra else ''}: image {errs[0]:.2e} text padded {errs[1]:.2e} "
          f"text packed {errs[2]:.2e}")
    assert max(errs) < 1e-5, errs
    if extra:  # the fixed embedding itself: clipfast's sincos_2d vs open_clip's get_2d_sincos_pos_embed
        torch.testing.assert_close(ours.visual.positional_embedding, ref.visual.positional_embedding, rtol=0,
                                   atol=1e-6)
    # round trip clipfast -> open_clip -> clipfast, exact, from fresh clipfast weights
    torch.manual_seed(2)
    fresh = CLIP(ours.cfg, kernels="ref")
    sd = fresh.state_dict()
    ref.load_state_dict(to_open_clip(sd))  # strict
    back = from_open_clip(ref.state_dict())
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    fresh.load_state_dict(back)
    assert fresh.logit_scale.shape == (1,) and ref.logit_scale.shape == ()


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


def test_load_open_clip_state_resizes_for_fine_tuning():
    ref, _ = build_pair("ViT-B-16", 64)  # open_clip weights at 64 px, 77 text positions
    cfg = from_name("ViT-B-16", **{"vision.layers": V_LAYERS, "text.layers": T_LAYERS, "vision.image_size": 96,
                                   "text.context_length": 32})
    model = CLIP(cfg, kernels="ref")
    load_open_clip_state(model, ref.state_dict())
    sd = ref.state_dict()
    assert torch.equal(model.visual.positional_embedding[0], sd["visual.positional_embedding"][0])
    assert torch.equal(model.positional_embedding, sd["positional_embedding"][:32])
    assert torch.equal(model.visual.conv1.weight, sd["visual.conv1.weight"])
    with pytest.raises(ValueError, match="width"):  # a different architecture is refused with the reason
        load_open_clip_state(CLIP(_tiny(), kernels="ref"), sd)
    with pytest.raises(ValueError, match="quick_gelu"):  # same shapes, other activation: refused by name
        load_open_clip_state(model, sd, open_clip_model="ViT-B-16-quickgelu")
    with pytest.raises(ValueError, match="not the architecture"):
        load_open_clip_state(model, sd, open_clip_model="ViT-B-16")  # 12 layers, the model has 2


def test_export_cli_end_to_end(tmp_path):
    import dataclasses
    import subprocess
    import sys

    from clipfast.evaluate import load_model

    torch.manual_seed(0)
    model = CLIP(from_name("demo", **{"vision.layers": 2, "text.layers": 2}), kernels="ref").eval()
    ckpt = tmp_path / "model.pt"
    torch.save({"model_config": dataclasses.asdict(model.cfg), "state_dict": model.state_dict(),
                "train_config": {}, "step": 7}, ckpt)
    out = tmp_path / "open_clip.pt"
    run = subprocess.run([sys.executable, "-m", "clipfast.export", "--checkpoint", str(ckpt), "--out", str(out)],
                         capture_output=True, text=True, check=True)
    name, kwargs = open_clip_name(model.cfg)
    assert f"open_clip model name: {name}" in run.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = open_clip.create_model(name, **kwargs).eval()
    ref.load_state_dict(torch.load(out, weights_only=True))  # strict
    images, tokens = torch.randn(2, 3, 32, 32), random_text(3, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model.encode_image(images), ref.encode_image(images)) < 1e-5
        assert rel_err(model.encode_text(tokens), ref.encode_text(tokens)) < 1e-5
    # and back: open_clip weights -> a clipfast model.pt that clipfast.evaluate loads
    back = tmp_path / "back.pt"
    from clipfast.export import import_open_clip

    import_open_clip(name, str(out), str(back), **kwargs)
    again = load_model(str(back), kernels="ref")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    # the command lines read the kwargs export wrote beside the file (<out>.json): without them the demo's open_clip
    # config (ViT-B-16 with kwargs) did not match its weights ("width 128, the config 768")
    cli = tmp_path / "cli.pt"
    run = subprocess.run([sys.executable, "-m", "clipfast.export", "--from-open-clip", name, "--weights", str(out),
                          "--out", str(cli)], capture_output=True, text=True, check=True)
    assert "kwargs from" in run.stdout and kwargs
    direct = load_model(str(out), kernels="ref", open_clip_name=name)  # what evaluate --open-clip NAME loads
    for loaded in (load_model(str(cli), kernels="ref"), direct):
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("preset", ["CLIPA-H-14", "CLIPA-B-16", "ViT-L-14", "demo"])
def test_open_clip_name_builds_the_same_model(preset):
    over = {"vision.layers": 1, "text.layers": 1, "vision.image_size": 6 * from_name(preset).vision.patch_size,
            "text.context_length": 8}
    if preset == "CLIPA-B-16":
        over["vision.pos_embed"] = "sincos"
    cfg = from_name(preset, **over)
    name, kwargs = open_clip_name(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = open_clip.create_model(name, **kwargs)
    ours = CLIP(cfg, kernels="ref")
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    v = ref.visual
    assert (v.pool_type, v.final_ln_after_pool, isinstance(v.ln_pre, torch.nn.Identity)) == (
        cfg.vision.pool, cfg.vision.final_ln_after_pool, cfg.vision.no_ln_pre)
    assert v.positional_embedding.requires_grad == (cfg.vision.pos_embed == "learned")
    assert ref.context_length == 8 and ref.transformer.resblocks[0].attn.num_heads == cfg.text.heads
    assert v.transformer.resblocks[0].attn.num_heads == cfg.vision.heads


def test_open_clip_name_prefers_an_exact_config():
    assert open_clip_name(from_name("L/14", **{"vision.image_size": 336})) == ("ViT-L-14-336", {})
    assert open_clip_name(from_name("H/14", **{"vision.image_size": 112, "text.context_length": 8})) == (
        "ViT-H-14", {"force_image_size": 112, "force_context_length": 8})


def test_zero_shot_inputs_match_open_clips_pipeline(tmp_path):
    """The zero-shot path end to end against open_clip's own on one converted model: image features from the
    evaluation loader (DALI) against open_clip's eval transform + encode_image, and the text classifier
    (clipfast.evaluate.text_classifier) against open_clip's build_zero_shot_classifier with its tokenizer, on class
    names and templates with HTML entities. Before the evaluation resized as open_clip does, the image features were
    7.4e-3 apart here (1.4e-3 since); before the tokenizer unescaped as ftfy does, the classifier was 0.43 apart."""
    import io

    import numpy as np
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    pytest.importorskip("nvidia.dali")  # the GPU suite runs this file where DALI is not installed
    from PIL import Image

    from clipfast.data import DaliLoader, write_shard
    from clipfast.evaluate import text_classifier
    from clipfast.reduce import TextReducer

    ref, ours = build_pair("ViT-B-16", 64)
    rng = np.random.default_rng(5)
    sizes = [(91, 70), (129, 80), (68, 103), (64, 64), (140, 97), (95, 71), (77, 77), (100, 101)]
    samples = []
    for i, (w, h) in enumerate(sizes):
        im = Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        samples.append({"__key__": f"s{i}", "jpg": buf.getvalue(), "txt": "x"})
    write_shard(tmp_path / "val-0000.tar", samples)
    classnames = ["golden retriever", "tom &amp;amp;amp; jerry", "café au lait"]
    templates = ["a photo of a {}.", "itap of the {} &amp; friends."]
    tf = open_clip.transform.image_transform(64, is_train=False)
    with torch.no_grad():
        batch = next(iter(DaliLoader(str(tmp_path), len(sizes), 64, TextReducer("truncate", ours.context_length),
                                     train=False, threads=1)))
        img = ours.encode_image(batch["images"], normalize=True)
        img_ref = ref.encode_image(torch.stack([tf(Image.open(io.BytesIO(s["jpg"]))) for s in samples]),
                                   normalize=True)
        clf = text_classifier(ours, classnames, templates, "cpu")
        clf_ref = build_zero_shot_classifier(
            ref, tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=ours.context_length),
            classnames=classnames, templates=[lambda c, t=t: t.format(c) for t in templates], num_classes_per_batch=3,
            device="cpu", use_tqdm=False).T  # (classes, E)
    assert rel_err(img, img_ref) < 4e-3 and rel_err(clf, clf_ref) < 1e-5, (rel_err(img, img_ref), rel_err(clf, clf_ref))


def test_weights_of_another_model_are_named_as_such(tmp_path, capsys, caplog):
    """Weights that are not the named open_clip model's: the error says whose they are not, and what the .json that
    clipfast.export wrote beside them says they are (it was "visual.positional_embedding has width 128, the config
    768" in a traceback); a misspelt name suggests the near ones; the command lines say it in a line."""
    import dataclasses
    import logging

    from clipfast.evaluate import load_model
    from clipfast.export import main as export_main

    model = CLIP(from_name("demo", **{"vision.layers": 2, "text.layers": 2}), kernels="ref").eval()
    ckpt = tmp_path / "model.pt"
    torch.save({"model_config": dataclasses.asdict(model.cfg), "state_dict": model.state_dict(),
                "train_config": {}, "step": 7}, ckpt)
    out = tmp_path / "oc.pt"
    export_main(["--checkpoint", str(ckpt), "--out", str(out), "--no-check"])
    with caplog.at_level(logging.WARNING, logger="clipfast.interop"):
        with pytest.raises(ValueError, match=r"oc.pt are not ViT-B-32's \(visual.positional_embedding has width 128, "
                                             r"the config 768\); .*oc.pt.json says they are open_clip ViT-B-16"):
            load_model(str(out), kernels="ref", open_clip_name="ViT-B-32")
    assert "oc.pt.json says the weights are open_clip ViT-B-16, not ViT-B-32" in caplog.text
    with pytest.raises(ValueError, match="no model config 'ViT-B-61' .did you mean ViT-B-16"):
        load_model(str(out), kernels="ref", open_clip_name="ViT-B-61")
    for argv, why in ((["--from-open-clip", "ViT-B-32", "--weights", str(out), "--out", str(tmp_path / "x.pt")],
                       "are not ViT-B-32's"),
                      (["--checkpoint", str(ckpt), "--out", str(tmp_path / "nowhere" / "x.pt")],
                       "no folder"),
                      (["--checkpoint", str(ckpt), "--out", str(tmp_path / "y.pt"), "--image-size", "64"],
                       "are for --from-open-clip")):
        with pytest.raises(SystemExit) as e:
            export_main(argv)
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_pretrained_tags_trained_on_other_inputs_are_listed():
    """open_clip's pretrained configs that clipfast's CLIP does not reproduce (its OpenAI mean/std, shortest-side
    bicubic resize, GELU): a state dict does not say which tag it is, so evaluate --open-clip warns with these."""
    from clipfast.interop import pretrained_differences

    lines = pretrained_differences("ViT-L-14")
    assert "laion2b_s32b_b82k: mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5)" in lines and "openai: quick_gelu" in lines
    assert not any(x.startswith(("laion400m_e32", "datacomp_xl_s13b_b90k")) for x in lines)  # OpenAI's, GELU
    assert "dfn5b: resize_mode squash, quick_gelu" in pretrained_differences("ViT-H-14")
    assert pretrained_differences("ViT-L-16") == []
