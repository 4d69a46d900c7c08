"""Token reduction (CLIPA / FLIP): which image patches and which caption tokens a step keeps.

Image — `image_keep_indices(strategy, B, G, mask_ratio)` on a G×G patch grid of N = G² patches:

| strategy | keeps | K (patches kept) |
|---|---|---|
| `resize` | all patches of a lower-resolution image (the loader crops straight to `image_size`) | N; returns None |
| `random` | K patches uniformly at random per image (FLIP / MAE) | `num_kept(N, r)` |
| `grid`   | one patch in each g×g cell, the same random offset (dy, dx) in every cell of an image | ceil(G/g)² |
| `block`  | one h×w rectangle at a random place per image | h·w |

- `num_kept(N, r) = clamp(round(N·(1−r)), 1, N)` (Python's round: half to even) is the target for all masks.
- grid: g ∈ 1..G is the cell side whose count ceil(G/g)² is nearest the target (ties: the smaller g), so
  grid realises only keep shares near 1/g² (r = 0.75 on a 14×14 grid: g = 2, K = 49). Where g does not
  divide G the last row/column of cells is partial; its patch is clamped into it, so every cell still
  holds exactly one patch and K never varies between images.
- block: a near-square h×w with h = round(√target), w = round(target/h), both clamped to [1, G]
  (r = 0.75, G = 14: 7×7 = 49; r = 0.5: 10×10 = 100 for a target of 98); the top-left corner is
  uniform over the (G−h+1)·(G−w+1) places.
- Edges: r = 0 or K = N gives None (keep all: the unmasked fast path); K = 1 keeps one patch (grid:
  g = G, one cell; block: 1×1). r outside [0, 1] is an error; "resize" with r > 0 is an error.
- Indices are int64 (B, K), sorted ascending, unique, drawn on `device` from `generator`: no host
  random numbers and no host-device sync (K is a host integer known from the arguments alone).
- Masks are for ViTs: a ResNet image tower (vision.kind "resnet") takes only `resize`, r = 0 (`mask_grid`).

Text — `TextReducer(strategy, length)` maps a caption to [SOT] + kept + [EOT], at most `length` ids;
the budget is `length − 2` BPE tokens and, for every strategy, min(#tokens, budget) tokens are kept:
`truncate` the first ones; `random` a uniform random subset in caption order; `block` one random
contiguous span; `syntax` (CLIPA) words by class — nouns, then adjectives, then verbs, then the rest,
caption order within a class — a word's BPE tokens kept together: a word that does not fit whole is
passed over for later words that do, and the budget left at the end is filled with the first tokens of
the highest-ranked word passed over. The kept tokens are emitted in caption order. Tags: clipfast.pos.
"""
from __future__ import annotations

import copy
import hashlib
import math
import random
from functools import lru_cache

import torch

from clipfast.tokenizer import get_tokenizer

IMAGE_STRATEGIES = ("resize", "random", "grid", "block")
TEXT_STRATEGIES = ("truncate", "random", "block", "syntax")


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Target patches kept for a mask ratio: round(N·(1−r)), at least 1, at most N."""
    return max(1, min(num_patches, round(num_patches * (1.0 - mask_ratio))))


@lru_cache(maxsize=256)
def grid_cell(grid: int, mask_ratio: float) -> int:
    """Cell side g of grid masking: ceil(G/g)² nearest num_kept(G², r); ties go to the smaller g."""
    target = num_kept(grid * grid, mask_ratio)
    return min(range(1, grid + 1), key=lambda g: (abs(math.ceil(grid / g) ** 2 - target), g))


def block_shape(grid: int, mask_ratio: float) -> tuple[int, int]:
    """(h, w) of block masking: h = round(√K), w = round(K/h), each clamped to [1, G], K = num_kept(G², r)."""
    target = num_kept(grid * grid, mask_ratio)
    h = max(1, min(grid, round(math.sqrt(target))))
    return h, max(1, min(grid, round(target / h)))


def check(image_reduction: str, mask_ratio: float, text_reduction: str = "truncate") -> None:
    """Raise ValueError for an unknown strategy or a mask ratio the image strategy cannot take."""
    _check(image_reduction, mask_ratio)
    if text_reduction not in TEXT_STRATEGIES:
        raise ValueError(f"unknown text reduction {text_reduction!r}; valid: {', '.join(TEXT_STRATEGIES)}")


def _check(strategy: str, mask_ratio: float) -> None:
    if strategy not in IMAGE_STRATEGIES:
        raise ValueError(f"unknown image reduction {strategy!r}; valid: {', '.join(IMAGE_STRATEGIES)}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if strategy == "resize" and mask_ratio > 0:
        raise ValueError("image_reduction='resize' drops no patches: set mask_ratio=0 or pick random/grid/block")


def mask_grid(model_name: str, vision, strategy: str, mask_ratio: float) -> int:
    """vision.grid, the grid `image_keep_indices` masks, once the strategy is checked against the image tower
    (a presets.VisionConfig): a ResNet takes no patch masks, only a lower resolution."""
    _check(strategy, mask_ratio)
    if vision.kind == "resnet" and (strategy != "resize" or mask_ratio > 0):
        raise ValueError(f"model {model_name} has a ResNet image tower: image_reduction={strategy!r}, "
                         f"mask_ratio={mask_ratio} asks for a patch mask, which only ViTs take; a ResNet reduces "
                         f"image tokens only by resolution (image_reduction='resize', mask_ratio=0, a smaller "
                         f"image_size)")
    check_realised(strategy, vision.grid, mask_ratio)
    return vision.grid


REALISED_TOLERANCE = 0.1  # how far the share of patches masked may be from mask_ratio


def check_realised(strategy: str, grid: int, mask_ratio: float) -> None:
    """Raise ValueError where the patches masked on this grid are more than REALISED_TOLERANCE from mask_ratio: grid
    masking keeps one patch of each g x g cell (it masked nothing at mask_ratio 0.3, g = 1, and 0.75 at 0.4-0.6),
    block masking one whole h x w block (coarse on a small grid). The message lists the ratios grid masking can
    realise there."""
    if strategy not in ("grid", "block", "random") or mask_ratio <= 0:
        return
    n = grid * grid
    realised = 1 - keep_count(strategy, grid, mask_ratio) / n
    if abs(realised - mask_ratio) < REALISED_TOLERANCE:
        return
    if strategy == "grid":
        can = sorted({round(1 - math.ceil(grid / g) ** 2 / n, 3) for g in range(2, grid + 1)})
        options = f"grid masking keeps one patch per g x g cell, which masks {', '.join(map(str, can[:6]))}"
    elif strategy == "block":
        options = "block masking keeps one h x w block of patches"
    else:  # random: whole patches of so few (image_size 8 at patch 8: one patch, nothing masked)
        raise ValueError(f"image_reduction='random' with mask_ratio={mask_ratio} masks {realised:.3f} of a "
                         f"{grid}x{grid} patch grid (it keeps at least one of {n} patches, in whole patches): a "
                         "larger image_size, or a mask_ratio it can realise")
    raise ValueError(f"image_reduction={strategy!r} with mask_ratio={mask_ratio} masks {realised:.3f} of a "
                     f"{grid}x{grid} patch grid ({options}): pick a mask_ratio near one it can realise, or "
                     "image_reduction='random'")


def keep_count(strategy: str, grid: int, mask_ratio: float) -> int:
    """K, the patches per image `image_keep_indices` keeps (N where it returns None)."""
    _check(strategy, mask_ratio)
    n = grid * grid
    if strategy == "resize" or mask_ratio <= 0:
        return n
    if strategy == "grid":
        return math.ceil(grid / grid_cell(grid, mask_ratio)) ** 2
    if strategy == "block":
        h, w = block_shape(grid, mask_ratio)
        return h * w
    return num_kept(n, mask_ratio)


def image_keep_indices(strategy: str, batch: int, grid: int, mask_ratio: float, *, device, generator=None):
    """Keep indices (B, K) int64 into the row-major grid×grid patch grid, ascending; None = keep all."""
    k = keep_count(strategy, grid, mask_ratio)
    n = grid * grid
    if k >= n:
        return None
    if strategy == "random":
        # the K smallest of uniform noise: a uniformly random K-subset per image, drawn on the device
        noise = torch.rand(batch, n, device=device, generator=generator)  # (B, N)
        return noise.topk(k, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
    if strategy == "grid":
        g = grid_cell(grid, mask_ratio)
        cells = math.isqrt(k)
        off = torch.randint(0, g, (batch, 2), device=device, generator=generator)  # (B, 2): dy, dx
        start = torch.arange(cells, device=device) * g  # (C,)
        # the clamp moves a partial edge cell's patch inside that cell; rows and columns stay strictly increasing
        rows = (start + off[:, :1]).clamp_max(grid - 1)  # (B, C)
        cols = (start + off[:, 1:]).clamp_max(grid - 1)  # (B, C)
    else:  # block
        h, w = block_shape(grid, mask_ratio)
        y0 = torch.randint(0, grid - h + 1, (batch, 1), device=device, generator=generator)  # (B, 1)
        x0 = torch.randint(0, grid - w + 1, (batch, 1), device=device, generator=generator)  # (B, 1)
        rows = y0 + torch.arange(h, device=device)  # (B, h)
        cols = x0 + torch.arange(w, device=device)  # (B, w)
    return (rows[:, :, None] * grid + cols[:, None, :]).reshape(batch, -1)  # row-major: already ascending


class TextReducer:
    """caption -> ids: [SOT] + the kept BPE tokens + [EOT], at most `length` ids (EOT always last).

    Deterministic for a seed: the same captions in the same order give the same ids.
    """

    def __init__(self, strategy: str = "truncate", length: int = 77, seed: int = 0, tagger=None):
        if strategy not in TEXT_STRATEGIES:
            raise ValueError(f"unknown text reduction {strategy!r}; valid: {', '.join(TEXT_STRATEGIES)}")
        if length < 2:
            raise ValueError(f"text length must be at least 2 (start and end tokens), got {length}")
        self.strategy, self.length, self.budget = strategy, length, length - 2
        self.tok = get_tokenizer()
        self.rng = random.Random(seed)
        self.tagger, self._default_tagger = None, tagger is None
        if strategy == "syntax":
            from clipfast.pos import get_tagger

            self.tagger = tagger or get_tagger()

    def __getstate__(self) -> dict:
        """Picklable (for clipfast.data.prefetch's reader process): the settings and the RNG's state; the tokenizer
        and the default tagger are made again."""
        return {"strategy": self.strategy, "length": self.length, "rng": self.rng.getstate(),
                "tagger": self.tagger if self.tagger is not None and not self._default_tagger else None}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["strategy"], state["length"], tagger=state["tagger"])
        self.rng.setstate(state["rng"])

    def for_worker(self, j: int) -> "TextReducer":
        """A copy with the same settings whose random choices are its own: worker j of several reader processes
        (clipfast.data.prefetch), its RNG seeded from this one's state and j (the same each run; copies sharing this
        RNG's state would mask their captions alike)."""
        twin = copy.deepcopy(self)  # (through __getstate__: the tokenizer is made again, the tagger kept)
        state = hashlib.sha256(repr(self.rng.getstate()).encode()).hexdigest()
        twin.rng = random.Random(f"{state}/{j}")
        return twin

    def __call__(self, caption: str) -> list[int]:
        if self.strategy == "syntax":
            kept = self._syntax(caption)
        else:
            ids = self.tok.encode(caption, specials=False)
            kept = ids if len(ids) <= self.budget else self._reduce(ids)
        return [self.tok.sot_token_id, *kept, self.tok.eot_token_id]

    def _reduce(self, ids: list[int]) -> list[int]:
        n, b = len(ids), self.budget
        if self.strategy == "truncate":
            return ids[:b]
        if self.strategy == "random":
            return [ids[i] for i in sorted(self.rng.sample(range(n), b))]
        start = self.rng.randrange(n - b + 1)  # block
        return ids[start : start + b]

    def _syntax(self, caption: str) -> list[int]:
        words = self.tok.encode_words(caption, specials=False)  # [(word, ids)]
        if sum(len(ids) for _, ids in words) <= self.budget:
            return [i for _, ids in words for i in ids]
        ranks = self.tagger([w for w, _ in words])  # 0 noun, 1 adjective, 2 verb, 3 rest
        order = sorted(range(len(words)), key=lambda j: (ranks[j], j))
        take = [0] * len(words)  # tokens kept of each word
        left, passed = self.budget, []
        for j in order:
            size = len(words[j][1])
            if size <= left:
                take[j], left = size, left - size
            else:
                passed.append(j)
        if left and passed:  # fill the rest with the first tokens of the best word that did not fit whole
            take[passed[0]] = left
        return [i for (_, ids), t in zip(words, take) for i in ids[:t]]
