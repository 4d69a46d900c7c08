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

import math

import torch
import torch.nn.functional as F

from clipfast.model import sincos_2d
from clipfast.presets import ModelConfig

VISUAL_POS = "visual.positional_embedding"
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
    sin-cos one (cfg.vision.pos_embed == "sincos") is recomputed for the new grid. Text: the first positions
    are kept unchanged, new ones copy the last trained position, a shorter context keeps the first rows.
    Patch size and widths must match cfg (only token counts change).
    """
    out = dict(sd)
    v, t = cfg.vision, cfg.text
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
