"""FLOPs per sample, the basis of MFU. One FLOP = one multiply or one add (2 per multiply-accumulate).

Counted: every matmul (patch embedding, q/k/v/out projections, MLP, attention scores and values, the
final projections), as in open_clip's published profile (ViT-B-16 at 224 px: 35.1 image + 6.0 text
forward GFLOPs). Norms, softmax, GELU and the loss are left out (< 1%). Attention is counted full
(N² per head), not halved for the causal text mask, as the profile does. Training = 3 × forward
(backward ≈ 2 × forward); activation checkpointing adds one forward that is not counted (MFU counts
useful work only).

Checked in tests/test_flops.py: ViT-B-16 35.13 + 5.96 and ViT-L-14 162.03 + 13.30 GFLOPs against the profile's
35.1 + 6.0 and 162.0 + 13.3, and equal to torch's FlopCounterMode on clipfast's and open_clip's models.
"""
from __future__ import annotations

from clipfast.presets import ModelConfig, from_name


def _tower(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    hidden = int(width * mlp_ratio)
    per_layer = 2 * tokens * (4 * width * width + 2 * width * hidden) + 2 * 2 * tokens * tokens * width
    return layers * per_layer


def image_flops(cfg: ModelConfig, image_tokens: int | None = None) -> float:
    """Forward FLOPs of the image tower for `image_tokens` kept patches (default: all at cfg's size)."""
    v = cfg.vision
    n = v.num_patches if image_tokens is None else image_tokens
    patch = 2 * n * 3 * v.patch_size**2 * v.width
    return patch + _tower(n + 1, v.width, v.layers, v.mlp_ratio) + 2 * v.width * cfg.embed_dim


def text_flops(cfg: ModelConfig, text_tokens: int | None = None) -> float:
    t = cfg.text
    n = t.context_length if text_tokens is None else text_tokens
    return _tower(n, t.width, t.layers, t.mlp_ratio) + 2 * t.width * cfg.embed_dim


def flops_per_sample(preset: str | ModelConfig, image_tokens: int | None = None, text_tokens: int | None = None,
                     training: bool = False) -> float:
    """Forward (or training, 3x) FLOPs of one image-text pair with the given token counts."""
    cfg = from_name(preset) if isinstance(preset, str) else preset
    fwd = image_flops(cfg, image_tokens) + text_flops(cfg, text_tokens)
    return 3 * fwd if training else fwd


def ssl_flops(cfg: ModelConfig, hidden: int, dim: int, views: int = 2) -> float:
    """Forward FLOPs per sample of SLIP's extra work: `views` passes of the image tower at all its patches, without
    the projection, each through the SSL head (clipfast.slip)."""
    v = cfg.vision
    tower = image_flops(cfg) - 2 * v.width * cfg.embed_dim
    head = 2 * (v.width * hidden + hidden * hidden + hidden * dim)
    return views * (tower + head)
