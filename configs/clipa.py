"""CLIPA (Li, Wang, Xie: "An Inverse Scaling Law for CLIP Training", 2023): pre-train with few image and
text tokens, then fine-tune briefly at 224 px. Three recipes, one per function:

    deepspeed --num_gpus 8 clipfast/train.py --config configs/clipa.py:b16_i50_t16   # paper: 63.2%
    deepspeed --num_gpus 8 clipfast/train.py --config configs/clipa.py:l16_i17_t16   # paper: 67.8%
    deepspeed --num_gpus 8 clipfast/train.py --config configs/clipa.py:l16_i37_t8    # paper: 69.3% (= config())

| recipe | model | pre-training | image tokens | text | paper, zero-shot ImageNet top-1 |
|---|---|---|---|---|---|
| b16_i50_t16 | CLIPA-B-16 | 112 px (7×7 + class) | 50 | 16 tokens, truncation | 63.2% (8×A100, ~2 days) |
| l16_i17_t16 | CLIPA-L-16 | 64 px (4×4 + class) | 17 | 16 tokens, syntax | 67.8% (8×A100, ~3 days) |
| l16_i37_t8 | CLIPA-L-16 | 96 px (6×6 + class) | 37 | 8 tokens, syntax | 69.3% (8×A100, ~4 days) |

Each: stage "pretrain", 6 epochs of LAION-400M at a global batch of 32768, base LR 8e-6 (× batch/256),
52.4 M warm-up samples; then stage "finetune", 224 px and 32 tokens (truncation), 131,072,000 samples
(CLIPA's unmasked tuning, the paper's 0.36 epoch), base LR 8e-7, 26.2 M warm-up samples. The paper's
numbers are after that fine-tune. Data and evaluation as configs/clip.py (LAION-400M shards in
data/laion400m/, ImageNet-1k val shards in data/imagenet/val/). These are the paper's numbers, not ones
measured with clipfast. Stage fields override on the command line: `stages.finetune.steps=2000`.
On fewer GPUs, or where a rank's 4096 samples do not fit, `accum_steps=N` keeps the batch of 32768 and its loss
over all of it, in N micro-batches per rank (clipfast.accum; a forward pass more per sample).
"""
import dataclasses
from pathlib import Path

from clipfast.config import TrainConfig, load_config

CLIP = Path(__file__).with_name("clip.py")


def _clipa(model: str, image_size: int, text_len: int, text_reduction: str, out_dir: str) -> TrainConfig:
    base = load_config(str(CLIP))
    batch = base.batch_size
    return dataclasses.replace(
        base,
        model=model,
        out_dir=out_dir,
        stages=(
            dict(name="pretrain", image_size=image_size, text_len=text_len, text_reduction=text_reduction,
                 steps=round(6 * 400_000_000 / batch), lr=8e-6, warmup_steps=round(52_428_800 / batch)),
            dict(name="finetune", image_size=224, text_len=32, text_reduction="truncate",
                 steps=round(131_072_000 / batch), lr=8e-7, warmup_steps=round(26_214_400 / batch)),
        ),
    )


def b16_i50_t16() -> TrainConfig:
    return _clipa("CLIPA-B-16", 112, 16, "truncate", "runs/clipa_b16_i50_t16")


def l16_i17_t16() -> TrainConfig:
    return _clipa("CLIPA-L-16", 64, 16, "syntax", "runs/clipa_l16_i17_t16")


def l16_i37_t8() -> TrainConfig:
    return _clipa("CLIPA-L-16", 96, 8, "syntax", "runs/clipa_l16_i37_t8")


def config() -> TrainConfig:
    return l16_i37_t8()
