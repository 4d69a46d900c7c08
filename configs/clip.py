"""Plain CLIP: ViT-B/16 at 224 px and 77 text tokens, no token reduction — the baseline the recipes beat.

    deepspeed --num_gpus 8 clipfast/train.py --config configs/clip.py

Data: LAION-400M as webdataset shards in data/laion400m/ (key.jpg + key.txt); zero-shot evaluation on
ImageNet-1k val as shards in data/imagenet/val/ (key.json {"label": i}, meta.json with the 1000 class
names and prompt templates). Schedule: 32 epochs of 400 M samples at a global batch of 32768.
Reference: open_clip's ViT-B-16 trained 32 epochs on LAION-400M (`laion400m_e32`) reports 67.1%
zero-shot ImageNet top-1 — with open_clip's own optimiser settings; this recipe uses CLIPA's (below),
so the number is the one to compare against, not one measured here.

The optimiser every recipe in configs/ shares (CLIPA's): AdamW β = (0.9, 0.95), weight decay 0.2, cosine
to 0, LR = base × batch / 256 (`lr_scaled_by_batch`), random-resized-crop area 0.4–1.0.
"""
from clipfast.config import TrainConfig

LAION_400M = 400_000_000
BATCH = 32768


def steps(samples: float, batch: int = BATCH) -> int:
    """Optimizer steps for a number of samples seen."""
    return round(samples / batch)


def config() -> TrainConfig:
    return TrainConfig(
        model="ViT-B-16",
        image_size=224,
        text_len=77,
        train_data="data/laion400m",
        val_data="data/imagenet/val",
        crop_scale=(0.4, 1.0),
        data_threads=8,
        batch_size=BATCH,
        steps=steps(32 * LAION_400M),
        lr=8e-6,  # base LR per 256 samples: 1.024e-3 at 32k
        lr_scaled_by_batch=True,
        warmup_steps=steps(52_428_800),  # CLIPA's warm-up: 52.4 M samples (1600 steps at 32k)
        min_lr=0.0,
        weight_decay=0.2,
        betas=(0.9, 0.95),
        grad_checkpointing=True,
        zero_stage=1,
        precision="bf16",
        out_dir="runs/clip_b16",
        log_every=50,
        ckpt_every=1000,
        keep_ckpts=3,  # each: bf16 weights, fp32 masters, AdamW moments (B/16: ~2.1 GB); all ~390 would be ~0.8 TB
    )
