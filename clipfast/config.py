"""Run configuration: a typed dataclass, built by a Python function in configs/, overridden by key=value.

    deepspeed clipfast/train.py --config configs/demo.py steps=200 lr=1e-3

`--config path.py` calls the file's `config()`; `--config path.py:name` calls `name()`. Overrides are
checked against the dataclass: an unknown key is an error that lists the valid keys.

Multi-stage runs (CLIPA: pre-train small, fine-tune at full size) list `stages`, each a dict of overrides
of the run's own fields plus an optional "name" (see clipfast.stages). On the command line a stage field is
`stages.<index or name>.<key>=value` (e.g. `stages.1.steps=50`; `stages.*.steps=50` sets it in every stage), or the
whole tuple is JSON (`stages='[{"steps": 10}, {"steps": 5}]'`). A run-wide `key=value` that a stage sets itself is an
error (the stage's value would win): set it per stage.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("clipfast.config")


@dataclass
class TrainConfig:
    # model
    model: str = "demo"  # a preset name from clipfast.presets
    image_size: int = 0  # training resolution; 0 = the preset's
    text_len: int = 0  # text tokens per caption incl. start/end tokens; 0 = the preset's context length
    kernels: str = "auto"  # "auto" (Triton on CUDA, reference on CPU), "triton", "ref"
    grad_checkpointing: bool = False
    init_from: str = ""  # model.pt (or a run folder) to start from; position embeddings resized to this run's sizes
    # token reduction (clipfast.reduce)
    image_reduction: str = "resize"  # resize | random | grid | block
    mask_ratio: float = 0.0  # share of patches dropped by random/grid/block
    text_reduction: str = "truncate"  # truncate | random | block | syntax
    # training strategy ("Scaling (Down) CLIP": CLIP, CLIP + data augmentation, FLIP = image_reduction=random, SLIP)
    augment: str = "none"  # "none", "simclr" (flip, colour jitter, grayscale, blur) or "simclr_noflip" (data.augment)
    ssl_weight: float = 0.0  # SLIP: > 0 adds SimCLR's loss on two more augmented views, times this (clipfast.slip)
    ssl_temperature: float = 0.1
    ssl_hidden: int = 4096  # SLIP's head: Linear(width, hidden) BN ReLU, Linear(hidden, hidden) BN ReLU, Linear(., dim)
    ssl_dim: int = 256
    ssl_crop_scale: tuple = (0.08, 1.0)  # the SSL views' random-resized-crop area range (SimCLR's)
    # data
    train_data: str = "data/demo/train"  # .tar shards: a folder, a glob, a-{0000..0041}.tar, or a comma list
    # with weights (one per comma-separated entry of train_data): the entries as datasets of their own, each sample from
    # entry i with probability w_i / sum(w) (clipfast.data.shards.MixedReader); () = the entries as one dataset
    train_weights: tuple = ()
    val_data: str = ""  # held-out shards with class labels in .json, for zero-shot classification
    retrieval_data: str = ""  # held-out shards with captions (.txt, or .json "captions"), for zero-shot retrieval
    # (either: several sets separated by ';', each name=shards: clipfast.evaluate.eval_sets)
    crop_scale: tuple = (0.4, 1.0)  # random-resized-crop area range (CLIPA uses 0.4-1.0)
    data_threads: int = 2
    # reading the shards and tokenising in a child process, off the thread that launches the steps
    # (clipfast.data.prefetch): "auto" = on where the model trains on a GPU, "on" or "off"
    reader_process: str = "auto"
    reader_processes: int = 1  # how many, where it is on: the rank's shards dealt out among them (a fast GPU's need)
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
    # split each rank's batch into this many micro-batches, the loss still over the whole batch (clipfast.accum,
    # GradCache): the whole batch's gradient at one micro-batch's activation memory, for one forward more per sample
    accum_steps: int = 1
    zero_stage: int = 1  # on one rank DeepSpeed runs stage 0 (nothing to partition)
    engine: str = "deepspeed"  # "deepspeed", or "torch" (no DeepSpeed; data parallel on several ranks: clipfast.engine)
    cuda_graph: bool = False  # engine=torch on CUDA: the whole step replayed as CUDA graphs (clipfast.graph)
    compile: bool = False  # torch.compile each transformer block's layer norms, projections, MLP (CLIP.compile_blocks)
    # the opt-in kernels; "auto": the kernel when the step runs as CUDA graphs on CUDA, else the plain op
    # (clipfast.engine.resolve_kernels: measured faster graphed, not eager)
    layer_norm: str = "auto"  # "auto", "torch" or "triton" (kernels.layer_norm on CUDA: dW, dB fused into dx's pass)
    vision_attention: str = "auto"  # "auto", "sdpa" or "triton" (kernels.short_attention on CUDA, <= 64 image tokens)
    mlp: str = "auto"  # "auto", "torch" or "triton" (kernels.linear_gelu on CUDA: GELU backward writes the bias grad)
    # the text tower on a second CUDA stream beside the image tower (CLIP.set_tower_streams): "auto" = on with
    # engine=torch on CUDA (clipfast.engine.resolve_tower_streams), "on" or "off"
    tower_streams: str = "auto"
    # the optimizer's update inside the backward, each parameter once its gradient is complete (MasterAdamW.set_overlap;
    # engine=torch cuda_graph=true, bf16, grad_clip=0, one rank): "auto" = on where it can be, "on" (an error where not)
    # or "off" (clipfast.engine.resolve_overlap_optimizer)
    overlap_optimizer: str = "auto"
    # engine=torch on several ranks: each bucket of gradients all-reduced inside the backward as soon as it is complete
    # (clipfast.dp.OverlappedAverage, as DDP's reducer), or false: every bucket after the backward (DeepSpeed: its own)
    overlap_reduce: bool = True
    precision: str = "auto"  # "auto" = bf16 on GPU, fp32 on CPU; or "bf16" / "fp32"
    seed: int = 0
    # bookkeeping
    out_dir: str = "runs/demo"
    log_every: int = 10
    ckpt_every: int = 200
    keep_ckpts: int = 0  # keep the newest this many checkpoints in ckpt/ (each holds the optimizer state); 0 = all
    resume: bool = False
    overwrite: bool = False  # resume=false where out_dir holds a run: remove its logs and checkpoints (else an error)
    tensorboard: bool = True
    eval_at_end: bool = True
    eval_every: int = 0  # also evaluate (val_data, retrieval_data) every this many steps; 0 = at the end only
    # stages: () = one stage (this config); else a tuple of dicts of overrides, run in order (clipfast.stages)
    stages: tuple = ()

    def effective_lr(self) -> float:
        return self.lr * self.batch_size / 256 if self.lr_scaled_by_batch else self.lr


def field_names(cls=TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# fields a stage may not override: they belong to the whole run
RUN_ONLY_KEYS = ("stages", "out_dir", "resume")


def _parse_value(raw: str, typ, name: str):
    typ = typing.get_type_hints(TrainConfig).get(name, typ) if isinstance(typ, str) else typ
    if name == "stages":
        try:
            stages = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"stages takes a JSON list of dicts, got {raw!r}") from e
        return tuple(stages)
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config key {name!r} takes true/false, got {raw!r}")
    if typ is tuple:
        try:
            return tuple(float(x) for x in raw.strip("()[] ").split(",") if x.strip())
        except ValueError:
            raise ValueError(f"config key {name!r} takes comma-separated numbers, got {raw!r}") from None
    try:
        return typ(raw)
    except ValueError as e:
        raise ValueError(f"config key {name!r} takes a {typ.__name__}, got {raw!r}") from e


# the string keys' choices that are not checked where they are used (clipfast.engine, clipfast.build check the others)
CHOICES = {"precision": ("auto", "bf16", "fp32"), "kernels": ("auto", "triton", "ref")}


def check_choice(cfg, key: str, valid: tuple):
    """cfg's `key` (default "auto"), or a ValueError listing the valid choices; what every string switch is checked
    with, where it is resolved and before a staged run starts (clipfast.stages)."""
    value = getattr(cfg, key, "auto")
    if value not in valid:
        raise ValueError(f"{key} must be one of {valid}, got {value!r}")
    return value


def check_values(cfg: TrainConfig, where: str = "") -> None:
    """Values a run cannot use, named with their key before anything starts (where: "stage <name>: " in a staged
    run): counts and intervals below 1, a ZeRO stage other than 0-3, a choice not in CHOICES, ranges that are not
    (low, high) within [0, 1]."""
    at_least = {"steps": 1, "batch_size": 1, "log_every": 1, "ckpt_every": 1, "eval_every": 0, "keep_ckpts": 0,
                "data_threads": 1, "reader_processes": 1, "accum_steps": 1, "warmup_steps": 0, "image_size": 0,
                "text_len": 0, "lr": 0, "min_lr": 0, "weight_decay": 0, "grad_clip": 0, "ssl_weight": 0}
    for key, low in at_least.items():
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:  # (NaN: not >=)
            raise ValueError(f"{where}{key} must be {low} or more, got {value!r}"
                             + (" (0: the preset's)" if key in ("image_size", "text_len") else ""))
    if cfg.text_len in (1, 2):
        raise ValueError(f"{where}text_len must be 0 (the preset's) or at least 3 (start and end tokens and one of the "
                         f"caption's: at 2 every caption is the same), got {cfg.text_len}")
    if cfg.min_lr > cfg.effective_lr():
        raise ValueError(f"{where}min_lr {cfg.min_lr} is above the peak learning rate {cfg.effective_lr():g} (lr "
                         f"{cfg.lr}{' x batch_size / 256' if cfg.lr_scaled_by_batch else ''}): the cosine would rise")
    if cfg.warmup_steps >= cfg.steps > 0:
        log.warning("%swarmup_steps %d >= steps %d: the learning rate never reaches its peak (%.3g of it at the last "
                    "step)", where, cfg.warmup_steps, cfg.steps, cfg.steps / max(1, cfg.warmup_steps))
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"{where}zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    for key, valid in CHOICES.items():
        if getattr(cfg, key) not in valid:
            raise ValueError(f"{where}{key} must be one of {', '.join(valid)}; got {getattr(cfg, key)!r}")
    if not 0 <= cfg.mask_ratio < 1:
        raise ValueError(f"{where}mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
    if not cfg.eps > 0:
        raise ValueError(f"{where}eps must be above 0, got {cfg.eps}")
    if cfg.train_weights:
        from clipfast.data.shards import check_weights, split_entries

        try:
            check_weights([e.strip() for e in split_entries(cfg.train_data) if e.strip()], cfg.train_weights)
        except ValueError as e:
            raise ValueError(f"{where}train_weights: {e}") from None
    ranges = {"betas": "two numbers in [0, 1), e.g. betas=0.9,0.98", "crop_scale": "(low, high) with 0 < low <= high "
              "<= 1, e.g. crop_scale=0.4,1", "ssl_crop_scale": "(low, high) with 0 < low <= high <= 1"}
    for key, want in ranges.items():
        v = tuple(getattr(cfg, key))
        ok = len(v) == 2 and (all(0 <= x < 1 for x in v) if key == "betas" else 0 < v[0] <= v[1] <= 1)
        if not ok:
            raise ValueError(f"{where}{key} takes {want}; got {v}")


def _stage_index(stages: tuple, ref: str) -> int:
    names = [s.get("name", f"stage{i}") for i, s in enumerate(stages)]
    if ref.isdigit() and int(ref) < len(stages):
        return int(ref)
    if ref in names:
        return names.index(ref)
    raise KeyError(f"no stage {ref!r}: the config has stages {', '.join(names) or '(none)'} (or their index)")


_TYPE_NAMES = {bool: "true or false (a boolean, not a string)", int: "a whole number", float: "a number",
               str: "a string", tuple: "a list of numbers"}


def _is_a(value, want) -> bool:
    """Whether a stage's value (from a config file, or JSON on the command line) fits the field's type."""
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is tuple:
        return isinstance(value, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        for x in value)
    return isinstance(value, want)


def check_stages(stages: tuple, cls=TrainConfig) -> None:
    """Each stage is a dict of the run's fields (less RUN_ONLY_KEYS) plus "name"; names are unique."""
    valid = [k for k in field_names(cls) if k not in RUN_ONLY_KEYS]
    names = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict):
            raise TypeError(f"stage {i} is a {type(st).__name__}, expected a dict of config overrides")
        hints = typing.get_type_hints(cls)
        for key, value in st.items():
            if key != "name" and key not in valid:
                raise KeyError(f"stage {i}: unknown or run-wide key {key!r}; "
                               f"valid stage keys: name, {', '.join(valid)}")
            want = str if key == "name" else hints[key]
            if not _is_a(value, want):
                raise TypeError(f"stage {i}: {key} takes {_TYPE_NAMES.get(want, want.__name__)}, got "
                                f"{type(value).__name__} {value!r}")
        names.append(st.get("name", f"stage{i}"))
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ["key=value", ...] to a copy of `cfg`; unknown keys raise with the list of valid ones."""
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    stage_changes = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if key.startswith("stages."):  # stages.<index|name>.<key>=value
            parts = key.split(".")
            if len(parts) != 3:
                raise KeyError(f"stage override {key!r} is not of the form stages.<index or name>.<key>")
            _, ref, sub = parts
            if sub == "name":
                stage_changes.append((ref, sub, raw.strip()))
                continue
            if sub not in hints or sub in RUN_ONLY_KEYS:
                valid = [k for k in field_names(type(cfg)) if k not in RUN_ONLY_KEYS]
                raise KeyError(f"unknown stage config key {sub!r}; valid keys: name, {', '.join(valid)}")
            stage_changes.append((ref, sub, _parse_value(raw.strip(), hints[sub], sub)))
            continue
        if key not in hints:
            raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(field_names(type(cfg)))}")
        changes[key] = _parse_value(raw.strip(), hints[key], key)
    out = dataclasses.replace(cfg, **changes)
    if stage_changes:
        stages = [dict(s) for s in out.stages]
        for ref, sub, value in stage_changes:
            if ref == "*" and sub != "name":
                if not stages:
                    raise KeyError(f"stages.*.{sub}: the config has no stages (set {sub}= itself)")
                for st in stages:
                    st[sub] = value
            else:
                stages[_stage_index(tuple(stages), ref)][sub] = value
        out = dataclasses.replace(out, stages=tuple(stages))
    check_stages(out.stages, type(cfg))
    def same(a, b):  # (a stage's JSON list and a parsed tuple alike)
        return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)

    for key in changes:  # a stage's own value would win over the command line's, silently
        shadowing = [st.get("name", f"stage{i}") for i, st in enumerate(out.stages)
                     if not same(st.get(key, changes[key]), changes[key])]
        if shadowing and key != "stages":
            raise ValueError(f"{key}={changes[key]!r} would not reach stage(s) {', '.join(shadowing)}, which set "
                             f"{key} themselves: set it per stage (stages.<name>.{key}=...) or in all of them "
                             f"(stages.*.{key}=...)")
    return out


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
