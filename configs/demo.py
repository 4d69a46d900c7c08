"""Demo: a tiny CLIP on scikit-learn's handwritten digits, CPU-friendly.

    python -m clipfast.data.demo --out data/demo
    deepspeed clipfast/train.py --config configs/demo.py

Expected: zero-shot top-1 of at least 90% on the 359 held-out digits (chance 10%), within a few
minutes on 2 CPU cores (`make demo` runs all of it and prints the number).
"""
from clipfast.config import TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        model="demo",
        image_size=32,
        text_len=16,
        train_data="data/demo/train",
        val_data="data/demo/val",
        crop_scale=(0.7, 1.0),  # digits are small: a 0.4 crop often cuts the stroke that tells 1 from 7
        batch_size=128,
        steps=600,
        lr=1e-3,
        warmup_steps=50,
        weight_decay=0.1,
        betas=(0.9, 0.98),
        zero_stage=1,
        out_dir="runs/demo",
        log_every=20,
        ckpt_every=300,
    )
