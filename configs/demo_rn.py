"""Demo with a ResNet image tower: configs/demo.py with the `demo-rn` preset (open_clip's ModifiedResNet at width 16,
one Bottleneck block per stage, 1.3 M image-tower parameters; demo's text tower), CPU-friendly.

    python -m clipfast.data.demo --out data/demo
    deepspeed clipfast/train.py --config configs/demo_rn.py

Same data, batch, schedule and zero-shot evaluation as configs/demo.py. At 32 px the ResNet's final feature map is
1x1 (stride 32), so its attention pool sees one position plus the mean token. Measured numbers: README, "Models and
open_clip".
"""
import dataclasses
from pathlib import Path

from clipfast.config import TrainConfig, load_config


def config() -> TrainConfig:
    base = load_config(str(Path(__file__).with_name("demo.py")))
    return dataclasses.replace(base, model="demo-rn", out_dir="runs/demo_rn")
