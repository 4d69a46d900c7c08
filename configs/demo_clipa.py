"""Demo, the CLIPA way: pre-train the demo CLIP at 16 px / 8 text tokens, fine-tune briefly at 32 px / 16.

    python -m clipfast.data.demo --out data/demo
    deepspeed clipfast/train.py --config configs/demo_clipa.py      # or: make demo-clipa

Same model, data, batch and zero-shot evaluation as configs/demo.py. Stage "pretrain": 16 px images
(2×2 = 4 patches of 8 px instead of 4×4 = 16; the digits are 8×8 scans, so little is lost) and captions
cut to 8 tokens by syntax masking. Stage "finetune": 32 px and 16 tokens, from the pre-trained weights
(position embeddings resized on load), at half the LR: 450 + 150 steps against the plain demo's 600.
Expected: zero-shot top-1 within 3 points of the plain demo (which reaches >= 90%) in less training
time; results in runs/demo_clipa/{eval,stages}.json (measured numbers: README, "Token reduction").
"""
from pathlib import Path

from clipfast.config import TrainConfig, load_config


def config() -> TrainConfig:
    base = load_config(str(Path(__file__).with_name("demo.py")))
    return TrainConfig(**{
        **base.__dict__,
        "out_dir": "runs/demo_clipa",
        "stages": (
            dict(name="pretrain", image_size=16, text_len=8, text_reduction="syntax", steps=450, warmup_steps=50,
                 lr=1e-3),
            dict(name="finetune", image_size=32, text_len=16, text_reduction="truncate", steps=150, warmup_steps=15,
                 lr=5e-4),
        ),
    })
