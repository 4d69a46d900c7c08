"""Model sizes: one table keyed by short names, read by `from_name`.

Each entry is the same architecture as open_clip's config of that name (see clipfast.interop for the
name mapping); `demo` is a tiny model for the CPU demo and tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
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

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

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


PRESETS: dict[str, ModelConfig] = {
    "demo": _m(
        "demo", 64,
        dict(image_size=32, patch_size=8, width=128, layers=4, heads=4),
        dict(context_length=16, width=128, layers=3, heads=4),
    ),
    "ViT-B-16": _m(
        "ViT-B-16", 512,
        dict(image_size=224, patch_size=16, width=768, layers=12, heads=12),
        dict(context_length=77, width=512, layers=12, heads=8),
    ),
}

ALIASES = {"B/16": "ViT-B-16"}


def from_name(name: str, **overrides) -> ModelConfig:
    """A fresh ModelConfig for preset `name`; `overrides` set vision.*/text.* fields by dotted name.

    >>> from_name("ViT-B-16", **{"vision.image_size": 112, "text.context_length": 16})
    """
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    cfg = dataclasses.replace(
        PRESETS[key],
        vision=dataclasses.replace(PRESETS[key].vision),
        text=dataclasses.replace(PRESETS[key].text),
    )
    for dotted, value in overrides.items():
        obj = cfg
        *path, last = dotted.split(".")
        for p in path:
            obj = getattr(obj, p)
        if not hasattr(obj, last):
            valid = [f.name for f in dataclasses.fields(obj)]
            raise KeyError(f"unknown model field {dotted!r}; valid fields here: {', '.join(valid)}")
        setattr(obj, last, value)
    return cfg
