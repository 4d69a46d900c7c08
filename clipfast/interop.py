"""open_clip interop: state dict conversion, model-name mapping, and resolution / text-length changes on load.

clipfast's CLIP uses open_clip's parameter names, so conversion is a key filter plus logit_scale's shape
(clipfast holds it as (1,) for DeepSpeed; its state_dict hooks already save open_clip's 0-dim layout).

- `resize_state_dict(sd, cfg)`: adapt position embeddings to cfg's image size and text length, e.g. to
  start a 224 px / 32 token fine-tune stage from a 96 px / 8 token pre-training stage.
- `to_open_clip(sd)`, `from_open_clip(sd)`: state dicts both ways.
- `open_clip_name(cfg)`: the open_clip model name and the `create_model` kwargs for a clipfast config.
- `load_open_clip_state(model, sd)`: open_clip weights (any image size / text length) into a clipfast model.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from clipfast.model import sincos_2d
from clipfast.presets import PRESETS, ModelConfig, TextConfig, VisionConfig

log = logging.getLogger("clipfast.interop")

VISUAL_POS = "visual.positional_embedding"
RESNET_POS = "visual.attnpool.positional_embedding"  # a ResNet's: the mean token, then its final grid
TEXT_POS = "positional_embedding"


def _resize_grid(pos: torch.Tensor, grid: int, extra: int = 1) -> torch.Tensor:
    """Bicubic resample of a (extra + g*g, D) learned embedding to (extra + grid*grid, D); class slot(s) kept."""
    tok, img = pos[:extra], pos[extra:]
    old = math.isqrt(img.shape[0])
    if old * old != img.shape[0]:
        raise ValueError(f"position embedding of {img.shape[0]} patch rows is not a square grid")
    if old == grid:
        return pos
    x = img.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    # antialias only acts when shrinking; open_clip's resize_pos_embed uses the same settings
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    img = x.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([tok, img], dim=0)


def _resize_text(pos: torch.Tensor, length: int) -> torch.Tensor:
    """(L, D) -> (length, D): the first min(L, length) rows unchanged; new rows copy the last trained row.

    Copying (rather than interpolating, as open_clip's resize_text_pos_embed does) keeps every position the
    short-caption stage trained bit-for-bit, so captions that fit the old length embed exactly as before; the
    copied rows start in-distribution and the causal mask already tells the new positions apart.
    """
    n = pos.shape[0]
    if length <= n:
        return pos[:length].clone()
    return torch.cat([pos, pos[-1:].expand(length - n, -1)], dim=0)


def resize_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """A copy of clipfast (or open_clip) state dict `sd` whose position embeddings fit `cfg`.

    Image: a learned embedding is resampled bicubically on the patch grid, the class slot kept as is; a
    sin-cos one (cfg.vision.pos_embed == "sincos") is recomputed for the new grid. A ResNet's attention pool
    embedding is resampled the same way over its final grid (image_size // 32), the mean-token slot kept (open_clip's
    resize_pos_embed leaves ResNets alone). Text: the first positions are kept unchanged, new ones copy the last
    trained position, a shorter context keeps the first rows. Patch size and widths must match cfg (only token
    counts change).
    """
    out = dict(sd)
    v, t = cfg.vision, cfg.text
    tower = RESNET_POS if v.kind == "resnet" else VISUAL_POS
    other = VISUAL_POS if v.kind == "resnet" else RESNET_POS
    if other in sd:
        raise ValueError(f"the state dict has {other} but {cfg.name}'s image tower is a {v.kind} (it has {tower})")
    if RESNET_POS in sd:
        pos = sd[RESNET_POS]
        if pos.shape[-1] != v.width * 32:
            raise ValueError(f"{RESNET_POS} has width {pos.shape[-1]}, the config's ResNet {v.width * 32}")
        if pos.shape[0] != v.num_patches + 1:
            out[RESNET_POS] = _resize_grid(pos, v.grid)
    if VISUAL_POS in sd:
        pos = sd[VISUAL_POS]
        if pos.shape[-1] != v.width:
            raise ValueError(f"{VISUAL_POS} has width {pos.shape[-1]}, the config {v.width}")
        if pos.shape[0] != v.num_patches + 1:
            conv = sd.get("visual.conv1.weight")
            if conv is not None and conv.shape[-1] != v.patch_size:
                raise ValueError(f"patch size {conv.shape[-1]} -> {v.patch_size} cannot be resized on load")
            if v.pos_embed == "sincos":
                out[VISUAL_POS] = sincos_2d(v.width, v.grid).to(pos.dtype)
            else:
                out[VISUAL_POS] = _resize_grid(pos, v.grid)
    if TEXT_POS in sd:
        pos = sd[TEXT_POS]
        if pos.shape[-1] != t.width:
            raise ValueError(f"{TEXT_POS} has width {pos.shape[-1]}, the config {t.width}")
        if pos.shape[0] != t.context_length:
            out[TEXT_POS] = _resize_text(pos, t.context_length)
    return out


# ---- state dicts ----------------------------------------------------------------------------------------------

def to_open_clip(sd: dict) -> dict:
    """clipfast state dict -> open_clip's `CLIP.load_state_dict` layout (same names; logit_scale 0-dim)."""
    out = {k.removeprefix("module."): v for k, v in sd.items()}
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def from_open_clip(sd: dict) -> dict:
    """open_clip state dict (a `CLIP`, also as saved by its trainer: `{"state_dict": ...}`, "module." keys) ->
    clipfast's layout. Raises for towers clipfast does not model (CustomTextCLIP `text.*`, SigLIP's logit_bias)."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    out = {k.removeprefix("module."): v for k, v in sd.items()}
    out.pop("attn_mask", None)  # a buffer in old open_clip / OpenAI files, rebuilt on the fly here
    foreign = sorted(k for k in out if k.startswith(("text.", "logit_bias", "visual.trunk", "visual.attn_pool")))
    if foreign:
        raise ValueError(f"open_clip weights with parts clipfast's CLIP does not have: {', '.join(foreign[:5])}")
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def pretrained_differences(name: str) -> list[str]:
    """open_clip's pretrained weights for model `name` that were trained with other inputs or activation than
    clipfast's CLIP computes (OpenAI's mean/std, the shorter side resized bicubic, GELU): one line per such tag,
    saying what differs. A state dict does not carry these, so such weights load and score wrongly without a word."""
    import open_clip

    from clipfast.model import IMAGE_MEAN, IMAGE_STD

    lines = []
    for tag in open_clip.list_pretrained_tags_by_model(name):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        diff = []
        mean, std = cfg.get("mean"), cfg.get("std")
        if (mean and not _close(mean, IMAGE_MEAN)) or (std and not _close(std, IMAGE_STD)):
            diff.append(f"mean {tuple(round(x, 4) for x in mean or IMAGE_MEAN)} std "
                        f"{tuple(round(x, 4) for x in std or IMAGE_STD)}")
        if cfg.get("resize_mode") not in (None, "shortest"):
            diff.append(f"resize_mode {cfg['resize_mode']}")
        if cfg.get("interpolation") not in (None, "bicubic"):
            diff.append(f"interpolation {cfg['interpolation']}")
        if cfg.get("quick_gelu"):
            diff.append("quick_gelu")
        if diff:
            lines.append(f"{tag}: {', '.join(diff)}")
    return lines


def _close(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))


def export_info(weights) -> tuple[Path | None, dict]:
    """(<weights>.json, what clipfast.export wrote there: model_name, kwargs, ...), or (None, {}) where there is none
    (or `weights` is a state dict, not a file)."""
    if not isinstance(weights, (str, Path)) or not Path(str(weights) + ".json").is_file():
        return None, {}
    side = Path(str(weights) + ".json")
    return side, json.loads(side.read_text())


def export_kwargs(weights, name: str) -> dict:
    """The open_clip.create_model kwargs that clipfast.export wrote beside `weights` (<weights>.json) for model
    `name`; {} where there is no such file or it names another model."""
    side, info = export_info(weights)
    if not info:
        return {}
    if info.get("model_name") != name:
        log.warning("%s says the weights are open_clip %s, not %s: its create_model kwargs are not used", side,
                    info.get("model_name"), name)
        return {}
    return dict(info.get("kwargs") or {})


def load_open_clip_state(model, sd_or_path, open_clip_model: str | None = None, strict: bool = True,
                         **create_kwargs):
    """Load open_clip weights (a state dict or a file) into clipfast `model`, e.g. to fine-tune them.

    Position embeddings are resized to the model's image size and text length (resize_state_dict); every other
    shape must match. A state dict does not say which activation or text tower it was trained with, so give the
    open_clip model name it came from where you can: it is checked against the model (a *-quickgelu or CLIPA
    model would load without error and compute something else).
    """
    if open_clip_model is not None:
        src = config_from_open_clip(open_clip_model, **create_kwargs)  # raises for options clipfast lacks
        mine = model.cfg
        same_size = (dataclasses.replace(src.vision, image_size=mine.vision.image_size),
                     dataclasses.replace(src.text, context_length=mine.text.context_length), src.embed_dim)
        if same_size != (mine.vision, mine.text, mine.embed_dim):
            raise ValueError(f"open_clip {open_clip_model} is not the architecture of clipfast {mine.name}: {src}")
    sd = sd_or_path
    where = "" if isinstance(sd, dict) else f" in {sd_or_path}"
    if not isinstance(sd, dict):
        sd = torch.load(sd_or_path, map_location="cpu", weights_only=True)
    target = open_clip_model or model.cfg.name
    side, info = export_info(sd_or_path)
    said = info.get("model_name")
    hint = f"; {side} says they are open_clip {said}" if said and said != target else ""
    try:
        sd = resize_state_dict(from_open_clip(sd), model.cfg)
    except ValueError as e:
        raise ValueError(f"the open_clip weights{where} are not {target}'s ({e}){hint}") from None
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"the open_clip weights{where} do not fit {target}: " + "; ".join(bad[:5]) + hint)
    return model.load_state_dict(sd, strict=strict)


# ---- model configs and names ----------------------------------------------------------------------------------

# clipfast presets without an open_clip config of their own: the open_clip name to build on (its tokenizer is
# the one these presets use; the tower that differs comes as a *_cfg override).
_BASE = {"CLIPA-B-16": "ViT-B-16", "CLIPA-L-16": "ViT-L-16", "CLIPA-L-14": "ViT-L-14", "CLIPA-H-14": "ViT-H-14",
         "CLIPA-bigG-14": "ViT-bigG-14", "demo": "ViT-B-16", "demo-rn": "RN50"}
_POS = {"learned": "learnable", "sincos": "sin_cos_2d"}
# the open_clip fields clipfast models, with open_clip's defaults (CLIPVisionCfg / CLIPTextCfg)
_V_DEF = dict(image_size=224, layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, pool_type="tok",
              final_ln_after_pool=False, no_ln_pre=False, pos_embed_type="learnable")
_V_CORE = ("image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size")
_T_DEF = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0)
# open_clip options clipfast's CLIP does not implement: each must stay at this value
_V_FIXED = dict(ls_init_value=None, attentional_pool=False, act_kwargs=None, norm_kwargs=None, qk_norm=False,
                scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False, scale_attn=False,
                scale_fc=False, timm_model_name=None)
_T_FIXED = dict(hf_tokenizer_name=None, tokenizer_mode=None, tokenizer_kwargs=None, ls_init_value=None,
                embed_cls=False, no_causal_mask=False, final_ln_after_pool=False, pool_type="argmax",
                proj_bias=False, proj_type="linear", act_kwargs=None, norm_kwargs=None, qk_norm=False,
                scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False, scale_attn=False,
                scale_fc=False, hf_model_name=None)
_TOP_FIXED = dict(quick_gelu=False, init_logit_bias=None, custom_text=False, nonscalar_logit_scale=False)


def open_clip_cfg(cfg: ModelConfig) -> dict:
    """cfg as an open_clip model config (`model_configs/*.json` terms; CLIPA flags only where set; a ResNet as
    open_clip's RN* configs: layers a list of four, patch_size None, heads as head_width over width * 32)."""
    v, t = cfg.vision, cfg.text
    tower_width = v.width * 32 if v.kind == "resnet" else v.width
    if tower_width % v.heads:
        raise ValueError(f"vision width {tower_width} is not a multiple of its {v.heads} heads")
    if v.kind == "resnet":
        vision = dict(image_size=v.image_size, layers=list(v.resnet_layers), width=v.width,
                      head_width=tower_width // v.heads, patch_size=None)
    else:
        vision = dict(image_size=v.image_size, layers=v.layers, width=v.width, head_width=v.width // v.heads,
                      mlp_ratio=v.mlp_ratio, patch_size=v.patch_size, pool_type=v.pool,
                      final_ln_after_pool=v.final_ln_after_pool, no_ln_pre=v.no_ln_pre,
                      pos_embed_type=_POS[v.pos_embed])
        vision = {k: x for k, x in vision.items() if k in _V_CORE or x != _V_DEF[k]}
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                layers=t.layers, mlp_ratio=t.mlp_ratio)
    return dict(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)


def _unsupported(oc: dict) -> list[str]:
    v, t = oc.get("vision_cfg", {}), oc.get("text_cfg", {})
    bad = [f"{k}={oc[k]!r}" for k, x in _TOP_FIXED.items() if oc.get(k, x) != x]
    bad += [f"vision_cfg.{k}={v[k]!r}" for k, x in _V_FIXED.items() if v.get(k, x) != x]
    bad += [f"text_cfg.{k}={t[k]!r}" for k, x in _T_FIXED.items() if t.get(k, x) != x]
    bad += [f"{tower}.block_type={c['block_type']!r}" for tower, c in (("vision_cfg", v), ("text_cfg", t))
            if c.get("block_type") not in (None, "default")]
    if v.get("pool_type", "tok") not in ("tok", "avg"):
        bad.append(f"vision_cfg.pool_type={v['pool_type']!r}")
    if v.get("pos_embed_type", "learnable") not in _POS.values():
        bad.append(f"vision_cfg.pos_embed_type={v['pos_embed_type']!r}")
    layers = v.get("layers", 12)
    if not isinstance(layers, int) and not (isinstance(layers, (tuple, list)) and len(layers) == 4):
        bad.append(f"vision_cfg.layers={layers!r} (a ResNet has four stages)")
    size = v.get("image_size", 224)
    if isinstance(size, (tuple, list)) and size[0] != size[1]:
        bad.append(f"vision_cfg.image_size={size!r} (clipfast models square images)")
    return bad


def _normalized(oc: dict) -> tuple[int, dict, dict]:
    """(embed_dim, vision, text) of an open_clip model config over the fields clipfast models, defaults filled."""
    v, t = {**_V_DEF, **oc["vision_cfg"]}, {**_T_DEF, **oc["text_cfg"]}
    if isinstance(v["image_size"], (tuple, list)):
        v["image_size"] = v["image_size"][0]
    return oc["embed_dim"], {k: v[k] for k in _V_DEF}, {k: t[k] for k in _T_DEF}


def _apply_kwargs(oc: dict, kwargs: dict) -> dict:
    """open_clip.create_model's overrides on a model config: force_image_size, force_context_length, then the
    remaining kwargs replace top-level keys (vision_cfg=..., text_cfg=..., embed_dim=...)."""
    oc = copy.deepcopy(oc)
    kwargs = dict(kwargs)
    if (size := kwargs.pop("force_image_size", None)) is not None:
        oc["vision_cfg"]["image_size"] = size
    if (length := kwargs.pop("force_context_length", None)) is not None:
        oc["text_cfg"]["context_length"] = length
    oc.update(copy.deepcopy(kwargs))
    return oc


def config_from_open_clip(name: str, **create_kwargs) -> ModelConfig:
    """The clipfast ModelConfig of `open_clip.create_model(name, **create_kwargs)`; raises for open_clip options
    clipfast does not implement (quick_gelu, CLIPA's BERT text tower, timm / HF towers, layer scale, ...)."""
    import open_clip

    base = open_clip.get_model_config(name)
    if base is None:
        near = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ValueError(f"open_clip has no model config {name!r}" + (f" (did you mean {', '.join(near)}?)" if near
                                                                        else " (open_clip.list_models() names them)"))
    oc = _apply_kwargs(base, create_kwargs)
    bad = _unsupported(oc)
    if bad:
        raise ValueError(f"open_clip model {name!r} uses options clipfast's CLIP does not have: {', '.join(bad)}")
    embed_dim, v, t = _normalized(oc)
    if isinstance(v["layers"], (tuple, list)):  # open_clip builds a ModifiedResNet; its other ViT fields are unused
        vision = VisionConfig(kind="resnet", image_size=v["image_size"], width=v["width"],
                              resnet_layers=tuple(v["layers"]), heads=v["width"] * 32 // v["head_width"])
    else:
        vision = VisionConfig(
            image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"], layers=v["layers"],
            heads=v["width"] // v["head_width"], mlp_ratio=v["mlp_ratio"], pool=v["pool_type"],
            final_ln_after_pool=v["final_ln_after_pool"], no_ln_pre=v["no_ln_pre"],
            pos_embed={b: a for a, b in _POS.items()}[v["pos_embed_type"]],
        )
    cfg = ModelConfig(name=name, embed_dim=embed_dim, vision=vision, text=TextConfig(**t))
    for key, preset in PRESETS.items():  # named after the clipfast preset it is, if any
        if (preset.embed_dim, preset.vision, preset.text) == (cfg.embed_dim, cfg.vision, cfg.text):
            cfg.name = key
    return cfg


def _overrides(name: str, want: dict) -> dict | None:
    """create_model kwargs that turn open_clip's `name` into `want`; None if `name` has options clipfast lacks."""
    import open_clip

    have = open_clip.get_model_config(name)
    if have is None or _unsupported(have):
        return None
    (he, hv, ht), (we, wv, wt) = _normalized(have), _normalized(want)
    kwargs = {}
    if he != we:
        kwargs["embed_dim"] = we
    if hv != wv:
        if {**hv, "image_size": wv["image_size"]} == wv:
            kwargs["force_image_size"] = wv["image_size"]
        else:
            kwargs["vision_cfg"] = want["vision_cfg"]
    if ht != wt:
        if {**ht, "context_length": wt["context_length"]} == wt:
            kwargs["force_context_length"] = wt["context_length"]
        else:
            kwargs["text_cfg"] = want["text_cfg"]
    return kwargs


def open_clip_name(cfg: ModelConfig) -> tuple[str, dict]:
    """(name, kwargs) such that `open_clip.create_model(name, **kwargs)` is cfg's architecture.

    Prefers an open_clip config that needs no kwargs (ViT-L-14 at 336 px -> "ViT-L-14-336"), else the preset's
    own open_clip name (or its base, for CLIPA-* and demo) with force_image_size / force_context_length, and a
    whole vision_cfg / text_cfg only where a tower differs in more than its token count. The same name gives
    the tokenizer: `open_clip.get_tokenizer(name, context_length=cfg.text.context_length)`.
    """
    import open_clip

    want = open_clip_cfg(cfg)
    base = _BASE.get(cfg.name, cfg.name)
    if open_clip.get_model_config(base) is None:
        base = "RN50" if cfg.vision.kind == "resnet" else "ViT-B-16"
    candidates = [base] + sorted(n for n in open_clip.list_models() if n.startswith(base + "-"))
    found = [(n, kw) for n in candidates if (kw := _overrides(n, want)) is not None]
    name, kwargs = min(found, key=lambda nk: len(nk[1]))  # min keeps the first (the base) on ties
    back = config_from_open_clip(name, **kwargs)
    if (back.embed_dim, back.vision, back.text) != (cfg.embed_dim, cfg.vision, cfg.text):
        raise AssertionError(f"open_clip_name({cfg.name}) = {name} {kwargs} does not rebuild the same config")
    return name, kwargs
