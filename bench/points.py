"""bench/throughput.py's grid and its batches: the named grids, grid points and --points, each point's batch size,
and the synthetic batches (log-normal caption lengths, packed for clipfast and padded for open_clip) made before timing.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from clipfast.data.loader import pack_text
from clipfast.model import IMAGE_MEAN, IMAGE_STD
from clipfast.presets import from_name

CAPTION_MEDIAN, CAPTION_SIGMA = 12, 0.6  # log-normal caption length in tokens (start + words + end)
SOT_ID, EOT_ID = 49406, 49407  # CLIP BPE; end-of-text is the highest id, which open_clip's argmax pooling needs
GRIDS = {
    # 2 CPU cores: one small preset at low resolution, so both columns finish in ~4 minutes even under load
    # threads=1: on a shared 2-core machine two intra-op threads collapse under load (OpenMP barriers spin while
    # the other thread is descheduled): S/16 64 px steps took 7-23 s with 2 threads vs 1.0 s with 1, at load ~8
    "cpu": dict(presets=["ViT-S-16"], sizes=[64, 112], masks=[0.5], text_lens=[8, 32, 77], batch=8, steps=7,
                warmup=2, batches=2, threads=1, max_batch_scale=1),
    "gpu": dict(presets=["ViT-S-16", "ViT-B-16", "ViT-L-14", "ViT-H-14"], sizes=[64, 112, 160, 224],
                masks=[0.5, 0.75], text_lens=[8, 77, 32, 16], batch=None, steps=10, warmup=3, batches=3, threads=None,
                max_batch_scale=4),
    # issue 7's GPU goal points (CLIPA pre-training settings) with their full-token points; masks at 112 px
    "clipa": dict(presets=["ViT-B-16", "ViT-L-16"], sizes=[112, 96], masks=[0.5], text_lens=[16, 8], batch=None,
                  steps=10, warmup=3, batches=3, threads=None, max_batch_scale=4),
}
GPU_BATCH = {"ViT-S-16": 512, "ViT-B-16": 256, "ViT-B-32": 512, "ViT-L-14": 128, "ViT-L-16": 128, "ViT-H-14": 64}


@dataclasses.dataclass(frozen=True)
class Point:
    preset: str
    size: int  # image side in px, a multiple of the patch size
    mask: float  # fraction of patches dropped
    text_len: int  # caption clip length = open_clip's padded length

    @property
    def label(self) -> str:
        return f"{self.preset} {self.size}px mask={self.mask:g} text={self.text_len}"


def snap(size: int, patch: int) -> int:
    """The multiple of `patch` nearest to `size` (ties down), at least one patch."""
    return max(patch, patch * math.floor(size / patch + 0.5 - 1e-9))


def grid_points(presets, sizes, masks, text_lens) -> dict[str, list[Point]]:
    """Per preset: its full-token point first (every speed-up needs it), then sizes x text_lens unmasked, then
    masks x text_lens at the largest size; text length is the outer loop, in the order given, so a time budget
    that cuts a preset short leaves whole lines of the plot."""
    out = {}
    for name in presets:
        cfg = from_name(name)
        p = cfg.vision.stride  # pixels per grid cell: the patch, or a ResNet's 32
        pts = [Point(cfg.name, cfg.vision.image_size, 0.0, cfg.text.context_length)]
        pts += [Point(cfg.name, snap(s, p), 0.0, t) for t in text_lens for s in sizes]
        if cfg.vision.kind == "vit":  # (a ResNet takes no patch masks: no such points for it)
            pts += [Point(cfg.name, snap(max(sizes), p), m, t) for t in text_lens for m in masks if m > 0]
        out[cfg.name] = list(dict.fromkeys(pts))
    return out


def cpu_has_amx() -> bool:
    """Whether the CPU advertises AMX bf16 tiles (Linux /proc/cpuinfo), where bf16 matmuls run ~10x float32."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def parse_points(specs: list[str]) -> dict[str, list[Point]]:
    """--points PRESET:SIZE:TEXT[:MASK] ...: exactly these points, then each preset's full-token point (the
    speed-ups need it; last, so that a time budget spends itself on the points asked for first). An entry that does
    not parse is an error that names it."""
    out: dict[str, list[Point]] = {}
    for spec in specs:
        parts = spec.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError("want PRESET:SIZE:TEXT or PRESET:SIZE:TEXT:MASK")
            cfg = from_name(parts[0])
            size, text = int(parts[1]), int(parts[2])
            mask = float(parts[3]) if len(parts) == 4 else 0.0
            if not 0 <= mask < 1 or size <= 0 or text < 2:
                raise ValueError("size > 0, text >= 2, 0 <= mask < 1")
            if mask and cfg.vision.kind != "vit":
                raise ValueError(f"{cfg.name} is a ResNet: it takes no patch mask")
        except (ValueError, KeyError) as e:
            raise SystemExit(f"--points: bad entry {spec!r}: {e}") from None
        out.setdefault(cfg.name, []).append(Point(cfg.name, snap(size, cfg.vision.stride), mask, text))
    for name, pts in out.items():
        cfg = from_name(name)
        pts.append(Point(name, cfg.vision.image_size, 0.0, cfg.text.context_length))
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}


def point_batch(args, pt: Point, kept: int) -> int:
    """--batch, else the preset's GPU batch times the largest power of two <= min(max scale, full / kept tokens)."""
    if args.batch:
        return args.batch
    full = from_name(pt.preset).vision.num_patches
    scale = max(1, min(args.max_batch_scale or 1, full // max(kept, 1)))
    return GPU_BATCH.get(pt.preset, 128) * 2 ** int(math.log2(scale))


def caption_lengths(n: int, text_len: int, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    return (CAPTION_MEDIAN * torch.exp(CAPTION_SIGMA * z)).round().clamp(2, text_len).long()


@dataclasses.dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, 3, H, W): clipfast normalises inside its model
    pixels: torch.Tensor  # normalised float (B, 3, H, W): what open_clip's data pipeline hands it
    text: torch.Tensor  # int32 (T,) packed captions
    cu_seqlens: torch.Tensor  # int32 (B+1,)
    max_len: int
    padded: torch.Tensor  # int64 (B, text_len), zero padding after the end-of-text token
    lengths: torch.Tensor  # (B,) caption lengths


def make_batch(batch: int, size: int, text_len: int, gen: torch.Generator, device, pixel_dtype) -> Batch:
    lengths = caption_lengths(batch, text_len, gen)
    seqs = [[SOT_ID, *torch.randint(1, SOT_ID, (n - 2,), generator=gen).tolist(), EOT_ID] for n in lengths.tolist()]
    text, cu, max_len = pack_text(seqs)
    padded = torch.zeros(batch, text_len, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = torch.tensor(s)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8)
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    pixels = ((images.float() / 255 - mean) / std).to(pixel_dtype)
    return Batch(images.to(device), pixels.to(device), text.to(device), cu.to(device), max_len, padded.to(device),
                 lengths)
