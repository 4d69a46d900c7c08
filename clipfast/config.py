"""Run configuration: a typed dataclass, built by a Python function in configs/, overridden by key=value.

    deepspeed clipfast/train.py --config configs/demo.py steps=200 lr=1e-3

`--config path.py` calls the file's `config()`; `--config path.py:name` calls `name()`. Overrides are
checked against the dataclass: an unknown key is an error that lists the valid keys.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainConfig:
    # model
    model: str = "demo"  # a preset name from clipfast.presets
    image_size: int = 0  # training resolution; 0 = the preset's
    text_len: int = 0  # text tokens per caption incl. start/end tokens; 0 = the preset's context length
    kernels: str = "auto"  # "auto" (Triton on CUDA, reference on CPU), "triton", "ref"
    grad_checkpointing: bool = False
    # token reduction (clipfast.reduce)
    image_reduction: str = "resize"  # resize | random | grid | block
    mask_ratio: float = 0.0  # share of patches dropped by random/grid/block
    text_reduction: str = "truncate"  # truncate | random | block | syntax
    # data
    train_data: str = "data/demo/train"  # a folder of .tar shards, a glob, or a comma-separated list
    val_data: str = ""  # held-out shards with class labels in .json, for zero-shot evaluation
    crop_scale: tuple = (0.4, 1.0)  # random-resized-crop area range (CLIPA uses 0.4-1.0)
    data_threads: int = 2
    # optimisation
    batch_size: int = 256  # global batch (all ranks)
    steps: int = 1000
    lr: float = 5e-4  # peak learning rate (use lr_scaled_by_batch for CLIPA's base x batch / 256)
    lr_scaled_by_batch: bool = False
    warmup_steps: int = 100
    min_lr: float = 0.0
    weight_decay: float = 0.2
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    zero_stage: int = 1
    precision: str = "auto"  # "auto" = bf16 on GPU, fp32 on CPU; or "bf16" / "fp32"
    seed: int = 0
    # bookkeeping
    out_dir: str = "runs/demo"
    log_every: int = 10
    ckpt_every: int = 200
    resume: bool = False
    tensorboard: bool = True
    eval_at_end: bool = True

    def effective_lr(self) -> float:
        return self.lr * self.batch_size / 256 if self.lr_scaled_by_batch else self.lr


def field_names(cls=TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _parse_value(raw: str, typ, name: str):
    typ = typing.get_type_hints(TrainConfig).get(name, typ) if isinstance(typ, str) else typ
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config key {name!r} takes true/false, got {raw!r}")
    if typ is tuple:
        return tuple(float(x) for x in raw.strip("()[] ").split(",") if x.strip())
    try:
        return typ(raw)
    except ValueError as e:
        raise ValueError(f"config key {name!r} takes a {typ.__name__}, got {raw!r}") from e


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ["key=value", ...] to a copy of `cfg`; unknown keys raise with the list of valid ones."""
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if key not in hints:
            raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(field_names(type(cfg)))}")
        changes[key] = _parse_value(raw.strip(), hints[key], key)
    return dataclasses.replace(cfg, **changes)


def load_config(spec: str, overrides: list[str] | None = None) -> TrainConfig:
    """Load `path.py[:function]` and apply overrides."""
    path, _, fn_name = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"clipfast_config_{p.stem}", p)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn_name = fn_name or "config"
    fn = getattr(module, fn_name, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise AttributeError(f"{path} has no function {fn_name!r}; it defines: {', '.join(names)}")
    cfg = fn()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"{spec} returned {type(cfg).__name__}, expected TrainConfig")
    return apply_overrides(cfg, overrides or [])


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
