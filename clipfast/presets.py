"""Model sizes: one table keyed by short names, read by `from_name`.

Each ViT-* and RN* entry is the same architecture as open_clip 3.3.0's config of that name; the CLIPA-* entries
have CLIPA's image tower and CLIP's text tower (why: the comment above them). clipfast.interop.open_clip_name maps a
config to open_clip's name and create_model kwargs; `demo` and `demo-rn` are tiny models for the CPU demo and tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    """The image tower. kind "vit": a VisionTransformer (every field below but resnet_layers). kind "resnet":
    open_clip's ModifiedResNet (clipfast.resnet), which reads only image_size, width (the stem's; 64 in RN50, features
    are width * 32 wide), resnet_layers (Bottleneck blocks per stage, four stages) and heads (of the attention pool:
    width * 32 // 64 in open_clip's configs); the other fields keep their defaults and are ignored."""

    kind: str = "vit"  # "vit" or "resnet"
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pool: str = "tok"  # "tok" (class token) or "avg" (mean of patch tokens, CLIPA)
    final_ln_after_pool: bool = False  # CLIPA: the final norm is applied to the pooled vector
    no_ln_pre: bool = False  # CLIPA: no norm before the blocks
    pos_embed: str = "learned"  # "learned" or "sincos" (fixed 2-D sin-cos)
    resnet_layers: tuple[int, ...] = ()  # kind "resnet": blocks per stage, e.g. (3, 4, 6, 3) for RN50

    def __post_init__(self):
        self.resnet_layers = tuple(self.resnet_layers)  # a list from JSON compares equal to the preset's tuple

    @property
    def stride(self) -> int:
        """Pixels per grid cell: the patch size, or a ResNet's total downsampling (32)."""
        return 32 if self.kind == "resnet" else self.patch_size

    @property
    def grid(self) -> int:
        """Side of the patch grid; a ResNet's: its final feature map, the attention pool's positions (image_size //
        32, as open_clip sizes them). Patch masks index a ViT's grid; a ResNet takes none (clipfast.reduce)."""
        return self.image_size // self.stride

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class ModelConfig:
    name: str = "ViT-B-16"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    grad_checkpointing: bool = False


def _m(name, embed_dim, vision, text):
    return ModelConfig(name=name, embed_dim=embed_dim, vision=VisionConfig(**vision), text=TextConfig(**text))


def _vit(patch, width, layers, heads, mlp_ratio=4.0, **kw):
    return dict(image_size=224, patch_size=patch, width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio, **kw)


def _rn(layers, width, image_size=224):
    """open_clip's ResNet vision_cfg: heads = width * 32 // head_width (64)."""
    return dict(kind="resnet", image_size=image_size, resnet_layers=layers, width=width, heads=width * 32 // 64)


def _txt(width, layers, heads, context_length=77):
    return dict(context_length=context_length, vocab_size=49408, width=width, layers=layers, heads=heads)


# open_clip gives vision heads as head_width (default 64): heads = width // head_width.
_S16, _B32, _B16 = _vit(16, 384, 12, 6), _vit(32, 768, 12, 12), _vit(16, 768, 12, 12)
_L14, _L16 = _vit(14, 1024, 24, 16), _vit(16, 1024, 24, 16)
_H14 = _vit(14, 1280, 32, 16)  # head_width 80
_G14 = _vit(14, 1664, 48, 16, mlp_ratio=4.9231)  # head_width 104; MLP int(1664 * 4.9231) = 8192
_TS, _TB, _TL, _TH, _TG = _txt(384, 12, 6), _txt(512, 12, 8), _txt(768, 12, 12), _txt(1024, 24, 16), _txt(1280, 32, 20)
_T640 = _txt(640, 12, 10)

# CLIPA image tower (open_clip's *-CLIPA vision_cfg): mean of the patch tokens, the final norm after the pool, no
# norm before the blocks; the class token is still there (its position slot too) as in open_clip. Position
# embedding learned, as in those configs; `vision.pos_embed="sincos"` gives the fixed 2-D sin-cos variant
# (open_clip pos_embed_type="sin_cos_2d"), which a resolution change recomputes instead of resampling.
_CLIPA = dict(pool="avg", final_ln_after_pool=True, no_ln_pre=True)
# CLIPA text tower: same width / heads / layers as open_clip's *-CLIPA text_cfg and its 32-token context, but
# NOT its other details, which clipfast's packed text path cannot reproduce: open_clip's CLIPA text tower reads
# BERT WordPiece ids (vocab 32000), attends bidirectionally with no padding mask and pools the last *padded*
# position (pad tokens take part). Packed captions have no padding, and the data path tokenizes with CLIP BPE,
# so these presets keep CLIP's text tower: BPE vocab 49408, causal attention, pooling at the end-of-text token.
# open_clip loads them through clipfast.interop.open_clip_name (a vision_cfg override on the plain ViT name).

PRESETS: dict[str, ModelConfig] = {
    "demo": _m(
        "demo", 64,
        dict(image_size=32, patch_size=8, width=128, layers=4, heads=4),
        dict(context_length=16, width=128, layers=3, heads=4),
    ),
    "demo-rn": _m(  # demo's text tower; a ResNet of 1.3 M parameters (demo's ViT: 0.8 M); at 32 px a 1x1 final grid
        "demo-rn", 64,
        _rn((1, 1, 1, 1), 16, image_size=32),
        dict(context_length=16, width=128, layers=3, heads=4),
    ),
    # open_clip 3.3.0 model_configs/<name>.json, same architecture
    "ViT-S-16": _m("ViT-S-16", 384, _S16, _TS),
    "ViT-B-32": _m("ViT-B-32", 512, _B32, _TB),
    "ViT-B-16": _m("ViT-B-16", 512, _B16, _TB),
    "ViT-L-14": _m("ViT-L-14", 768, _L14, _TL),
    "ViT-L-16": _m("ViT-L-16", 768, _L16, _TL),
    "ViT-H-14": _m("ViT-H-14", 1024, _H14, _TH),
    "ViT-bigG-14": _m("ViT-bigG-14", 1280, _G14, _TG),
    "RN50": _m("RN50", 1024, _rn((3, 4, 6, 3), 64), _TB),
    "RN101": _m("RN101", 512, _rn((3, 4, 23, 3), 64), _TB),
    "RN50x4": _m("RN50x4", 640, _rn((4, 6, 10, 6), 80, 288), _T640),
    "RN50x16": _m("RN50x16", 768, _rn((6, 8, 18, 8), 96, 384), _TL),
    "RN50x64": _m("RN50x64", 1024, _rn((3, 15, 36, 10), 128, 448), _txt(1024, 12, 16)),
    # CLIPA (see above). open_clip has ViT-L-14-CLIPA, ViT-H-14-CLIPA, ViT-bigG-14-CLIPA (image towers equal to
    # these); it has no B/16 or L/16 CLIPA config: those are CLIPA's paper models on the ViT-B-16 / ViT-L-16 towers.
    "CLIPA-B-16": _m("CLIPA-B-16", 512, {**_B16, **_CLIPA}, {**_TB, "context_length": 32}),
    "CLIPA-L-16": _m("CLIPA-L-16", 768, {**_L16, **_CLIPA}, {**_TL, "context_length": 32}),
    "CLIPA-L-14": _m("CLIPA-L-14", 768, {**_L14, **_CLIPA}, {**_TL, "context_length": 32}),
    "CLIPA-H-14": _m("CLIPA-H-14", 1024, {**_H14, **_CLIPA}, {**_TH, "context_length": 32}),
    "CLIPA-bigG-14": _m("CLIPA-bigG-14", 1280, {**_G14, **_CLIPA}, {**_TG, "context_length": 32}),
}

ALIASES = {
    "S/16": "ViT-S-16", "B/32": "ViT-B-32", "B/16": "ViT-B-16", "L/14": "ViT-L-14", "L/16": "ViT-L-16",
    "H/14": "ViT-H-14", "G/14": "ViT-bigG-14", "bigG/14": "ViT-bigG-14",
    "CLIPA-B/16": "CLIPA-B-16", "CLIPA-L/16": "CLIPA-L-16", "CLIPA-L/14": "CLIPA-L-14",
    "CLIPA-H/14": "CLIPA-H-14", "CLIPA-G/14": "CLIPA-bigG-14", "CLIPA-bigG/14": "CLIPA-bigG-14",
}


def from_name(name: str, **overrides) -> ModelConfig:
    """A fresh ModelConfig for preset `name`; `overrides` set vision.*/text.* fields by dotted name.

    >>> from_name("ViT-B-16", **{"vision.image_size": 112, "text.context_length": 16})
    """
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}; "
                       f"aliases: {', '.join(sorted(ALIASES))}")
    cfg = dataclasses.replace(
        PRESETS[key],
        vision=dataclasses.replace(PRESETS[key].vision),
        text=dataclasses.replace(PRESETS[key].text),
    )
    for dotted, value in overrides.items():
        obj = cfg
        *path, last = dotted.split(".")
        for p in path:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                raise KeyError(f"unknown model field {dotted!r}: no {p!r} there (dotted names start with vision. "
                               f"or text.)")
            obj = getattr(obj, p)
        if not hasattr(obj, last):
            valid = [f.name for f in dataclasses.fields(obj)]
            raise KeyError(f"unknown model field {dotted!r}; valid fields here: {', '.join(valid)}")
        setattr(obj, last, value)
    return cfg
