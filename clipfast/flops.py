"""FLOPs per sample, the basis of MFU. One FLOP = one multiply or one add (2 per multiply-accumulate).

Counted: every matmul (patch embedding, q/k/v/out projections, MLP, attention scores and values, the
final projections), as in open_clip's published profile (ViT-B-16 at 224 px: 35.1 image + 6.0 text
forward GFLOPs). Norms, softmax, GELU and the loss are left out (< 1%). Attention is counted full
(N² per head), not halved for the causal text mask, as the profile does. Training = 3 × forward
(backward ≈ 2 × forward); activation checkpointing adds one forward that is not counted (MFU counts
useful work only).

A ResNet image tower (clipfast.resnet): every convolution (2 x in x out x k² per output position, the 3x3 of a
stride-2 block before its average pool), the attention pool's projections and attention, its c_proj (the
projection to embed_dim); batch norms, ReLUs and average pools left out. clipfast's pool computes only the mean
token's query; `resnet_image_flops(cfg, queries=N)` counts open_clip's, which computes all N positions' queries and
outputs (RN50 at 224 px: 11.59 vs 12.22 GFLOPs).

Checked in tests/test_flops.py: ViT-B-16 35.13 + 5.96 and ViT-L-14 162.03 + 13.30 GFLOPs against the profile's
35.1 + 6.0 and 162.0 + 13.3, and equal to torch's FlopCounterMode on clipfast's and open_clip's models;
tests/test_resnet.py: RN50, RN101, RN50x4 (open_clip's count) against the profile's 12.22, 19.54, 42.56.
"""
from __future__ import annotations

from clipfast.presets import ModelConfig, from_name


def _tower(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    hidden = int(width * mlp_ratio)
    per_layer = 2 * tokens * (4 * width * width + 2 * width * hidden) + 2 * 2 * tokens * tokens * width
    return layers * per_layer


def resnet_image_flops(cfg: ModelConfig, queries: int = 1) -> float:
    """Forward FLOPs of a ResNet image tower at cfg's image size, its attention pool computing `queries` queries
    (clipfast: 1, the mean token's; open_clip: all grid² + 1 positions)."""
    v = cfg.vision
    w, s = v.width, (v.image_size + 1) // 2  # the stem's stride-2 convolution (padding 1)
    fl = 2 * 9 * s * s * (3 * w // 2 + (w // 2) ** 2 + (w // 2) * w)  # the stem's three 3x3 convolutions
    s //= 2
    inplanes = w
    for i, blocks in enumerate(v.resnet_layers):
        p = w * 2**i
        for b in range(blocks):
            cin = inplanes if b == 0 else 4 * p
            fl += 2 * s * s * (cin * p + 9 * p * p)  # 1x1 and 3x3, at the input's resolution
            if b == 0 and i > 0:
                s //= 2  # the average pool after the 3x3
            fl += 2 * s * s * 4 * p * p  # 1x1 up to 4p channels
            if b == 0:
                fl += 2 * s * s * cin * 4 * p  # the shortcut's 1x1 (after its average pool)
        inplanes = 4 * p
    d, n = 32 * w, s * s + 1
    return fl + 2 * 2 * n * d * d + 2 * queries * d * d + 2 * 2 * queries * n * d + 2 * queries * d * cfg.embed_dim


def image_flops(cfg: ModelConfig, image_tokens: int | None = None) -> float:
    """Forward FLOPs of the image tower for `image_tokens` kept patches (default: all at cfg's size)."""
    v = cfg.vision
    if v.kind == "resnet":
        if image_tokens not in (None, v.num_patches):
            raise ValueError(f"{cfg.name} has a ResNet image tower: it keeps all {v.num_patches} grid positions "
                             f"(no patch masks), not {image_tokens}")
        return resnet_image_flops(cfg)
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
    a ViT's projection, each through the SSL head (clipfast.slip; CLIP.ssl_features)."""
    v = cfg.vision
    if v.kind == "resnet":  # the head reads the attention pool's projected output
        tower, width = image_flops(cfg), cfg.embed_dim
    else:
        tower, width = image_flops(cfg) - 2 * v.width * cfg.embed_dim, v.width
    head = 2 * (width * hidden + hidden * hidden + hidden * dim)
    return views * (tower + head)
