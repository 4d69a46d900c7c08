"""Token reduction (CLIPA / FLIP): which image patches and which caption tokens a step keeps.

Image: `image_keep_indices` returns keep indices (B, K) for the mask strategies, drawn on the
training device, or None for "resize" (all patches of a lower-resolution image).
Text: `TextReducer` turns a caption into ids [SOT] + kept tokens + [EOT] of at most `length` tokens.
"""
from __future__ import annotations

import random

import torch

from clipfast.tokenizer import get_tokenizer

IMAGE_STRATEGIES = ("resize", "random")
TEXT_STRATEGIES = ("truncate",)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept for a mask ratio: at least 1, at most all."""
    return max(1, min(num_patches, round(num_patches * (1.0 - mask_ratio))))


def image_keep_indices(strategy: str, batch: int, grid: int, mask_ratio: float, *, device, generator=None):
    """Keep indices (B, K) int64 into the row-major grid×grid patch grid, or None (keep all)."""
    if strategy not in IMAGE_STRATEGIES:
        raise ValueError(f"unknown image reduction {strategy!r}; valid: {', '.join(IMAGE_STRATEGIES)}")
    n = grid * grid
    if strategy == "resize" or mask_ratio <= 0:
        return None
    k = num_kept(n, mask_ratio)
    # argsort of uniform noise: a uniformly random K-subset per image, drawn on the device (no host sync)
    noise = torch.rand(batch, n, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :k].sort(dim=1).values


class TextReducer:
    """caption -> ids: [SOT] + the kept BPE tokens + [EOT], at most `length` ids (EOT always last)."""

    def __init__(self, strategy: str = "truncate", length: int = 77, seed: int = 0):
        if strategy not in TEXT_STRATEGIES:
            raise ValueError(f"unknown text reduction {strategy!r}; valid: {', '.join(TEXT_STRATEGIES)}")
        if length < 2:
            raise ValueError(f"text length must be at least 2 (start and end tokens), got {length}")
        self.strategy, self.length = strategy, length
        self.tok = get_tokenizer()
        self.rng = random.Random(seed)

    def __call__(self, caption: str) -> list[int]:
        ids = self.tok.encode(caption)[: self.length - 2]
        return [self.tok.sot_token_id, *ids, self.tok.eot_token_id]
