"""The training strategies the "Scaling (Down) CLIP" study (Li, Xie, Cubuk 2024) compares at small budgets, on one
base so that only the strategy differs: CLIP, CLIP + data augmentation, FLIP and SLIP.

    deepspeed --num_gpus 8 clipfast/train.py --config configs/strategies.py:clip
    deepspeed --num_gpus 8 clipfast/train.py --config configs/strategies.py:clip_da    # + SimCLR's augmentations
    ... configs/strategies.py:clip_da augment=simclr_noflip   # without the flip, for data a mirror changes
    deepspeed --num_gpus 8 clipfast/train.py --config configs/strategies.py:flip       # 50% of the patches dropped
    deepspeed --num_gpus 8 clipfast/train.py --config configs/strategies.py:slip       # + SimCLR loss on 2 views

Base: configs/clip.py (ViT-B/16, 224 px, 77 tokens, CLIPA's optimiser, LAION-400M shards, ImageNet zero-shot) with
a small budget of one pass over the data (400 M samples; a choice for these recipes, not the study's schedule). The
study reports that the best strategy depends on the budget, and that CLIP + data augmentation can match CLIP with
half the data: `steps=` halves the budget to try that. Costs per sample differ: FLIP runs half the image tokens,
SLIP three image-tower passes (CLIP's view and two SSL views; clipfast.slip); the trainer's log gives each one's
samples/s and MFU. On the CPU demo: `configs/demo.py` with the same overrides (README,
"Training strategies").
"""
import dataclasses
from pathlib import Path

from clipfast.config import TrainConfig, load_config

SAMPLES = 400_000_000


def _base(name: str, **changes) -> TrainConfig:
    base = load_config(str(Path(__file__).with_name("clip.py")))
    return dataclasses.replace(base, steps=round(SAMPLES / base.batch_size), out_dir=f"runs/strategies_{name}",
                               **changes)


def clip() -> TrainConfig:
    return _base("clip")


def clip_da() -> TrainConfig:
    """CLIP + data augmentation: SimCLR's flip, colour jitter, grayscale and blur on the training images."""
    return _base("clip_da", augment="simclr")


def flip() -> TrainConfig:
    """FLIP: a random half of the image patches dropped (no unmasked tuning here: configs/flip.py has it)."""
    return _base("flip", image_reduction="random", mask_ratio=0.5)


def slip() -> TrainConfig:
    """SLIP: CLIP's loss plus SimCLR's on two more views of each image, weight 1, SLIP's head (4096, 256) and
    temperature 0.1."""
    return _base("slip", ssl_weight=1.0, ssl_hidden=4096, ssl_dim=256, ssl_temperature=0.1)


def config() -> TrainConfig:
    return clip()
