"""CLIP with OpenAI's ResNet-50 image tower (open_clip's RN50: ModifiedResNet, attention pool), otherwise as
configs/clip.py: 224 px, 77 text tokens, LAION-400M for 32 epochs at a global batch of 32768, CLIPA's optimiser.

    deepspeed --num_nodes 8 --num_gpus 8 clipfast/train.py --config configs/rn50.py

For: the CNN side of a CNN-vs-ViT comparison at small budgets (Li, Xie, Cubuk: "Scaling (Down) CLIP", 2024),
against configs/clip.py's ViT-B/16 (35.1 image GFLOPs per sample; RN50: 11.6, clipfast.flops). A ResNet takes no
patch masks: its token reduction is resolution only (a lower image_size, or stages: low-resolution pre-training,
then a short fine-tune at 224 px, the attention pool's position embedding resized on load).

Memory: the ResNet tower runs without activation checkpointing (clipfast.resnet says why) and saves about 84 MB of
activations per sample in bf16 at 224 px (the saved tensors of its forward, counted on the CPU), so the 32768 batch
wants about 64 80-GB GPUs (512 samples, ~43 GB each): 8 nodes of 8 as above.

Reference: OpenAI's RN50 (their 400 M private pairs, 32 epochs, batch 32768: Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision") scores 59.8% zero-shot ImageNet top-1 in open_clip's
benchmark (docs/openclip_results.csv, RN50 / openai); open_clip's own RN50 runs on CC12M and YFCC-15M score 35.9% and
32.4% there. Other data and optimiser settings (and OpenAI's text tower uses QuickGELU; this preset is open_clip's
RN50 with GELU), so these are numbers to compare against, not ones measured with clipfast.
"""
import dataclasses
from pathlib import Path

from clipfast.config import TrainConfig, load_config


def config() -> TrainConfig:
    base = load_config(str(Path(__file__).with_name("clip.py")))
    return dataclasses.replace(base, model="RN50", out_dir="runs/clip_rn50")
